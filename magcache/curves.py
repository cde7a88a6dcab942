"""Which ratio curve a run uses: what a pipeline call depends on (model, steps, resolution, scheduler, CFG) and the
best calibration for it in the store, else the preset's published curve.

    handle, choice = apply_best(pipe, {"prompt": "...", "num_inference_steps": 20})
    print(choice.label)  # which curve and where it came from
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import policy as P
from .calibration import Calibration, CalibrationStore, Resolution, as_resolution
from .presets import Preset, get_preset


# --------------------------------------------------------------------------------------------------
# Choosing the curve for a run
# --------------------------------------------------------------------------------------------------
def rules_for_calibration(rules: P.Rules) -> P.Rules:
    """Rules to use with a calibrated curve: the preset's rules without its guarded steps, which mark dips of the
    published curve (FLUX's step 11) and do not carry over to a new calibration."""
    return replace(rules, guarded_steps=())


@dataclass(frozen=True)
class CurveChoice:
    """The curve a run uses and where it came from, for ``magcache.apply(curves=..., rules=...)`` and the UI."""

    preset: str
    curves: list[list[float]]
    rules: P.Rules
    label: str  # one sentence for the UI: which curve and where it came from
    calibration: Calibration | None = None
    how: str | None = None  # "exact" / "nearest (...)" / "chosen by hand" / "settings file"; None: the preset curve
    options: dict = field(default_factory=dict)  # Settings fields beyond thresh / retention / K (settings file)


def choose_curves(
    preset: str | Preset,
    model: str,
    num_steps: int,
    resolution: Any,
    scheduler: str | None = None,
    cfg: bool | None = None,
    store: CalibrationStore | None = None,
) -> CurveChoice:
    """The best calibration of ``model`` in ``store`` (default store if ``None``), else the preset's published
    curve."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    match = (store if store is not None else CalibrationStore()).best_match(model, num_steps, resolution, scheduler, cfg)
    if match.calibration is None:
        steps = "" if p.calibrated_steps == num_steps else f", resampled from {p.calibrated_steps} steps"
        label = f"preset {p.id!r} curve ({p.source or p.rules_source}{steps})"
        return CurveChoice(p.id, [list(c) for c in p.curves], p.rules, label)
    cal = match.calibration
    label = f"calibration {cal.id} ({match.how}): {cal.label()}"
    return CurveChoice(p.id, cal.curves_for(cfg), rules_for_calibration(p.rules), label, cal, match.how)

# --------------------------------------------------------------------------------------------------
# Describing a pipeline run (model, scheduler, resolution, CFG)
# --------------------------------------------------------------------------------------------------
def model_id(pipe: Any) -> str:
    """A stable name for the loaded model: its repo id or (absolute) local path, else the pipeline and transformer
    classes plus a hash of the transformer config (pipelines built in code)."""
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name:
        return source_name(name)
    transformer = getattr(pipe, "transformer", pipe)
    config = dict(getattr(transformer, "config", {}) or {})
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{type(pipe).__name__}:{type(transformer).__name__}:{digest}"


def source_name(source: str) -> str:
    """A model source as calibrations are keyed by it: a local path resolved (absolute, no symlinks), a hub id as
    it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def scheduler_label(scheduler: Any) -> str:
    """Class name plus the setting that shapes the sigmas most: ``"FlowMatchEulerDiscreteScheduler shift=3"``,
    ``"... dynamic-shift"`` (FLUX: the shift follows the resolution), ``"UniPCMultistepScheduler flow_shift=3"``."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    if config.get("use_dynamic_shifting"):
        return f"{name} dynamic-shift"
    if config.get("use_flow_sigmas") and config.get("flow_shift") is not None:
        return f"{name} flow_shift={float(config['flow_shift']):g}"
    if config.get("shift") is not None:
        return f"{name} shift={float(config['shift']):g}"
    return name


def _call_default(pipe: Any, name: str) -> Any:
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def run_resolution(pipe: Any, call_kwargs: Mapping[str, Any]) -> Resolution | None:
    """Height/width/frames of a call from its arguments, else the pipeline's defaults; ``None`` if unknown."""
    h = call_kwargs.get("height") or _call_default(pipe, "height")
    w = call_kwargs.get("width") or _call_default(pipe, "width")
    if h is None or w is None:
        size = getattr(pipe, "default_sample_size", None)
        scale = getattr(pipe, "vae_scale_factor", None)
        if isinstance(size, int) and isinstance(scale, int):
            h, w = h or size * scale, w or size * scale
    if h is None or w is None:
        return None
    frames = call_kwargs.get("num_frames") or _call_default(pipe, "num_frames") or 1
    return as_resolution((int(h), int(w), int(frames)))


def expects_cfg(pipe: Any, call_kwargs: Mapping[str, Any]) -> bool:
    """Whether a call will run two transformer branches (true CFG). Pipelines with ``true_cfg_scale`` (FLUX,
    Kontext, HunyuanVideo, FramePack) need it > 1 and a negative prompt; guidance-distilled transformers
    (``guidance_embeds``) embed ``guidance_scale`` instead; the others (Wan, Chroma) run CFG when
    ``guidance_scale`` > 1."""
    if _call_default(pipe, "true_cfg_scale") is not None or "true_cfg_scale" in call_kwargs:
        scale = call_kwargs.get("true_cfg_scale", _call_default(pipe, "true_cfg_scale")) or 1.0
        negative = call_kwargs.get("negative_prompt") is not None or call_kwargs.get("negative_prompt_embeds") is not None
        return scale > 1 and negative
    transformer = getattr(pipe, "transformer", None)
    if getattr(getattr(transformer, "config", None), "guidance_embeds", False):
        return False
    scale = call_kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    return scale is not None and scale > 1


@dataclass(frozen=True)
class RunKey:
    """What a calibration is keyed by, for one pipeline call."""

    model: str
    num_steps: int
    resolution: Resolution
    scheduler: str
    cfg: bool


def run_key(pipe: Any, call_kwargs: Mapping[str, Any], model: str | None = None) -> RunKey:
    steps = call_kwargs.get("num_inference_steps") or _call_default(pipe, "num_inference_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError("call_kwargs need num_inference_steps")
    res = run_resolution(pipe, call_kwargs)
    if res is None:
        raise ValueError("cannot tell the output size of this call; pass height and width")
    return RunKey(model or model_id(pipe), steps, res, scheduler_label(pipe.scheduler), expects_cfg(pipe, call_kwargs))


def apply_best(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    *,
    store: CalibrationStore | None = None,
    preset: str | None = None,
    model: str | None = None,
    **apply_kwargs: Any,
):
    """``magcache.apply`` with the best-matching calibration for this call (else the preset curve). Returns
    ``(handle, CurveChoice)``; ``choice.label`` says which curve is in use and where it came from."""
    from .adapters import adapter_for
    from .runtime import apply

    key = run_key(pipe, call_kwargs, model)
    preset_id = preset or adapter_for(pipe.transformer).preset_for(pipe, pipe.transformer)
    choice = choose_curves(preset_id, key.model, key.num_steps, key.resolution, key.scheduler, key.cfg, store)
    handle = apply(pipe, preset_id, curves=choice.curves, rules=choice.rules, **apply_kwargs)
    return handle, choice
