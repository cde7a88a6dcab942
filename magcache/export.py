"""Export the current MagCache settings, and load them back.

Four forms of one :class:`SettingsSnapshot` (preset, settings, step count, curves, rules):

* :func:`comfyui_values` - the ComfyUI-MagCache ``MagCache`` node's widget values (``model_type``,
  ``magcache_thresh``, ``retention_ratio``, ``magcache_K``, ``start_step``, ``end_step``) with notes where the node
  cannot express what we run (no ``model_type`` for the model, custom curves, widget ranges, rules);
* :func:`python_snippet` - a ``magcache.apply(...)`` call that reproduces the schedule exactly;
* :func:`diffusers_snippet` - diffusers' built-in ``MagCacheConfig`` with the caveats where the built-in is wrong
  or weaker for the model;
* :func:`settings_json` / :func:`load_settings_json` - a JSON file with settings, rules and the ratio curve(s);
  loading it back (validated like a calibration file) restores the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from . import policy as P
from .calibration import MAX_RATIO, MAX_STEPS, check_model_name, check_preset_id
from .jsonfile import check_header, dumps_readable, load_json_text
from .presets import Preset, get_preset

FORMAT = "magcache-studio settings"
VERSION = 1
_TOP_KEYS = {"format", "version", "preset", "model", "num_steps", "num_branches", "settings", "rules", "curves",
             "curve_source", "created_at", "comfyui"}


# --------------------------------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettingsSnapshot:
    """Everything that decides a schedule. ``curves``/``rules`` ``None`` mean the preset's."""

    preset: str
    settings: P.Settings
    num_steps: int
    curves: tuple[tuple[float, ...], ...] | None = None
    rules: P.Rules | None = None
    num_branches: int | None = None  # None: one per curve (2 for CFG presets)
    model: str = ""
    curve_source: str = ""  # where the curve came from (preset, calibration id), shown to the user

    @property
    def preset_record(self) -> Preset:
        return get_preset(self.preset)

    @property
    def effective_curves(self) -> list[list[float]]:
        return [list(c) for c in (self.curves if self.curves is not None else self.preset_record.curves)]

    @property
    def effective_rules(self) -> P.Rules:
        return self.rules if self.rules is not None else self.preset_record.rules

    @property
    def branches(self) -> int:
        return self.num_branches if self.num_branches is not None else len(self.effective_curves)

    @property
    def custom_curves(self) -> bool:
        return self.curves is not None and [list(c) for c in self.curves] != [list(c) for c in self.preset_record.curves]

    @property
    def custom_rules(self) -> bool:
        return self.rules is not None and self.rules != self.preset_record.rules

    def schedule(self) -> P.Schedule:
        return P.simulate(self.effective_curves, self.num_steps, self.settings, self.effective_rules, self.branches)

    def apply_kwargs(self) -> dict:
        """Keyword arguments for ``magcache.apply(pipe, **snapshot.apply_kwargs())``."""
        kwargs: dict[str, Any] = {"preset": self.preset, "thresh": self.settings.thresh,
                                  "retention_ratio": self.settings.retention_ratio, "K": self.settings.K}
        kwargs.update(extra_options(self.settings))
        if self.custom_curves:
            kwargs["curves"] = self.effective_curves
        if self.custom_rules:
            kwargs["rules"] = self.rules
        return kwargs

    def apply(self, pipe: Any):
        from .runtime import apply

        return apply(pipe, **self.apply_kwargs())

    @classmethod
    def from_handle(cls, handle: Any, num_steps: int, num_branches: int | None = None, model: str = "",
                    curve_source: str = "") -> "SettingsSnapshot":
        """The settings a ``MagCacheHandle`` will use for its next run of ``num_steps`` steps."""
        return cls(handle.preset.id, handle.settings, num_steps, tuple(tuple(c) for c in handle.curves), handle.rules,
                   num_branches, model, curve_source)


_SETTINGS_DEFAULTS = {f.name: f.default for f in fields(P.Settings) if f.name not in ("thresh", "retention_ratio", "K")}


def extra_options(settings: P.Settings) -> dict:
    """The Settings fields beyond thresh/retention/K that differ from their defaults."""
    return {k: getattr(settings, k) for k, d in _SETTINGS_DEFAULTS.items() if getattr(settings, k) != d}


def _float_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


# --------------------------------------------------------------------------------------------------
# (a) ComfyUI-MagCache node values
# --------------------------------------------------------------------------------------------------
# our preset -> ComfyUI-MagCache model_type (the MagCache node's menu in its nodes.py), with a note where it is not
# the same curve. Presets missing here have no model_type in the node.
_COMFYUI_TYPES: dict[str, tuple[str, str]] = {
    "flux": ("flux", ""),
    "flux_kontext": ("flux_kontext", "the node's flux_kontext curve is its own 20-step ComfyUI calibration, not the "
                                     "28-step diffusers curve used here"),
    "flux_kontext_comfyui": ("flux_kontext", ""),
    "chroma": ("chroma", ""),
    "hunyuan_video": ("hunyuan_video", ""),
    "hunyuan_video_544p": ("hunyuan_video", "the node only ships the 720p HunyuanVideo curve"),
    "wan2.1_t2v_1.3B": ("wan2.1_t2v_1.3B", ""),
    "wan2.1_t2v_14B": ("wan2.1_t2v_14B", ""),
    "wan2.1_i2v_480p_14B": ("wan2.1_i2v_480p_14B", ""),
    "wan2.1_i2v_720p_14B": ("wan2.1_i2v_720p_14B", ""),
    "wan2.1_vace_1.3B": ("wan2.1_vace_1.3B", ""),
    "wan2.1_vace_14B": ("wan2.1_vace_14B", ""),
    "qwen_image": ("qwen_image", ""),
    "qwen_image_diffusers": ("qwen_image", "the node's qwen_image curve is the ComfyUI calibration, not the "
                                           "diffusers one used here"),
    "hunyuan_video1.5": ("hunyuan_video1.5", ""),
    "hunyuan_video1.5_40steps": ("hunyuan_video1.5", "the node switches to its 40-step curve above 20 steps"),
}
# Widget ranges of the node (ComfyUI-MagCache's nodes.py, version 1.6.1).
_COMFYUI_RANGES = {"magcache_thresh": (0.0, 0.3), "retention_ratio": (0.1, 0.3), "magcache_K": (0, 6),
                   "start_step": (0, 100), "end_step": (-100, 100)}


@dataclass(frozen=True)
class ComfyExport:
    values: dict  # widget name -> value; model_type is None when the node has no entry for this model
    notes: list[str]

    def text(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.values.items()]
        return "\n".join(lines + [f"# {n}" for n in self.notes]) + "\n"


def comfyui_values(snapshot: SettingsSnapshot) -> ComfyExport:
    s = snapshot.settings
    model_type, type_note = _COMFYUI_TYPES.get(snapshot.preset, (None, ""))
    notes = []
    if model_type is None:
        notes.append(f"ComfyUI-MagCache has no model_type for preset {snapshot.preset!r}: the node cannot run this "
                     "model; use the Python snippet instead.")
    elif type_note:
        notes.append(f"model_type {model_type}: {type_note}.")
    end_step = s.end_step
    if s.protect_last_steps:
        # the node has no "protect last steps"; ending the window earlier is the same thing
        end_step = min(end_step, -1 - s.protect_last_steps) if end_step < 0 else min(end_step, snapshot.num_steps - 1 - s.protect_last_steps)
        notes.append(f"protect_last_steps={s.protect_last_steps} is expressed as end_step={end_step}.")
    values = {"model_type": model_type, "magcache_thresh": s.thresh, "retention_ratio": s.retention_ratio,
              "magcache_K": s.K, "start_step": s.start_step, "end_step": end_step}
    for name, (low, high) in _COMFYUI_RANGES.items():
        if not low <= values[name] <= high:
            notes.append(f"{name}={values[name]} is outside the node's widget range [{low}, {high}].")
    if round(s.thresh, 2) != s.thresh:
        notes.append(f"the node's thresh widget moves in steps of 0.01; type {s.thresh} in or expect {round(s.thresh, 2)}.")
    if snapshot.custom_curves:
        notes.append("the node always uses its built-in ratio curve for model_type; this calibrated curve cannot be "
                     "set in the node (ComfyUI-MagCache only takes curves by editing nodes.py).")
    if s.sqrt_ratios:
        notes.append("sqrt-smoothed ratios are not available in the node; it uses the raw curve.")
    notes.append("the node applies its own rules (comparison '<' for FLUX/HunyuanVideo/Chroma, '<=' for Wan; "
                 "retention floor(R*N) on steps; batched Wan CFG skips both branches when either says skip), so its "
                 "schedule can differ by a step from the one previewed here.")
    return ComfyExport(values, notes)


# --------------------------------------------------------------------------------------------------
# (b) magcache Python snippet
# --------------------------------------------------------------------------------------------------
def _rules_source(rules: P.Rules) -> str:
    defaults = P.Rules()
    args = [f"{f.name}={getattr(rules, f.name)!r}" for f in fields(P.Rules) if getattr(rules, f.name) != getattr(defaults, f.name)]
    return f"magcache.Rules({', '.join(args)})"


def python_snippet(snapshot: SettingsSnapshot, pipe_name: str = "pipe") -> str:
    """A ``magcache.apply`` call that gives the same schedule as ``snapshot``."""
    s = snapshot.settings
    lines = [f'preset="{snapshot.preset}",', f"thresh={s.thresh!r},", f"retention_ratio={s.retention_ratio!r},",
             f"K={s.K},"]
    lines += [f"{k}={v!r}," for k, v in extra_options(s).items()]
    if snapshot.custom_curves:
        names = ", ".join(P.branch_name(i) for i in range(len(snapshot.effective_curves)))
        source = f" ({snapshot.curve_source})" if snapshot.curve_source else ""
        lines.append(f"# ratio curve{source}, one list per branch: {names}")
        lines.append("curves=[")
        lines += [f"    {_float_list(c)}," for c in snapshot.effective_curves]
        lines.append("],")
    if snapshot.custom_rules:
        lines.append(f"rules={_rules_source(snapshot.effective_rules)},")
    sched = snapshot.schedule()
    computed = ", ".join(f"{b} {len(v)}/{snapshot.num_steps}" for b, v in sched.computed.items())
    body = "".join(f"    {line}\n" for line in lines)
    return (f"import magcache\n\n"
            f"# {snapshot.num_steps} steps: computes {computed}, predicted {sched.predicted_speedup():.2f}x block speed-up\n"
            f"handle = magcache.apply(\n    {pipe_name},\n{body})\n"
            f"# after a run: print(handle.last_run.summary())\n")


# --------------------------------------------------------------------------------------------------
# (c) diffusers MagCacheConfig snippet
# --------------------------------------------------------------------------------------------------
_CHROMA_REGISTRATION = """\
# diffusers does not register Chroma's block classes: without this, enable_cache raises
# "Model class ... not registered."
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformerBlock

TransformerBlockRegistry.register(
    ChromaTransformerBlock, TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0))
TransformerBlockRegistry.register(
    ChromaSingleTransformerBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None))

"""


@dataclass(frozen=True)
class DiffusersExport:
    code: str
    caveats: list[str]

    def text(self) -> str:
        return self.code + "".join(f"# CAVEAT: {c}\n" for c in self.caveats)


def diffusers_caveats(snapshot: SettingsSnapshot) -> list[str]:
    """Where diffusers' built-in MagCache (0.42.1) does not do what our runtime does for this model and settings."""
    p = snapshot.preset_record
    family, rules, s = p.family, snapshot.effective_rules, snapshot.settings
    out = []
    if family == "chroma":
        out.append("Chroma: diffusers does not register Chroma's blocks (the snippet registers them), and ChromaPipeline "
                   "has no cache_context, so with CFG (guidance_scale > 1, the default 5.0) cond and uncond share one "
                   "MagCache state: the counter advances twice per step and uncond reuses cond's residual. Use the "
                   "built-in only without CFG.")
    if family == "flux" and p.id.startswith("flux_kontext"):
        out.append("FLUX Kontext: FluxKontextPipeline has no cache_context, so true CFG (true_cfg_scale > 1 with a "
                   "negative prompt) shares one state between cond and uncond. Use it only without true CFG.")
    if family == "framepack":
        out.append("FramePack: the pipeline has no cache_context, so true CFG shares one state; num_inference_steps "
                   "must be the steps of one section (the state resets after each section).")
    if family == "wan_vace":
        out.append("Wan VACE: diffusers hooks only `blocks`; on a skipped step the VACE hints are added again on top of "
                   "input + cached residual (which already holds them), so skipped steps are numerically wrong, and "
                   "vace_blocks still run every step. Do not use the built-in for VACE.")
    if snapshot.branches > 1 or len(snapshot.effective_curves) > 1:
        out.append("CFG: diffusers keeps one state per cache_context but takes one mag_ratios list, per branch and of "
                   "length num_inference_steps (a 2N interleaved list would be subsampled, mixing branches); the "
                   "uncond branch therefore uses the cond curve exported here.")
    if rules.guarded_steps:
        out.append(f"no step guard in diffusers: the reference never skips calibrated step(s) {list(rules.guarded_steps)} "
                   "(FLUX's dip at step 11); diffusers may skip it.")
    if rules.max_ratio_jump is not None:
        out.append(f"no ratio-jump guard in diffusers (the reference skips only where |1 - ratio| <= {rules.max_ratio_jump}).")
    if rules.first_step_computed:
        out.append("no first-step guard in diffusers (FramePack computes step 0 of every section).")
    if rules.step_mapping != "nearest" and n_differs(snapshot):
        out.append("diffusers resamples the curve with nearest_interp; this preset's reference maps steps with "
                   "ComfyUI's floor map, so at this step count the exported ratios differ from the ones used here.")
    if rules.compare != "<=" or rules.retention_rounding != "half_up" or rules.retention_per_call:
        ours = (f"comparison '{rules.compare}', retention {rules.retention_rounding}"
                f"{' over transformer calls' if rules.retention_per_call else ''}")
        out.append(f"diffusers compares accumulated error '<=' thresh and keeps int(R*N + 0.5) steps; this preset's "
                   f"reference uses {ours}, so the schedule can differ by a step.")
    if s.protect_last_steps or s.start_step or s.end_step != -1:
        out.append("protect_last_steps / start_step / end_step have no MagCacheConfig equivalent and are dropped.")
    if s.thresh == 0:
        out.append("thresh 0: diffusers still skips steps whose accumulated error is exactly 0; leave the cache off instead.")
    if s.sqrt_ratios:
        out.append("sqrt-smoothed ratios: the exported mag_ratios already hold the square roots.")
    out.append("num_inference_steps is fixed in the config: build a new config (disable_cache, enable_cache) when the "
               "step count changes.")
    out.append("no reset after an exception: a failed or interrupted run leaves a stale step counter and residual; "
               "call pipe.transformer._reset_stateful_cache() before each run.")
    out.append("torch.compile: the MagCache hooks wrap every block and are compiler-disabled, so no block gets compiled.")
    return out


def n_differs(snapshot: SettingsSnapshot) -> bool:
    return any(len(c) != snapshot.num_steps for c in snapshot.effective_curves)


def diffusers_snippet(snapshot: SettingsSnapshot, pipe_name: str = "pipe") -> DiffusersExport:
    s, n = snapshot.settings, snapshot.num_steps
    ratios = P.prepare_curves(snapshot.effective_curves[:1], n, s.sqrt_ratios)[0]
    source = snapshot.curve_source or f"preset {snapshot.preset}"
    code = "from diffusers import MagCacheConfig\n\n"
    if snapshot.preset_record.family == "chroma":
        code += _CHROMA_REGISTRATION
    code += (f"# cond curve ({source}) resampled to {n} steps with nearest_interp\n"
             f"mag_ratios = {_float_list(ratios)}\n"
             f"config = MagCacheConfig(\n"
             f"    threshold={s.thresh!r},\n    max_skip_steps={s.K},\n    retention_ratio={s.retention_ratio!r},\n"
             f"    num_inference_steps={n},\n    mag_ratios=mag_ratios,\n)\n"
             f"{pipe_name}.transformer.enable_cache(config)\n"
             f"{pipe_name}.transformer._reset_stateful_cache()  # before every run: diffusers keeps state after errors\n")
    return DiffusersExport(code, diffusers_caveats(snapshot))


# --------------------------------------------------------------------------------------------------
# (d) JSON file, and loading it back
# --------------------------------------------------------------------------------------------------
def settings_json(snapshot: SettingsSnapshot) -> str:
    """A self-contained settings file: preset, settings, rules and the ratio curve(s) actually used."""
    curves = snapshot.effective_curves
    data = {
        "format": FORMAT,
        "version": VERSION,
        "preset": snapshot.preset,
        "model": snapshot.model,
        "num_steps": snapshot.num_steps,
        "num_branches": snapshot.branches,
        "settings": asdict(snapshot.settings),
        "rules": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(snapshot.effective_rules).items()},
        "curve_source": snapshot.curve_source or f"preset {snapshot.preset}",
        "curves": {P.branch_name(i): c for i, c in enumerate(curves)},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "comfyui": comfyui_values(snapshot).values,  # for reference; ignored when loading
    }
    return dumps_readable(data)


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _field_kinds(cls: type, required: Mapping[str, type]) -> dict[str, Any]:
    """Expected JSON type per dataclass field, read from the defaults (so fields added to the policy later are
    accepted without touching this file): ``None`` default means "number or null"."""
    kinds: dict[str, Any] = dict(required)
    for f in fields(cls):
        if f.name not in kinds:
            kinds[f.name] = None if f.default is None else type(f.default)
    return kinds


def _parse_fields(cls: type, data: Any, where: str, required: Mapping[str, type]) -> Any:
    kinds = _field_kinds(cls, required)
    if not isinstance(data, dict) or set(data) - set(kinds) or not set(required) <= set(data):
        need = f" with {', '.join(required)}" if required else ""
        raise ValueError(f"{where} must be an object{need} (fields: {', '.join(kinds)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = kinds[key]
        if kind is None:  # optional number
            values[key] = None if value is None else _typed(value, float, f"{where}.{key}")
        elif kind is tuple:  # tuples of step indices
            if not isinstance(value, list) or len(value) > 64 or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_STEPS for i in value):
                raise ValueError(f"{where}.{key} must be a short list of step indices")
            values[key] = tuple(value)
        else:
            values[key] = _typed(value, kind, f"{where}.{key}")
        if isinstance(values[key], (int, float)) and not isinstance(values[key], bool) and abs(values[key]) > 10 * MAX_STEPS:
            raise ValueError(f"{where}.{key} = {values[key]} is out of range")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _parse_settings(data: Any) -> P.Settings:
    return _parse_fields(P.Settings, data, "settings", {"thresh": float, "retention_ratio": float, "K": int})


def _parse_rules(data: Any) -> P.Rules:
    return _parse_fields(P.Rules, data, "rules", {})


def _parse_curve(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_STEPS * 2:
        raise ValueError(f"{where} must be a list of 2 to {MAX_STEPS * 2} ratios")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= MAX_RATIO:
            raise ValueError(f"{where}[{i}] = {v!r} is not a finite ratio in (0, {MAX_RATIO:g}]")
    return tuple(float(v) for v in value)


def load_settings_json(text: str | bytes) -> SettingsSnapshot:
    """Validate a settings file from :func:`settings_json` and restore the snapshot. Raises ``ValueError``
    naming the bad field."""
    data = load_json_text(text, "settings file")
    check_header(data, FORMAT, VERSION, _TOP_KEYS, "MagCache Studio settings file")
    preset_id = check_preset_id(data.get("preset"))
    n = data.get("num_steps")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_STEPS:
        raise ValueError(f"num_steps must be an integer between 1 and {MAX_STEPS}, got {n!r}")
    branches = data.get("num_branches", None)
    if branches is not None and (isinstance(branches, bool) or branches not in (1, 2)):
        raise ValueError(f"num_branches must be 1 or 2, got {branches!r}")
    model = data.get("model", "")
    if model:
        check_model_name(model)
    elif not isinstance(model, str):
        raise ValueError("model must be a string")
    source = data.get("curve_source", "")
    if not isinstance(source, str) or len(source) > 2000:
        raise ValueError("curve_source must be a string of at most 2000 characters")
    curves_data = data.get("curves")
    if curves_data is None:
        curves = None
    else:
        if not isinstance(curves_data, dict) or "cond" not in curves_data or set(curves_data) - {"cond", "uncond"}:
            raise ValueError("curves must be an object with 'cond' (and optionally 'uncond')")
        curves = tuple(_parse_curve(curves_data[b], f"curves.{b}") for b in P.BRANCH_NAMES if b in curves_data)
    settings = _parse_settings(data.get("settings"))
    rules = _parse_rules(data["rules"]) if data.get("rules") is not None else None
    snapshot = SettingsSnapshot(preset_id, settings, n, curves, rules, branches, model, source)
    snapshot.schedule()  # the restored settings must simulate (e.g. sqrt of the curve, window)
    return snapshot


def export_all(snapshot: SettingsSnapshot) -> dict[str, str]:
    """All four exports as text, for the app's export panel."""
    return {
        "comfyui": comfyui_values(snapshot).text(),
        "python": python_snippet(snapshot),
        "diffusers": diffusers_snippet(snapshot).text(),
        "json": settings_json(snapshot),
    }
