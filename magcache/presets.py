"""Published MagCache ratio curves, their reference defaults and the rule set each reference applies.

The curves live in ``magcache/data/mag_ratios.json`` (the published curves, each with its source). Preset ids equal
the keys of that file, except where our runtime drives the diffusers pipeline a curve was not calibrated with:
``flux_kontext`` names the 28-step diffusers curve (``flux_kontext_diffusers``), ``qwen_image`` the research code's
diffusers curve (``qwen_image_diffusers``) and ``qwen_image_comfyui`` ComfyUI-MagCache's (``qwen_image``); the
Wan2.2 A14B presets use ComfyUI-MagCache's names (``wan2.2_t2v_14B``, ``wan2.2_i2v_14B``). Extra curves (the demo
model's calibration) live next to it as ``magcache/data/<id>.json`` in the same format. FLUX.2 and Z-Image have no
published curve: their presets carry only rules and starting values, and MagCache stays off on them until a
calibration exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Mapping

from .policy import Rules, Settings, reference_split_step, split_branches

# Rule sets of the reference implementations: MC_* are the MagCache research code's (one repository per model
# family), COMFYUI is ComfyUI-MagCache's.
MC_FLUX = Rules(compare="<=", retention_rounding="half_up", guarded_steps=(11,), guard_reference_steps=28)
MC_HUNYUAN = Rules(compare="<=", retention_rounding="floor")
MC_WAN = Rules(compare="<", retention_rounding="floor", retention_per_call=True)
MC_FRAMEPACK = Rules(compare="<=", retention_rounding="floor", first_step_computed=True, max_ratio_jump=0.06)
COMFYUI = Rules(compare="<", retention_rounding="floor")
# ComfyUI's FLUX forward (also used for Kontext): calibrated step 11 is checked before accumulating, and the run's
# steps index the curve by ComfyUI's floor map; 20 = length of the ComfyUI Kontext curve.
COMFYUI_FLUX_KONTEXT = Rules(compare="<", retention_rounding="floor", guarded_steps=(11,), guard_reference_steps=20,
                             guard_accumulates=False, step_mapping="floor")
# Our own calibrations: FLUX-style rules without the step-11 guard (that guard is specific to FLUX.1-dev's curve).
CALIBRATED_FLUX = Rules(compare="<=", retention_rounding="half_up")
# The research Wan2.2 code: Wan's call-counted rule, with the retention window per expert phase (T2V A14B) or over
# the whole high-noise phase (I2V A14B); TI2V-5B is one model and uses MC_WAN.
MC_WAN22_T2V = replace(MC_WAN, expert_retention="each_phase", expert_boundary=0.875, expert_flow_shift=12.0)
MC_WAN22_I2V = replace(MC_WAN, expert_retention="high_phase", expert_boundary=0.900, expert_flow_shift=5.0)
# The research Qwen-Image / Qwen-Image-Edit code: Wan's call-counted rule, its own resampling.
MC_QWEN = replace(MC_WAN, step_mapping="linspace")
# ComfyUI-MagCache with separate cond/uncond calls, uncond first (the only mode its Qwen-Image and HunyuanVideo-1.5
# curves were calibrated in): float32 accumulation, the uncond residual of step 0 wiped by the per-call reset.
# Qwen-Image indexes its curve by the raw call counter (uncond one step behind); HunyuanVideo-1.5 maps steps with
# the floor map.
COMFYUI_QWEN = replace(COMFYUI, step_mapping="raw", uncond_lags_one_step=True, uncond_loses_first_residual=True,
                       float32=True)
COMFYUI_HUNYUAN15 = replace(COMFYUI, step_mapping="floor", uncond_loses_first_residual=True, float32=True)

# preset id -> (key in mag_ratios.json, adapter family, rules, rules' source). Families name the adapters in
# magcache/adapters; None means we ship the curve but have no adapter for that architecture yet.
_CATALOG: dict[str, tuple[str, str | None, Rules, str]] = {
    "flux": ("flux", "flux", MC_FLUX, "MagCache4FLUX (research code)"),
    "flux_kontext": ("flux_kontext_diffusers", "flux", MC_FLUX, "MagCache4FLUX_Kontext (research code)"),
    "flux_kontext_comfyui": ("flux_kontext_comfyui", "flux", COMFYUI_FLUX_KONTEXT, "ComfyUI-MagCache (flux forward)"),
    "chroma": ("chroma", "chroma", COMFYUI, "ComfyUI-MagCache"),
    "hunyuan_video": ("hunyuan_video", "hunyuan_video", MC_HUNYUAN, "MagCache4HunyuanVideo (research code)"),
    "hunyuan_video_544p": ("hunyuan_video_544p", "hunyuan_video", MC_HUNYUAN, "MagCache4HunyuanVideo"),
    "wan2.1_t2v_1.3B": ("wan2.1_t2v_1.3B", "wan", MC_WAN, "MagCache4Wan2.1 (research code)"),
    "wan2.1_t2v_14B": ("wan2.1_t2v_14B", "wan", MC_WAN, "MagCache4Wan2.1 (research code)"),
    "wan2.1_i2v_480p_14B": ("wan2.1_i2v_480p_14B", "wan", MC_WAN, "MagCache4Wan2.1 (research code)"),
    "wan2.1_i2v_720p_14B": ("wan2.1_i2v_720p_14B", "wan", MC_WAN, "MagCache4Wan2.1 (research code)"),
    "wan2.1_vace_1.3B": ("wan2.1_vace_1.3B", "wan_vace", MC_WAN, "MagCache4Wan2.1 VACE (research code)"),
    "wan2.1_vace_14B": ("wan2.1_vace_14B", "wan_vace", MC_WAN, "MagCache4Wan2.1 VACE (research code)"),
    "framepack": ("framepack", "framepack", MC_FRAMEPACK, "MagCache4FramePack (research code)"),
    "framepack_f1": ("framepack_f1", "framepack", MC_FRAMEPACK, "MagCache4FramePack F1 (research code)"),
    "qwen_image": ("qwen_image_diffusers", "qwen_image", MC_QWEN, "MagCache4QwenImage (research code)"),
    "qwen_image_edit": ("qwen_image_edit", "qwen_image", MC_QWEN, "MagCache4QwenImageEdit (research code)"),
    "qwen_image_comfyui": ("qwen_image", "qwen_image", COMFYUI_QWEN,
                           "ComfyUI-MagCache (Qwen-Image forward; separate calls, uncond first)"),
    "hunyuan_video1.5": ("hunyuan_video1.5", "hunyuan_video15", COMFYUI_HUNYUAN15,
                         "ComfyUI-MagCache (HunyuanVideo-1.5 forward; separate calls, uncond first)"),
    "hunyuan_video1.5_40steps": ("hunyuan_video1.5_40steps", "hunyuan_video15", COMFYUI_HUNYUAN15,
                                 "ComfyUI-MagCache (HunyuanVideo-1.5 forward; separate calls, uncond first)"),
    "wan2.2_t2v_14B": ("wan2.2_t2v_A14B", "wan", MC_WAN22_T2V, "MagCache4Wan2.2 T2V-A14B (research code)"),
    "wan2.2_i2v_14B": ("wan2.2_i2v_A14B", "wan", MC_WAN22_I2V, "MagCache4Wan2.2 I2V-A14B (research code)"),
    "wan2.2_ti2v_5B": ("wan2.2_ti2v_5B", "wan", MC_WAN, "MagCache4Wan2.2 TI2V-5B (research code)"),
    "wan2.2_ti2v_5B_i2v": ("wan2.2_ti2v_5B_i2v", "wan", MC_WAN, "MagCache4Wan2.2 TI2V-5B with an image (research code)"),
}

# Reference values that differ from the curve file's entry: the 40-step HunyuanVideo-1.5 workflow ComfyUI-MagCache
# links from its README (the file's entry repeats the 20-step README row), and both HunyuanVideo-1.5 workflows'
# end_step -2 (a ComfyUI-only knob).
_DEFAULTS: dict[str, dict[str, float]] = {"hunyuan_video1.5_40steps": {"thresh": 0.06, "retention_ratio": 0.2, "K": 2}}
_OPTIONS: dict[str, dict[str, int]] = {"hunyuan_video1.5": {"end_step": -2}, "hunyuan_video1.5_40steps": {"end_step": -2}}
# ComfyUI-MagCache's HunyuanVideo-1.5 node replaces the 20-step curve by the 40-step one above 20 steps.
_LONG_CURVES: dict[str, tuple[str, int]] = {"hunyuan_video1.5": ("hunyuan_video1.5_40steps", 20)}


# Models without a published curve: MagCache stays off on them until a calibration of that model exists (see
# magcache.calibration). id -> (model, family, rules, starting thresh / retention_ratio / K for a calibrated curve).
_CALIBRATE_FIRST: dict[str, tuple[str, str, Rules, tuple[float, float, int]]] = {
    "flux2": ("FLUX.2-dev (no published curve: calibrate first)", "flux2", CALIBRATED_FLUX, (0.1, 0.2, 2)),
    "flux2_klein": ("FLUX.2-klein (no published curve: calibrate first)", "flux2", CALIBRATED_FLUX, (0.1, 0.2, 2)),
    "z_image": ("Z-Image (no published curve: calibrate first)", "z_image", CALIBRATED_FLUX, (0.1, 0.2, 2)),
}

# Presets stored as their own files in magcache/data (calibrated by us), with their family and rules.
_EXTRA_FILES: dict[str, tuple[str, Rules]] = {"demo": ("flux", CALIBRATED_FLUX)}


@dataclass(frozen=True)
class Preset:
    id: str
    model: str
    family: str | None
    curves: tuple[tuple[float, ...], ...]  # per branch: (cond,) or (cond, uncond)
    calibrated_steps: int
    thresh: float
    retention_ratio: float
    K: int
    rules: Rules
    rules_source: str
    source: str
    notes: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)  # reference values of other Settings fields
    long_curves: tuple[tuple[float, ...], ...] = ()  # replaces ``curves`` for runs longer than long_curves_above
    long_curves_above: int = 0

    @property
    def interleaved(self) -> bool:
        return len(self.curves) > 1

    @property
    def calibrate_first(self) -> bool:
        """No published curve: MagCache is off on this model until a calibration of it exists."""
        return not self.curves

    @property
    def cos_curves(self) -> tuple[tuple[float, ...], ...] | None:
        """Per-branch cosine distances between consecutive residuals, where the calibration recorded them (our own
        calibrations do; the published curves do not)."""
        cos = self.extra.get("cos_dis")
        if not cos:
            return None
        return tuple(tuple(c) for c in split_branches(cos, self.interleaved))

    def settings(self, **overrides) -> Settings:
        """Reference defaults, with any non-None overrides."""
        values = {"thresh": self.thresh, "retention_ratio": self.retention_ratio, "K": self.K, **self.options}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)

    def require_curves(self) -> None:
        if self.calibrate_first:
            raise ValueError(f"preset {self.id!r} has no published ratio curve: calibrate the model first "
                             "(python -m magcache calibrate, or magcache.measure.calibrate)")

    def curves_for(self, num_steps: int) -> tuple[tuple[float, ...], ...]:
        """The curve a run of ``num_steps`` uses (HunyuanVideo-1.5 switches to its 40-step curve above 20)."""
        self.require_curves()
        return self.long_curves if self.long_curves and num_steps > self.long_curves_above else self.curves

    def split_step(self, num_steps: int) -> int | None:
        """Steps the high-noise expert runs with the reference sampler (two-expert presets), else None."""
        return reference_split_step(self.rules, num_steps)

    def summary(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "family": self.family,
            "calibrated_steps": self.calibrated_steps,
            "calibrate_first": self.calibrate_first,
            "cfg_branches": len(self.curves),
            "defaults": {"thresh": self.thresh, "retention_ratio": self.retention_ratio, "K": self.K},
            "rules_source": self.rules_source,
            "source": self.source,
        }


def _read_json(name: str) -> dict:
    return json.loads(resources.files("magcache.data").joinpath(name).read_text(encoding="utf-8"))


def _preset_from_entry(pid: str, entry: Mapping, family: str | None, rules: Rules, rules_source: str) -> Preset:
    d = entry["defaults"]
    curves = split_branches(entry["mag_ratios"], bool(entry.get("cfg_interleaved")))
    notes = " ".join(str(entry[k]) for k in ("notes", "extra_skip_condition") if entry.get(k))
    return Preset(
        id=pid,
        model=entry.get("model", pid),
        family=family,
        curves=tuple(tuple(c) for c in curves),
        calibrated_steps=int(entry["num_steps"]),
        thresh=float(d["magcache_thresh"]),
        retention_ratio=float(d["retention_ratio"]),
        K=int(d["magcache_K"]),
        rules=rules,
        rules_source=rules_source,
        source=entry.get("source", ""),
        notes=notes,
        extra={k: v for k, v in entry.items() if k not in ("mag_ratios", "defaults")},
    )


def _published_preset(pid: str, data: Mapping) -> Preset:
    key, family, rules, source = _CATALOG[pid]
    p = _preset_from_entry(pid, data[key], family, rules, source)
    changes: dict = {"options": _OPTIONS.get(pid, {})}
    if pid in _DEFAULTS:
        changes.update(thresh=_DEFAULTS[pid]["thresh"], retention_ratio=_DEFAULTS[pid]["retention_ratio"],
                       K=int(_DEFAULTS[pid]["K"]))
    if pid in _LONG_CURVES:
        long_id, above = _LONG_CURVES[pid]
        long_entry = data[_CATALOG[long_id][0]]
        changes.update(long_curves=tuple(tuple(c) for c in split_branches(long_entry["mag_ratios"], True)),
                       long_curves_above=above)
    return replace(p, **changes)


def _calibrate_first_preset(pid: str) -> Preset:
    model, family, rules, (thresh, retention, K) = _CALIBRATE_FIRST[pid]
    return Preset(id=pid, model=model, family=family, curves=(), calibrated_steps=0, thresh=thresh,
                  retention_ratio=retention, K=K, rules=rules,
                  rules_source="MagCache Studio calibration (FLUX rules without the step-11 guard)", source="",
                  notes="No published MagCache curve exists for this model; the thresh/retention/K are starting "
                        "values for a calibrated curve, to be tuned.")


@lru_cache(maxsize=1)
def _all_presets() -> dict[str, Preset]:
    data = _read_json("mag_ratios.json")
    out = {pid: _published_preset(pid, data) for pid in _CATALOG}
    out.update({pid: _calibrate_first_preset(pid) for pid in _CALIBRATE_FIRST})
    for pid, (fam, rules) in _EXTRA_FILES.items():
        try:
            entry = _read_json(f"{pid}.json")
        except FileNotFoundError:
            continue
        out[pid] = _preset_from_entry(pid, entry, fam, rules, "MagCache Studio calibration (FLUX rules without the step-11 guard)")
    return out


def get_preset(preset_id: str) -> Preset:
    presets = _all_presets()
    if preset_id not in presets:
        raise KeyError(f"unknown MagCache preset {preset_id!r}; known presets: {', '.join(sorted(presets))}")
    return presets[preset_id]


def list_presets(with_adapter_only: bool = False) -> list[str]:
    return [p for p, v in _all_presets().items() if v.family or not with_adapter_only]
