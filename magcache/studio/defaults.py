"""What a tab's inputs show before anything runs: the catalog's generation settings and MagCache sliders, small
sizes for tiny pipelines, the demo model's own settings for the Demo tab."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from magcache.presets import get_preset

from .manager import LoadPlan, ModelManager

TINY_STEPS = 12  # default steps with tiny pipelines: a few skips show at every preset's defaults


def tab_defaults(manager: ModelManager, tab_id: str, variant: str | None = None,
                 plan: LoadPlan | None = None) -> dict[str, Any]:
    """Generation settings and MagCache sliders for a tab/variant as the UI shows them: the reference settings
    for real models, small sizes for tiny pipelines, the demo model's own settings for the Demo tab. ``plan``: the
    request's model plan when the caller has made it (else the variant's default plan is made here)."""
    tab = manager.catalog.tab(tab_id)
    v = tab.variant(variant)
    out = dict(v.defaults)
    if plan is None:
        try:
            plan = manager.plan(tab.id, v.id)
        except Exception:  # a bad path in the environment: the error shows when the user runs the tab
            plan = None
    preset_id = plan.preset if plan is not None else v.magcache.preset
    if plan is not None and plan.kind == "tiny":
        from .tiny import tiny_call_kwargs

        tiny = tiny_call_kwargs(tab.tiny, TINY_STEPS)
        out.update({k: tiny[k] for k in ("height", "width", "num_frames") if k in tiny}, num_inference_steps=TINY_STEPS)
        if tab.task == "framepack":
            out["latent_window_size"] = tiny["latent_window_size"]
    elif plan is not None and v.local_only and plan.pipeline_source:
        stored = demo_settings(plan.pipeline_source)
        stored.pop("call", None)
        out.update(stored)
    if tab.task == "framepack":
        out.setdefault("latent_window_size", v.call.get("latent_window_size", 9))
    p = get_preset(preset_id)
    mc = v.magcache
    use_catalog = preset_id == mc.preset and mc.thresh is not None
    out.update(
        preset=preset_id,
        thresh=mc.thresh if use_catalog else p.thresh,
        retention_ratio=mc.retention_ratio if use_catalog else p.retention_ratio,
        K=mc.K if use_catalog else p.K,
        calibrated_steps=p.calibrated_steps,
    )
    return out


def demo_settings(folder: str) -> dict[str, Any]:
    """Settings stored next to the demo model (``demo_settings.json``, written by its training): UI defaults
    (size, steps, guidance, seed, example prompts), under ``"call"`` fixed pipeline arguments, and for a model
    trained to read plain English ``prompt_words``, the words it learned."""
    path = Path(folder) / "demo_settings.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {k: raw[k] for k in ("prompt", "height", "width", "num_inference_steps", "seed") if k in raw}
    guidance = raw.get("true_cfg_scale", raw.get("guidance_scale"))
    if guidance is not None:
        out["guidance_scale"] = guidance  # the Guidance input; the tab's guidance_arg says which argument it sets
    out["call"] = {k: raw[k] for k in ("negative_prompt", "max_sequence_length") if k in raw}
    if isinstance(raw.get("prompt_words"), list):  # a model that reads plain English: the words it learned
        out["prompt_words"] = frozenset(raw["prompt_words"])
    examples = raw.get("example_prompts") or raw.get("prompts") or raw.get("examples")
    if isinstance(examples, list) and examples:
        out["examples"] = [str(p) for p in examples]
        out.setdefault("prompt", out["examples"][0])
    return out


def framepack_sections(num_frames: int, latent_window_size: int = 9, temporal_factor: int = 4) -> int:
    """How many sections (full denoising runs) FramePack makes for ``num_frames`` (its pipeline's formula)."""
    window = (latent_window_size - 1) * temporal_factor + 1
    return max(1, (num_frames + window - 1) // window)
