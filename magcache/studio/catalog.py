"""The app's tab catalog: ``presets.json`` (one entry per tab, one or more variants per tab) read into small
frozen dataclasses, plus the switches that change what a tab loads (``MAGCACHE_TINY``, the demo model folder).

``presets.json`` says which tabs the app has, which models they load and their default settings; the ratio curves
themselves are the library's presets (:mod:`magcache.presets`), which a tab names by id. The file sits at the top
of the repository and is installed with the package as a data file (``<prefix>/share/magcache-studio/``), so
:func:`catalog_file` finds it in a checkout and in an installed package alike.

No Gradio, no torch: the manager, the comparison code, the UI and the tests all read the catalog from here.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[2]
CATALOG_NAME = "presets.json"
INSTALLED_DATA = Path("share") / "magcache-studio"  # where pyproject.toml's data-files puts it, under sys.prefix
DEMO_MODEL_DIR = ROOT / "assets" / "demo_model"

TASKS = ("text-to-image", "image-edit", "text-to-video", "image-to-video", "vace", "framepack")
VIDEO_TASKS = ("text-to-video", "image-to-video", "vace", "framepack")
# Generation settings a variant may set; anything else in "defaults" is rejected so typos surface.
DEFAULT_KEYS = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "seed")
INPUTS = ("prompt", "negative_prompt", "image", "control_video", "mask_video", "reference_images", "size", "frames",
          "steps", "guidance", "seed")


def tiny_mode() -> bool:
    """``MAGCACHE_TINY=1``: every tab runs a tiny random-weight pipeline built in code (offline, CPU, seconds)."""
    return os.environ.get("MAGCACHE_TINY", "").strip().lower() in ("1", "true", "yes", "on")


def env_key(variant_id: str) -> str:
    """``wan_t2v_1_3b`` -> ``WAN_T2V_1_3B``, the suffix of the variant's environment variables."""
    return "".join(c if c.isalnum() else "_" for c in variant_id).upper()


@dataclass(frozen=True)
class MagCacheDefaults:
    preset: str
    thresh: float | None
    retention_ratio: float | None
    K: int | None
    fallback_preset: str | None = None  # used when ``preset`` is not shipped (the demo before its calibration)


@dataclass(frozen=True)
class Component:
    """A pipeline component loaded on its own (FramePack's SigLIP image encoder, for instance)."""

    cls: str  # "transformers.SiglipVisionModel" or a diffusers class name
    source: str
    subfolder: str | None = None


@dataclass(frozen=True)
class Variant:
    id: str
    label: str
    weights: str  # hub id or local path: the pipeline, or the transformer when weights_role == "transformer"
    magcache: MagCacheDefaults
    defaults: Mapping[str, Any]  # tab defaults merged with the variant's own
    call: Mapping[str, Any] = field(default_factory=dict)  # fixed extra pipeline arguments
    weights_role: str = "pipeline"
    base: str | None = None  # the rest of the pipeline when weights is a transformer (or a single file)
    components: Mapping[str, Component] = field(default_factory=dict)
    gated: bool = False
    local_only: bool = False
    # "demo_shapes": the demo model draws only shapes; a prompt with words its model never learned (all but the
    # grammar's for a grammar-only model) is read into its caption grammar first (magcache.studio.demo.prompts), and
    # the result says how it was read
    prompt_reader: str | None = None
    approx_size_gb: float | None = None
    transformer_gb: float | None = None

    @property
    def env_weights(self) -> str:
        return f"MAGCACHE_WEIGHTS_{env_key(self.id)}"

    @property
    def env_base(self) -> str:
        return f"MAGCACHE_BASE_{env_key(self.id)}"

    def weights_from_env(self) -> str | None:
        return os.environ.get(self.env_weights) or None

    def base_from_env(self) -> str | None:
        return os.environ.get(self.env_base) or None


@dataclass(frozen=True)
class Tab:
    id: str
    label: str
    task: str
    description: str
    pipeline: str
    transformer: str
    cfg: str  # "real": two transformer passes per step when guidance > 1; "distilled": one
    inputs: tuple[str, ...]
    tiny: str
    variants: tuple[Variant, ...]
    fps: int | None = None
    # the pipeline argument the Guidance input sets (Demo: true_cfg_scale); None where the pipeline takes none
    # (HunyuanVideo-1.5: its guider component holds the scale)
    guidance_arg: str | None = "guidance_scale"

    @property
    def is_video(self) -> bool:
        return self.task in VIDEO_TASKS

    def variant(self, key: str | None = None) -> Variant:
        """By id or label; the first variant when ``key`` is None."""
        if key is None:
            return self.variants[0]
        for v in self.variants:
            if key in (v.id, v.label):
                return v
        raise KeyError(f"tab {self.label!r} has no variant {key!r}; choose one of {', '.join(v.label for v in self.variants)}")

    def num_branches(self, guidance_scale: float | None) -> int:
        """Transformer passes per step: real CFG runs an unconditional pass when guidance > 1."""
        return 2 if self.cfg == "real" and guidance_scale is not None and guidance_scale > 1 else 1


@dataclass(frozen=True)
class Catalog:
    tabs: tuple[Tab, ...]

    def tab(self, tab_id: str) -> Tab:
        for t in self.tabs:
            if t.id == tab_id:
                return t
        raise KeyError(f"no tab {tab_id!r}; tabs: {', '.join(t.id for t in self.tabs)}")

    def variants(self) -> list[tuple[Tab, Variant]]:
        return [(t, v) for t in self.tabs for v in t.variants]


def catalog_file() -> Path:
    """The tab catalog to read: ``$MAGCACHE_PRESETS``, else the checkout's ``presets.json``, else the copy an
    installed package carries."""
    if os.environ.get("MAGCACHE_PRESETS"):
        return Path(os.environ["MAGCACHE_PRESETS"])
    candidates = [ROOT / CATALOG_NAME, Path(sys.prefix) / INSTALLED_DATA / CATALOG_NAME]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no tab catalog: looked for {' and '.join(map(str, candidates))}; set "
                                "MAGCACHE_PRESETS to a presets.json")
    return found


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """Read and validate a tab catalog (default: :func:`catalog_file`)."""
    path = Path(path) if path is not None else catalog_file()
    data = json.loads(path.read_text(encoding="utf-8"))
    return Catalog(tuple(_tab(entry) for entry in data["tabs"]))


def _tab(entry: Mapping[str, Any]) -> Tab:
    tid = entry["id"]
    if entry["task"] not in TASKS:
        raise ValueError(f"tab {tid!r}: unknown task {entry['task']!r}; tasks: {', '.join(TASKS)}")
    unknown = set(entry["inputs"]) - set(INPUTS)
    if unknown:
        raise ValueError(f"tab {tid!r}: unknown inputs {sorted(unknown)}; inputs: {', '.join(INPUTS)}")
    tab_defaults = _checked_defaults(tid, entry.get("defaults", {}))
    variants = []
    for v in entry["variants"]:
        mc = v["magcache"]
        variants.append(Variant(
            id=v["id"],
            label=v["label"],
            weights=v["weights"],
            magcache=MagCacheDefaults(mc["preset"], mc.get("thresh"), mc.get("retention_ratio"), mc.get("K"),
                                      mc.get("fallback_preset")),
            defaults={**tab_defaults, **_checked_defaults(v["id"], v.get("defaults", {}))},
            call={**entry.get("call", {}), **v.get("call", {})},
            weights_role=v.get("weights_role", "pipeline"),
            base=v.get("base"),
            components={name: Component(c["class"], c["source"], c.get("subfolder"))
                        for name, c in v.get("components", {}).items()},
            gated=bool(v.get("gated", False)),
            local_only=bool(v.get("local_only", False)),
            prompt_reader=_checked_reader(v["id"], v.get("prompt_reader")),
            approx_size_gb=v.get("approx_size_gb"),
            transformer_gb=v.get("transformer_gb"),
        ))
    if entry["cfg"] not in ("real", "distilled"):
        raise ValueError(f"tab {tid!r}: cfg must be 'real' or 'distilled'")
    return Tab(tid, entry["label"], entry["task"], entry.get("description", ""), entry["pipeline"], entry["transformer"],
               entry["cfg"], tuple(entry["inputs"]), entry["tiny"], tuple(variants), entry.get("fps"),
               entry.get("guidance_arg", "guidance_scale"))


PROMPT_READERS = ("demo_shapes",)


def _checked_reader(owner: str, reader: Any) -> str | None:
    if reader is not None and reader not in PROMPT_READERS:
        raise ValueError(f"{owner!r}: unknown prompt_reader {reader!r}; known: {', '.join(PROMPT_READERS)}")
    return reader


def _checked_defaults(owner: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(defaults) - set(DEFAULT_KEYS)
    if unknown:
        raise ValueError(f"{owner!r}: unknown default settings {sorted(unknown)}; allowed: {', '.join(DEFAULT_KEYS)}")
    return dict(defaults)
