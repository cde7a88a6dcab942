"""One app request end to end: validate → get the pipeline → baseline run (no cache) → MagCache run → outputs,
wall times, per-run MagCache stats, quality metrics and the predicted schedule next to the actual one.

Both runs use the same seed on the same device, one after the other, and time only the pipeline call (with a
CUDA sync on both ends). The MagCache handle lives for the cached run only, so the baseline is the plain
pipeline. Progress comes from ``callback_on_step_end`` (all eight pipelines call it after every step) and a
stop request sets ``pipe._interrupt`` from inside it, which every pipeline honours at its next step.

Whatever ends a request (done, stopped, an exception at any step, out of memory), the pipeline is left as a fresh
one: no MagCache handle, no cached residual, ``_interrupt`` cleared, offload hooks reset. Every input is checked
here, not only by the UI's components (an API client can send anything), and uploads are decoded with size limits.

No Gradio here: ``ui/`` turns a :class:`ComparisonResult` into images, videos, tables and plots.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

import magcache
from magcache import metrics
from magcache import policy as P
from magcache.adapters import adapter_for
from magcache.presets import get_preset
from magcache.runtime import RunStats

from .catalog import Tab, Variant
from .manager import Cancelled, LoadedModel, ModelManager, OutOfMemory, is_out_of_memory, out_of_memory_message
from .media import MediaError, load_image, read_video, to_pil

WARMUP_STEPS = 2  # steps of the untimed warm-up run before the first timed run of a shape
TINY_STEPS = 12  # default steps with tiny pipelines: a few skips show at every preset's defaults
# Call arguments the user controls; everything else tiny_call_kwargs returns is plumbing for the tiny models.
_USER_KEYS = {"prompt", "negative_prompt", "image", "video", "height", "width", "num_frames", "num_inference_steps",
              "generator", "guidance_scale"}

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total): phases "queue", "load", "warm-up", "baseline", "magcache"

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


class InvalidRequest(ValueError):
    """Bad user input; the message says what to change."""


@dataclass
class GenerationRequest:
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
    # The ratio curve of the cached run, chosen once the model is loaded: ``curve_picker(loaded, call_kwargs)``
    # returns an object with ``curves``, ``rules``, ``options`` (extra Settings fields) and ``label`` (the tuning
    # panel passes one: best calibration / preset / settings file). None: the preset's curve.
    curve_picker: Callable[[LoadedModel, dict], Any] | None = None


@dataclass
class RunResult:
    label: str
    output: Any  # PIL image (image tasks) or (F, H, W, 3) float array in [0, 1] (video tasks)
    seconds: float
    transformer_calls: int
    steps_done: int
    stats: list[RunStats] = field(default_factory=list)  # MagCache run: one per scheduler pass (FramePack section)

    def branch_counts(self) -> dict[str, tuple[int, int]]:
        """Per branch: (computed steps, total steps), summed over the run's sections."""
        out: dict[str, tuple[int, int]] = {}
        for run in self.stats:
            for name, b in run.branches.items():
                c, t = out.get(name, (0, 0))
                out[name] = (c + len(b.computed), t + len(b.decisions))
        return out


@dataclass
class ComparisonResult:
    tab: Tab
    variant: Variant
    preset: str
    settings: P.Settings
    model: str  # what was loaded, in words
    placement: str
    num_steps: int
    num_branches: int
    sections: int
    magcache: RunResult
    predicted: P.Schedule  # one section's schedule, from magcache.policy.simulate
    baseline: RunResult | None = None
    psnr: float | None = None
    ssim: float | None = None
    heatmap: np.ndarray | None = None
    load_seconds: float | None = None  # when this request loaded the model
    warmup_seconds: float | None = None
    compiled: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    curve: Any = None  # what ``req.curve_picker`` chose (its ``label`` says which curve); None: the preset's

    @property
    def speedup(self) -> float | None:
        """Wall-clock speed-up: baseline seconds / MagCache seconds."""
        if self.baseline is None or self.magcache.seconds <= 0:
            return None
        return self.baseline.seconds / self.magcache.seconds

    @property
    def predicted_speedup(self) -> float:
        return self.predicted.predicted_speedup()

    def actual_matches_prediction(self) -> bool:
        """Every section computed exactly the steps the policy simulation predicted, per branch."""
        predicted = self.predicted.computed
        return all(run.computed == {b: predicted.get(b) for b in run.computed} for run in self.magcache.stats)

    @property
    def branches(self) -> list[str]:
        return list(self.magcache.branch_counts())


# --------------------------------------------------------------------------------------------------
# Defaults shown in the UI
# --------------------------------------------------------------------------------------------------
def tab_defaults(manager: ModelManager, tab_id: str, variant: str | None = None) -> dict[str, Any]:
    """Generation settings and MagCache sliders for a tab/variant as the UI shows them: the reference settings
    for real models, small sizes for tiny pipelines, the demo model's own settings for the Demo tab."""
    tab = manager.catalog.tab(tab_id)
    v = tab.variant(variant)
    out = dict(v.defaults)
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
    (size, steps, guidance, seed, example prompts) and, under ``"call"``, fixed pipeline arguments."""
    from pathlib import Path

    path = Path(folder) / "demo_settings.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {k: raw[k] for k in ("prompt", "height", "width", "num_inference_steps", "seed") if k in raw}
    guidance = raw.get("true_cfg_scale", raw.get("guidance_scale"))
    if guidance is not None:
        out["guidance_scale"] = guidance  # the Guidance input; the tab's guidance_arg says which argument it sets
    out["call"] = {k: raw[k] for k in ("negative_prompt", "max_sequence_length") if k in raw}
    examples = raw.get("example_prompts") or raw.get("prompts") or raw.get("examples")
    if isinstance(examples, list) and examples:
        out["examples"] = [str(p) for p in examples]
        out.setdefault("prompt", out["examples"][0])
    return out


def framepack_sections(num_frames: int, latent_window_size: int = 9, temporal_factor: int = 4) -> int:
    """How many sections (full denoising runs) FramePack makes for ``num_frames`` (its pipeline's formula)."""
    window = (latent_window_size - 1) * temporal_factor + 1
    return max(1, (num_frames + window - 1) // window)


# --------------------------------------------------------------------------------------------------
# Validation and call arguments
# --------------------------------------------------------------------------------------------------
def validate(tab: Tab, req: GenerationRequest, defaults: dict[str, Any]) -> GenerationRequest:
    """Fill unset fields from ``defaults`` and reject inputs a pipeline would fail on (or that would run for hours),
    with a message that says what to change. Uploads are decoded here, with size limits, before any model loads."""
    from dataclasses import replace

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
    return _decoded_uploads(tab, req)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _decoded_uploads(tab: Tab, req: GenerationRequest) -> GenerationRequest:
    """Images and videos decoded now (size-checked, see :mod:`.media`): a bad upload is an ``InvalidRequest``
    before the request waits for the device or loads a model."""
    from dataclasses import replace

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
    if req.height is not None and req.width is not None and ("size" in tab.inputs or loaded.plan.kind == "tiny"):
        kw["height"], kw["width"] = int(req.height), int(req.width)
    if "frames" in tab.inputs:
        kw["num_frames"] = int(req.num_frames)
    kw["num_inference_steps"] = int(req.num_inference_steps)
    if tab.guidance_arg:
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


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def run_comparison(
    manager: ModelManager,
    req: GenerationRequest,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> ComparisonResult:
    """Run ``req``: the baseline (when ``req.compare``) and the MagCache run, same seed, one after the other."""
    progress = on_progress or (lambda phase, done, total: None)
    tab = manager.catalog.tab(req.tab_id)
    variant = tab.variant(req.variant)
    defaults = tab_defaults(manager, tab.id, variant.id)
    req = validate(tab, req, defaults)

    phase = ["loading the model"]  # what was running when an out-of-memory error came

    def tracked(name: str, done: int, total: int) -> None:
        phase[0] = {"warm-up": "warming up", "baseline": "running the baseline",
                    "magcache": "running with MagCache"}.get(name, phase[0])
        progress(name, done, total)

    with manager.device_slot(cancel, on_wait=lambda ahead: progress("queue", ahead, ahead)):
        already = {m.key for m in manager.loaded()}
        with manager.use(tab.id, variant.id, req.weights, req.base,
                         on_status=lambda msg: progress("load", 0, 1)) as loaded:
            out_of_memory = None
            try:
                pipe = loaded.pipe
                call = build_call_kwargs(tab, variant, loaded, req)
                curve = req.curve_picker(loaded, call) if req.curve_picker is not None else None
                steps = call["num_inference_steps"]
                sections = (framepack_sections(call["num_frames"], call.get("latent_window_size", 9))
                            if tab.task == "framepack" else 1)
                result_notes = list(loaded.plan.notes)
                magcache.remove(pipe)  # never time a baseline with a leftover handle

                warmup_s = None
                if req.compile and not loaded.compiled:
                    # regional compile (blocks only: MagCache's per-call decisions stay outside compiled code)
                    magcache.compile_blocks(pipe, **({"backend": req.compile_backend} if req.compile_backend else {}))
                    loaded.compiled = True
                shape = (call.get("height"), call.get("width"), call.get("num_frames"),
                         tab.num_branches(req.guidance_scale))
                use_compiled = req.compile and loaded.compiled
                stance = (contextlib.nullcontext() if use_compiled or not loaded.compiled
                          else torch.compiler.set_stance("force_eager"))
                with stance:
                    warm_key = (shape, use_compiled)
                    if warm_key not in loaded.warm:
                        tracked("warm-up", 0, 1)
                        warmup_s = _warm_up(pipe, call, req.seed, manager.device)
                        loaded.warm.add(warm_key)
                    total = steps * sections
                    baseline = None
                    if req.compare:
                        baseline = _timed_run(pipe, call, "baseline", req.seed, total, tracked, cancel, manager.device,
                                              tab.is_video)
                    chosen = {} if curve is None else dict(curves=curve.curves, rules=curve.rules, **curve.options)
                    try:
                        handle = magcache.apply(pipe, preset=loaded.preset, thresh=req.thresh,
                                                retention_ratio=req.retention_ratio, K=req.K, **chosen)
                    except ValueError as e:  # a calibration curve that does not fit: the user's input, not a crash
                        raise InvalidRequest(f"MagCache cannot run with this ratio curve: {e}") from None
                    try:
                        cached = _timed_run(pipe, call, "magcache", req.seed, total, tracked, cancel, manager.device,
                                            tab.is_video)
                        cached.stats = list(handle.runs)
                        num_branches = max((len(r.branches) for r in cached.stats), default=1)
                        predicted = handle.predict(steps, num_branches)
                        settings = handle.settings
                    finally:
                        handle.remove()
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                out_of_memory = f"{type(e).__name__}: {e}"
            finally:
                reset_pipeline(loaded.pipe)
            if out_of_memory is not None:  # out of the except block: the tensors its traceback held are free now
                manager.release_memory(keep=loaded.key)
                raise OutOfMemory(out_of_memory_message(tab, phase[0], out_of_memory, manager.device))

    result = ComparisonResult(
        tab=tab, variant=variant, preset=loaded.preset, settings=settings, model=loaded.plan.describe(),
        placement=loaded.placement.reason if loaded.placement else "", num_steps=steps, num_branches=num_branches,
        sections=sections, magcache=cached, predicted=predicted, baseline=baseline,
        load_seconds=loaded.load_seconds if loaded.key not in already else None, warmup_seconds=warmup_s,
        compiled=use_compiled, notes=result_notes, curve=curve,
    )
    if baseline is not None:
        result.psnr, result.ssim = quality(baseline.output, cached.output)
        result.heatmap = metrics.difference_heatmap(_as_array(baseline.output), _as_array(cached.output))
    result.warnings += _warnings(result)
    return result


def reset_pipeline(pipe: Any) -> None:
    """Leave ``pipe`` as a fresh one after a run that ended in any way: no MagCache handle (which also drops its
    cached residuals), no pending interrupt, offload hooks and stateful diffusers hooks reset."""
    magcache.remove(pipe)
    if getattr(pipe, "_interrupt", False):
        pipe._interrupt = False
    with contextlib.suppress(Exception):  # a no-op without offload; must never mask the run's own error
        pipe.maybe_free_model_hooks()


def _timed_run(pipe: Any, call: dict[str, Any], label: str, seed: int, total: int, progress: ProgressFn,
               cancel: threading.Event | None, device: str, video: bool) -> RunResult:
    done = 0
    calls = 0

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        nonlocal done
        done += 1
        progress(label, min(done, total), total)
        if cancel is not None and cancel.is_set():
            p._interrupt = True  # the pipeline skips its remaining steps
        return {}

    def count_call(module: Any, args: Any) -> None:
        nonlocal calls
        calls += 1

    if cancel is not None and cancel.is_set():
        raise Cancelled(f"stopped before the {label} run")
    progress(label, 0, total)
    # every transformer the pipeline calls (Wan2.2 A14B has two experts)
    hooks = [t.register_forward_pre_hook(count_call) for t in adapter_for(pipe.transformer).experts(pipe)]
    # HunyuanVideo-1.5's pipelines take no step callback: no per-step progress or stop there
    per_step = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    generator = torch.Generator("cpu").manual_seed(int(seed))
    try:
        _sync(device)
        t0 = time.perf_counter()
        out = pipe(**call, generator=generator, **({"callback_on_step_end": on_step_end} if per_step else {}))
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        for hook in hooks:
            hook.remove()
    if not per_step:
        done = total
        progress(label, done, total)
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"stopped during the {label} run after step {done} of {total}")
    output = out.frames[0] if video else out.images[0]
    return RunResult(label, output, seconds, calls, done)


def _warm_up(pipe: Any, call: dict[str, Any], seed: int, device: str) -> float:
    """A short run (``WARMUP_STEPS``) at the real shapes before the first timed run of a shape: lazy initialisation, kernel selection
    and (with compile) the block compilation happen here instead of inflating the baseline's time."""
    args = dict(call, num_inference_steps=WARMUP_STEPS, output_type="latent")
    _sync(device)
    t0 = time.perf_counter()
    pipe(**args, generator=torch.Generator("cpu").manual_seed(int(seed)))
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _as_array(output: Any) -> np.ndarray:
    if hasattr(output, "convert"):
        return np.asarray(output.convert("RGB"), dtype=np.float32) / 255.0
    return np.asarray(output, dtype=np.float32)


def quality(reference: Any, test: Any, chunk: int = 8) -> tuple[float, float]:
    """PSNR and SSIM of ``test`` against ``reference`` (images or videos), frame chunks at a time so long videos
    stay within memory; both are means over frames."""
    a, b = _as_array(reference), _as_array(test)
    if a.ndim == 3:
        a, b = a[None], b[None]
    psnrs, ssims, weights = [], [], []
    for i in range(0, len(a), chunk):
        psnrs.append(metrics.psnr(a[i:i + chunk], b[i:i + chunk]))
        ssims.append(metrics.ssim(a[i:i + chunk], b[i:i + chunk]))
        weights.append(len(a[i:i + chunk]))
    return float(np.average(psnrs, weights=weights)), float(np.average(ssims, weights=weights))


def _warnings(result: ComparisonResult) -> list[str]:
    out = []
    skipped = sum(t - c for c, t in result.magcache.branch_counts().values())
    if skipped == 0:
        out.append("MagCache skipped no step: raise thresh or K, or lower the retention ratio, for a speed-up.")
    preset = get_preset(result.preset)
    if result.num_steps != preset.calibrated_steps and getattr(result.curve, "how", None) is None:  # preset curve
        out.append(f"The {result.preset!r} ratios were calibrated for {preset.calibrated_steps} steps and are resampled "
                   f"to {result.num_steps}: schedules at other step counts are approximate.")
    if result.speedup is not None and result.speedup < 1:
        out.append("The MagCache run was slower than the baseline: at this size the work outside the transformer "
                   "blocks (text encoders, VAE, Python overhead) dominates, or the machine was busy.")
    if not result.actual_matches_prediction():
        out.append("The steps computed differ from the policy's prediction (see the schedule plot).")
    return out
