"""Published MagCache ratio curves, their reference defaults and the rule set each reference applies.

The curves live in ``magcache/data/mag_ratios.json`` (the published curves, each with its source). Preset ids equal the keys of that file, except ``flux_kontext``, which names the 28-step
diffusers curve (``flux_kontext_diffusers``) because our runtime drives diffusers pipelines. Extra curves (the demo
model's calibration) live next to it as ``magcache/data/<id>.json`` in the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Mapping

from .policy import Rules, Settings, split_branches

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
    "qwen_image": ("qwen_image", None, COMFYUI, "ComfyUI-MagCache"),
    "qwen_image_diffusers": ("qwen_image_diffusers", None, MC_WAN, "MagCache4QwenImage (research code)"),
    "hunyuan_video1.5": ("hunyuan_video1.5", None, COMFYUI, "ComfyUI-MagCache"),
    "hunyuan_video1.5_40steps": ("hunyuan_video1.5_40steps", None, COMFYUI, "ComfyUI-MagCache"),
    "wan2.2_t2v_A14B": ("wan2.2_t2v_A14B", None, MC_WAN, "MagCache4Wan2.2 (research code)"),
    "wan2.2_ti2v_5B": ("wan2.2_ti2v_5B", None, MC_WAN, "MagCache4Wan2.2 (research code)"),
    "wan2.2_ti2v_5B_i2v": ("wan2.2_ti2v_5B_i2v", None, MC_WAN, "MagCache4Wan2.2 (research code)"),
    "wan2.2_i2v_A14B": ("wan2.2_i2v_A14B", None, MC_WAN, "MagCache4Wan2.2 (research code)"),
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

    @property
    def interleaved(self) -> bool:
        return len(self.curves) > 1

    def settings(self, **overrides) -> Settings:
        """Reference defaults, with any non-None overrides."""
        values = {"thresh": self.thresh, "retention_ratio": self.retention_ratio, "K": self.K}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)

    def summary(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "family": self.family,
            "calibrated_steps": self.calibrated_steps,
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


@lru_cache(maxsize=1)
def _all_presets() -> dict[str, Preset]:
    data = _read_json("mag_ratios.json")
    out = {pid: _preset_from_entry(pid, data[key], fam, rules, src) for pid, (key, fam, rules, src) in _CATALOG.items()}
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
