"""A request to run a tab: its fields, the limits every input is checked against (in the backend, whatever the UI's
components allow, since an API client can send anything), validation with a message that says what to change,
uploads decoded with size limits, and the pipeline's call arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Sequence

import numpy as np

from magcache import policy as P

from .catalog import Tab, Variant
from .defaults import demo_settings
from .manager import LoadedModel
from .media import MediaError, load_image, read_video, to_pil

# Call arguments the user controls; everything else tiny_call_kwargs returns is plumbing for the tiny models.
_USER_KEYS = {"prompt", "negative_prompt", "image", "video", "height", "width", "num_frames", "num_inference_steps",
              "generator", "guidance_scale"}

# Input limits, checked in the backend whatever the UI's components allow.
MIN_STEPS, MAX_STEPS = 2, 200
SIZE_MULTIPLE = 16  # VAE 8x times patch 2 for every model here (FLUX/Kontext, Chroma, Wan, HunyuanVideo, FramePack)
MAX_SIDE = 2048
MAX_FRAMES = 257
MAX_GUIDANCE = 50.0
MAX_THRESH = 10.0  # far beyond any useful value (references use 0.01-0.3); the policy itself only needs >= 0
MAX_K = MAX_STEPS
MAX_PROMPT_CHARS = 4000
MAX_REFERENCE_IMAGES = 8
MAX_SEED = 2**63 - 1
MAX_TIMING_REPEATS = 20  # baseline / MagCache pairs a comparison may be asked to time


class InvalidRequest(ValueError):
    """Bad user input; the message says what to change."""


@dataclass
class GenerationRequest:
    """What one run of a tab is asked to do, as a client sends it; :func:`validate` fills and checks it."""

    tab_id: str
    variant: str | None = None  # id or label; None = the tab's first variant
    prompt: str = ""
    negative_prompt: str | None = None
    image: Any = None  # PIL image / path / array (image edit, image-to-video, FramePack)
    control_video: Any = None  # VACE: a video path or a list of frames
    mask_video: Any = None  # VACE: white = generate, black = keep
    reference_images: Sequence[Any] | None = None  # VACE
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    thresh: float | None = None
    retention_ratio: float | None = None
    K: int | None = None
    compare: bool = True  # also run the baseline (no cache) for timings and quality numbers
    compile: bool = False  # regional compile of the transformer blocks (warm-up shown separately)
    weights: str | None = None  # override: hub id, local diffusers folder, or single-file checkpoint
    base: str | None = None  # the rest of the pipeline for a single-file / transformer-only source
    compile_backend: str | None = None  # torch.compile backend (None = inductor); tests use "eager"
    # Baseline / MagCache pairs to time (the first pair's outputs are shown; the others only time). None: as many
    # as the comparison needs for a steady speed-up within its time budget (magcache.studio.comparison).
    timing_repeats: int | None = None
    # The ratio curve of the cached run (magcache.studio.tuning.pick_curve): "auto" (the best calibration, else the
    # preset curve), "preset", "calibration:<id>" or "file" (the curve of ``curve_file``, a settings JSON text).
    # None: the preset's curve, without looking at the calibration store.
    curve: str | None = None
    curve_file: str | None = None


def read_prompt(variant: Variant, req: GenerationRequest,
                known_words: Collection[str] | None = None) -> tuple[GenerationRequest, str | None]:
    """The request with its prompt in the words the variant's model knows, and a note saying how it was read (None
    when the prompt was used as typed). Only variants that declare a ``prompt_reader`` are touched: a demo model
    that knows one caption grammar runs "a red circle on a blue background" as "blue background, large red circle
    at center". ``known_words``: the words of a demo model trained on plain English (its ``demo_settings.json``'s
    ``prompt_words``): a prompt made of them runs as typed, one with other words runs as the reader's caption, with
    a note naming the words the model never learned. A prompt with nothing the model can draw is refused, never
    turned into a meaningless image."""
    if variant.prompt_reader != "demo_shapes":
        return req, None
    from .demo.prompts import prompt_words, understand

    reading = understand(req.prompt)
    ignored = f" It does not know: {', '.join(dict.fromkeys(reading.ignored_words))}." if reading.ignored_words else ""
    if reading.scene is None:
        raise InvalidRequest("The demo model draws circles, squares, triangles and diamonds in eight colours on a "
                             f"coloured background; this prompt names no such shape.{ignored} Try, e.g., "
                             "'a small yellow triangle in the bottom left corner on a purple background'.")
    if reading.in_grammar:
        return req, None
    assumed = f" Assumed: {'; '.join(reading.notes)}." if reading.notes else ""
    if known_words is None:
        note = (f"The demo model knows only its training grammar; your prompt ran as \"{reading.caption}\"."
                f"{ignored}{assumed}")
        return replace(req, prompt=reading.caption), note
    unknown = [w for w in dict.fromkeys(prompt_words(req.prompt)) if w not in known_words]
    if not unknown:
        return req, None
    words = f"the word {unknown[0]}" if len(unknown) == 1 else f"the words {', '.join(unknown)}"
    note = f"The demo model never learned {words}; your prompt ran as \"{reading.caption}\", in words it knows.{assumed}"
    return replace(req, prompt=reading.caption), note


def validate(tab: Tab, req: GenerationRequest, defaults: dict[str, Any]) -> GenerationRequest:
    """Fill unset fields from ``defaults`` and reject inputs a pipeline would fail on (or that would run for hours),
    with a message that says what to change. Uploads are decoded here, with size limits, before any model loads."""
    fill = {k: defaults.get(k) for k in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                                        "thresh", "retention_ratio", "K") if getattr(req, k) is None}
    if req.negative_prompt is None and "negative_prompt" in tab.inputs:
        fill["negative_prompt"] = defaults.get("negative_prompt")
    req = replace(req, **{k: v for k, v in fill.items() if v is not None})
    for name, text in (("Prompt", req.prompt), ("Negative prompt", req.negative_prompt)):
        if text is not None and not isinstance(text, str):
            raise InvalidRequest(f"{name} must be text, got {type(text).__name__}.")
        if text and len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"{name} is too long ({len(text)} characters; the limit is {MAX_PROMPT_CHARS}).")
    if not (req.prompt or "").strip():
        raise InvalidRequest("Write a prompt first.")
    if "image" in tab.inputs and req.image is None:
        raise InvalidRequest(f"{tab.label} needs an input image: upload one first.")
    steps = req.num_inference_steps
    if not _whole(steps) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidRequest(f"Steps must be a whole number from {MIN_STEPS} to {MAX_STEPS}, got {steps!r}.")
    if "size" in tab.inputs:
        for name in ("height", "width"):
            value = getattr(req, name)
            if not _whole(value) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise InvalidRequest(f"{name.capitalize()} must be a positive multiple of {SIZE_MULTIPLE} for "
                                     f"{tab.label}, got {value!r}.")
            if value > MAX_SIDE:
                raise InvalidRequest(f"{name.capitalize()} must be at most {MAX_SIDE}, got {value}.")
    if "frames" in tab.inputs:
        n = req.num_frames
        if not _whole(n) or not 1 <= n <= MAX_FRAMES:
            raise InvalidRequest(f"Frames must be a whole number from 1 to {MAX_FRAMES}, got {n!r}.")
        if tab.task != "framepack" and (n - 1) % 4:
            raise InvalidRequest(f"{tab.label} needs 4k+1 frames (e.g. {4 * ((n - 1) // 4) + 1} or "
                                 f"{4 * ((n - 1) // 4 + 1) + 1}), got {n}.")
    g = req.guidance_scale
    if not _number(g) or not 0 <= g <= MAX_GUIDANCE:
        raise InvalidRequest(f"Guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {g!r}.")
    if not _whole(req.seed) or abs(req.seed) > MAX_SEED:
        raise InvalidRequest(f"Seed must be a whole number (at most {MAX_SEED} in size), got {req.seed!r}.")
    try:
        P.validate_settings(req.thresh, req.retention_ratio, req.K)
    except ValueError as e:
        raise InvalidRequest(f"MagCache settings: {e}") from None
    if req.thresh > MAX_THRESH:
        raise InvalidRequest(f"MagCache settings: thresh must be at most {MAX_THRESH:g}, got {req.thresh}.")
    if req.K > MAX_K:
        raise InvalidRequest(f"MagCache settings: K must be at most {MAX_K}, got {req.K}.")
    if req.timing_repeats is not None and not (_whole(req.timing_repeats) and 1 <= req.timing_repeats <= MAX_TIMING_REPEATS):
        raise InvalidRequest(f"Timing repeats must be a whole number from 1 to {MAX_TIMING_REPEATS} (or empty: "
                             f"automatic), got {req.timing_repeats!r}.")
    return _decoded_uploads(tab, req)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _decoded_uploads(tab: Tab, req: GenerationRequest) -> GenerationRequest:
    """Images and videos decoded now (size-checked, see :mod:`.media`): a bad upload is an ``InvalidRequest``
    before the request waits for the device or loads a model."""
    def decode(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except MediaError as e:
            raise InvalidRequest(f"The {what}: {e}") from None

    changes: dict[str, Any] = {}
    if req.image is not None and "image" in tab.inputs:
        changes["image"] = decode("input image", lambda: load_image(req.image))
    if tab.task == "vace":
        size = (int(req.width), int(req.height))
        for field_name, what, mode in (("control_video", "control video", "RGB"), ("mask_video", "mask video", "L")):
            video = getattr(req, field_name)
            if video is not None:
                changes[field_name] = decode(what, lambda v=video, m=mode: _frames(v, int(req.num_frames), size, m))
        refs = list(req.reference_images or [])
        if len(refs) > MAX_REFERENCE_IMAGES:
            raise InvalidRequest(f"At most {MAX_REFERENCE_IMAGES} reference images, got {len(refs)}.")
        if refs:
            changes["reference_images"] = [decode(f"reference image {i + 1}", lambda r=r: load_image(r))
                                           for i, r in enumerate(refs)]
    return replace(req, **changes) if changes else req


def build_call_kwargs(tab: Tab, variant: Variant, loaded: LoadedModel, req: GenerationRequest) -> dict[str, Any]:
    """The pipeline's keyword arguments (without generator and callback)."""
    kw: dict[str, Any] = dict(variant.call)
    if variant.local_only and loaded.plan.kind == "pretrained":  # the trained demo model's own fixed arguments
        kw.update(demo_settings(loaded.plan.pipeline_source).get("call", {}))
    if loaded.plan.kind == "tiny":
        from .tiny import tiny_call_kwargs

        kw.update({k: v for k, v in tiny_call_kwargs(tab.tiny).items() if k not in _USER_KEYS})
    kw["prompt"] = req.prompt
    if "negative_prompt" in tab.inputs and req.negative_prompt:
        kw["negative_prompt"] = req.negative_prompt
    if req.image is not None and "image" in tab.inputs:
        kw["image"] = to_pil(req.image)
        if loaded.plan.kind == "tiny" and req.width and req.height:  # the tiny model's size, not the upload's
            kw["image"] = kw["image"].resize((int(req.width), int(req.height)))
    if req.height is not None and req.width is not None and ("size" in tab.inputs or loaded.plan.kind == "tiny"):
        kw["height"], kw["width"] = int(req.height), int(req.width)
    if "frames" in tab.inputs:
        kw["num_frames"] = int(req.num_frames)
    kw["num_inference_steps"] = int(req.num_inference_steps)
    if tab.guidance_arg:  # HunyuanVideo-1.5 takes no guidance argument (its guider holds the scale)
        kw[tab.guidance_arg] = float(req.guidance_scale)
    if tab.task == "vace":
        size = (int(req.width), int(req.height))
        if req.control_video is not None:
            kw["video"] = _frames(req.control_video, kw["num_frames"], size, "RGB")
        if req.mask_video is not None:
            kw["mask"] = _frames(req.mask_video, kw["num_frames"], size, "L")
        if req.reference_images:
            kw["reference_images"] = [to_pil(im) for im in req.reference_images]
    kw["output_type"] = "np" if tab.is_video else "pil"
    return kw


def _frames(video: Any, num_frames: int, size: tuple[int, int], mode: str) -> list:
    from PIL import Image

    from .media import fit_frames

    if isinstance(video, (list, tuple)):
        return fit_frames([load_image(f).convert(mode).resize(size, Image.BICUBIC) for f in video], num_frames)
    return read_video(video, num_frames, size[0], size[1], mode)
