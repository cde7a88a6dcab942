"""A comparison, the Generate button's run: the baseline (no cache) and the MagCache run of one request, same seed,
one after the other on the same device, with wall times, per-run MagCache stats, quality metrics and the predicted
schedule next to the actual one.

Only the pipeline call is timed (with a CUDA sync on both ends), after an untimed warm-up of each new shape. The
MagCache handle lives for the cached runs only, so the baseline is the plain pipeline. One wall time per run is
not a speed-up anyone can trust on a shared machine (another process takes a core for a second and the ratio
doubles), so a comparison times baseline and MagCache runs interleaved (baseline, MagCache, baseline, MagCache, ...)
and reports the median and spread of the speed-ups of adjacent pairs (:class:`Timing`). The outputs compared are
those of the first pair (same seed); later pairs only time. The device, the model, Stop
and the clean-up are the job's (:mod:`.jobs`). No Gradio here: ``ui/`` turns a :class:`ComparisonResult` into
images, videos, tables and plots.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import magcache
from magcache import metrics
from magcache import policy as P
from magcache.adapters import adapter_for
from magcache.curves import CurveChoice
from magcache.presets import get_preset
from magcache.runtime import RunStats

from .catalog import Tab, Variant
from .jobs import DeviceJob, ProgressFn, device_job, synchronize
from .manager import ModelManager
from .request import GenerationRequest, InvalidRequest
from .tuning import curve_for_job

WARMUP_STEPS = 2  # steps of the untimed warm-up run before the first timed run of a shape
# Timing repeats when the request leaves their number to the comparison ("auto"): pairs are added while the
# speed-up's spread is above TIMING_SPREAD_OK, up to MAX_TIMING_PAIRS, and while the pairs timed so far fit in
# TIMING_BUDGET_S (a model that takes minutes per run gets its single pair).
MIN_TIMING_PAIRS = 3
MAX_TIMING_PAIRS = 9
TIMING_BUDGET_S = 15.0
TIMING_SPREAD_OK = 0.05  # relative half interquartile range of the pair speed-ups: a number to trust
TIMING_SPREAD_LARGE = 0.10  # above this the result says the machine was busy
ABOVE_PREDICTED = 1.10  # a measured speed-up this far above the blocks' predicted one cannot come from skipping
# what a phase of the comparison does, in words (for an out-of-memory message)
_DOING = {"warm-up": "warming up", "baseline": "running the baseline", "magcache": "running with MagCache",
          "timing": "timing repeats"}


@dataclass
class Timing:
    """Wall times of interleaved baseline / MagCache runs of one request: ``baseline[i]`` ran just before
    ``cached[i]``, so each pair saw about the same load on the machine."""

    baseline: list[float]
    cached: list[float]
    stopped: bool = False  # a stop ended the repeats (the pairs here are the finished ones)

    @property
    def pairs(self) -> int:
        return len(self.cached)

    def pair_speedups(self) -> np.ndarray:
        return np.asarray(self.baseline) / np.asarray(self.cached)

    @property
    def speedup(self) -> float:
        """The median speed-up of the pairs."""
        return float(np.median(self.pair_speedups()))

    @property
    def speedup_spread(self) -> float:
        """Half the interquartile range of the pair speed-ups (0 with one pair)."""
        return _half_iqr(self.pair_speedups())

    @property
    def relative_spread(self) -> float:
        return self.speedup_spread / self.speedup if self.speedup > 0 else float("inf")

    def median(self, which: str) -> float:
        return float(np.median(self.baseline if which == "baseline" else self.cached))

    def spread(self, which: str) -> float:
        return _half_iqr(np.asarray(self.baseline if which == "baseline" else self.cached))


def _half_iqr(values: np.ndarray) -> float:
    if len(values) < 2:
        return 0.0
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1) / 2


@dataclass
class RunResult:
    """One timed pipeline call."""

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
    """A baseline run (when asked for) and a MagCache run of the same request, with what to show about them."""

    tab: Tab
    variant: Variant
    preset: str
    settings: P.Settings
    model: str  # what was loaded, in words
    placement: str
    num_steps: int
    num_branches: int
    sections: int
    cached: RunResult  # the run with MagCache
    predicted: P.Schedule  # one section's schedule, from magcache.policy.simulate
    expert_switch: int | None = None  # two-expert models: steps the high-noise expert ran (the pipeline's switch)
    baseline: RunResult | None = None
    psnr: float | None = None
    ssim: float | None = None
    heatmap: np.ndarray | None = None
    load_seconds: float | None = None  # when this request loaded the model
    warmup_seconds: float | None = None
    compiled: bool = False
    notes: list[str] = field(default_factory=list)  # about the model (where it came from, how it was placed)
    request_notes: list[str] = field(default_factory=list)  # about the request (e.g. how the prompt was read)
    warnings: list[str] = field(default_factory=list)
    curve: CurveChoice | None = None  # the request's ratio curve (its ``label`` says which); None: the preset's
    timing: Timing | None = None  # every timed pair, the first one included (with a baseline)

    @property
    def speedup(self) -> float | None:
        """Wall-clock speed-up: the median over the timed pairs of baseline seconds / MagCache seconds."""
        if self.timing is None:
            return None
        return self.timing.speedup

    @property
    def single_run_speedup(self) -> float | None:
        """The first pair's speed-up alone (the runs whose outputs are shown)."""
        if self.baseline is None or self.cached.seconds <= 0:
            return None
        return self.baseline.seconds / self.cached.seconds

    @property
    def timing_is_noisy(self) -> bool:
        """The speed-up's spread is large, or it exceeds what skipping blocks can give: a busy machine."""
        if self.timing is None:
            return False
        return (self.timing.relative_spread > TIMING_SPREAD_LARGE
                or self.timing.speedup > self.predicted_speedup * ABOVE_PREDICTED)

    @property
    def predicted_speedup(self) -> float:
        return self.predicted.predicted_speedup()

    def actual_matches_prediction(self) -> bool:
        """Every section computed exactly the steps the policy simulation predicted, per branch."""
        predicted = self.predicted.computed
        return all(run.computed == {b: predicted.get(b) for b in run.computed} for run in self.cached.stats)

    @property
    def branches(self) -> list[str]:
        return list(self.cached.branch_counts())


def run_comparison(
    manager: ModelManager,
    req: GenerationRequest,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    client: str | None = None,
) -> ComparisonResult:
    """Run ``req``: the baseline (when ``req.compare``) and the MagCache run, same seed, one after the other.
    Progress phases: "queue", "load", "warm-up", "baseline", "magcache", "timing" (done = pairs timed). ``client``:
    who sent it, for the limit of requests per client (``public.admission``)."""
    with device_job(manager, req, cancel, on_progress, client=client) as job:
        return _compare(job)


def _compare(job: DeviceJob) -> ComparisonResult:
    req, tab, loaded, pipe, call = job.request, job.tab, job.loaded, job.pipe, job.call
    curve = curve_for_job(job) if req.curve is not None else None
    steps = call["num_inference_steps"]
    if req.compile and not loaded.compiled:
        # regional compile (blocks only: MagCache's per-call decisions stay outside compiled code)
        magcache.compile_blocks(pipe, **({"backend": req.compile_backend} if req.compile_backend else {}))
        loaded.compiled = True
    use_compiled = req.compile and loaded.compiled
    with job.eager_unless_compiled(use_compiled):
        warmup_s = warm_up(job, use_compiled)
        baseline = _timed_run(job, "baseline") if req.compare else None
        chosen = {} if curve is None else dict(curves=curve.curves, rules=curve.rules, **curve.options)

        def apply_magcache() -> Any:
            try:
                return magcache.apply(pipe, preset=loaded.preset, thresh=req.thresh,
                                      retention_ratio=req.retention_ratio, K=req.K, **chosen)
            except ValueError as e:  # a calibration curve that does not fit: the user's input, not a crash
                raise InvalidRequest(f"MagCache cannot run with this ratio curve: {e}") from None

        handle = apply_magcache()
        try:
            cached = _timed_run(job, "magcache")
            cached.stats = list(handle.runs)
            num_branches = max((len(r.branches) for r in cached.stats), default=1)
            predicted = handle.predict(steps, num_branches)
            expert_switch = handle.split_step(steps)
            settings = handle.settings
        finally:
            handle.remove()
        timing = _time_pairs(job, baseline, cached, apply_magcache) if baseline is not None else None
    result = ComparisonResult(
        tab=tab, variant=job.variant, preset=loaded.preset, settings=settings, model=loaded.plan.describe(),
        placement=loaded.placement.reason if loaded.placement else "", num_steps=steps, num_branches=num_branches,
        sections=job.sections, cached=cached, predicted=predicted, expert_switch=expert_switch, baseline=baseline,
        load_seconds=loaded.load_seconds if job.loaded_now else None, warmup_seconds=warmup_s,
        compiled=use_compiled, notes=list(loaded.plan.notes), request_notes=list(job.notes), curve=curve, timing=timing,
    )
    if baseline is not None:
        result.psnr, result.ssim = metrics.quality(baseline.output, cached.output)
        result.heatmap = metrics.difference_heatmap(metrics.as_array(baseline.output), metrics.as_array(cached.output))
    result.warnings += _warnings(result)
    return result


def _timed_run(job: DeviceJob, label: str) -> RunResult:
    calls = 0

    def count_call(module: Any, args: Any) -> None:
        nonlocal calls
        calls += 1

    job.raise_if_stopped(f"{label} run", started=False)
    job.phase = _DOING[label]
    job.progress(label, 0, job.total_steps)
    # every transformer the pipeline calls (Wan2.2 A14B has two experts)
    hooks = [t.register_forward_pre_hook(count_call) for t in adapter_for(job.pipe.transformer).experts(job.pipe)]
    step_arguments = job.step_arguments(label)
    try:
        synchronize(job.manager.device)
        t0 = time.perf_counter()
        out = job.pipe(**job.call, generator=job.generator(), **step_arguments)
        synchronize(job.manager.device)
        seconds = time.perf_counter() - t0
    finally:
        for hook in hooks:
            hook.remove()
    job.call_returned(label)
    job.raise_if_stopped(f"{label} run")
    output = out.frames[0] if job.tab.is_video else out.images[0]
    return RunResult(label, output, seconds, calls, job.steps_done)


def _time_pairs(job: DeviceJob, baseline: RunResult, cached: RunResult, apply_magcache: Callable[[], Any]) -> Timing:
    """More baseline / MagCache pairs after the first (whose outputs are kept), timed only: as many as the
    request asks for, or (``timing_repeats`` None) until the speed-up's spread is small, the pairs' time budget is
    spent or ``MAX_TIMING_PAIRS`` ran. A stop ends the repeats; the pairs done so far count."""
    timing = Timing([baseline.seconds], [cached.seconds])
    wanted = job.request.timing_repeats
    limit = wanted if wanted is not None else MAX_TIMING_PAIRS

    def more() -> bool:
        if timing.pairs >= limit or job.stopped:
            return False
        if wanted is not None:
            return True
        spent = sum(timing.baseline) + sum(timing.cached)
        if spent + timing.median("baseline") + timing.median("cached") > TIMING_BUDGET_S:
            return False
        return timing.pairs < MIN_TIMING_PAIRS or timing.relative_spread > TIMING_SPREAD_OK

    job.phase = _DOING["timing"]
    while more():
        job.progress("timing", timing.pairs, limit)
        seconds_b = _time_call(job)
        handle = apply_magcache()
        try:
            seconds_c = _time_call(job)
        finally:
            handle.remove()
        if job.stopped:  # an interrupted run's time is not a run's time
            break
        timing.baseline.append(seconds_b)
        timing.cached.append(seconds_c)
    timing.stopped = job.stopped
    return timing


def _time_call(job: DeviceJob) -> float:
    """The wall time of one pipeline call of the request (its output is not kept)."""
    step_arguments = job.step_arguments(None)
    synchronize(job.manager.device)
    t0 = time.perf_counter()
    job.pipe(**job.call, generator=job.generator(), **step_arguments)
    synchronize(job.manager.device)
    seconds = time.perf_counter() - t0
    job.call_returned(None)
    return seconds


def warm_up(job: DeviceJob, compiled: bool = False) -> float | None:
    """A short run (``WARMUP_STEPS``) at the real shapes before the first timed run of a shape on the loaded model
    (compiled blocks or not): lazy initialisation, kernel selection and (with compile) the block compilation happen
    here instead of inflating the first timed run. Images are decoded too (the VAE's first call is slow as well);
    videos stay latents, whose decode would cost more than it warms. Its seconds, or None when this shape was warm
    already."""
    call = job.call
    key = ((call.get("height"), call.get("width"), call.get("num_frames"),
            job.tab.num_branches(job.request.guidance_scale)), compiled)
    if key in job.loaded.warm:
        return None
    job.phase = _DOING["warm-up"]
    job.progress("warm-up", 0, 1)
    args = dict(call, num_inference_steps=WARMUP_STEPS)
    if job.tab.is_video:
        args["output_type"] = "latent"
    synchronize(job.manager.device)
    t0 = time.perf_counter()
    job.pipe(**args, generator=job.generator())
    synchronize(job.manager.device)
    job.loaded.warm.add(key)
    return time.perf_counter() - t0


def _warnings(result: ComparisonResult) -> list[str]:
    out = []
    skipped = sum(t - c for c, t in result.cached.branch_counts().values())
    if skipped == 0:
        out.append("MagCache skipped no step: raise thresh or K, or lower the retention ratio, for a speed-up.")
    preset = get_preset(result.preset)
    if result.num_steps != preset.calibrated_steps and (result.curve is None or result.curve.how is None):
        out.append(f"The {result.preset!r} ratios were calibrated for {preset.calibrated_steps} steps and are resampled "
                   f"to {result.num_steps}: schedules at other step counts are approximate.")
    timing = result.timing
    if timing is not None and timing.speedup > result.predicted_speedup * ABOVE_PREDICTED:
        out.append(f"The measured speed-up ({timing.speedup:.2f}×) is above what skipping transformer passes can give "
                   f"({result.predicted_speedup:.2f}×, with everything else costing the same): the baseline runs were "
                   "slowed by something else, most likely other processes on a busy machine. Read the predicted "
                   "figure as the upper bound.")
    elif timing is not None and timing.relative_spread > TIMING_SPREAD_LARGE:
        out.append(f"The speed-up varied by ±{timing.relative_spread:.0%} between the {timing.pairs} timed pairs: the "
                   "machine is busy (other processes share it), so the measured figure is uncertain.")
    elif result.speedup is not None and result.speedup < 1:
        out.append("The MagCache run was slower than the baseline: at this size the work outside the transformer "
                   "blocks (text encoders, VAE, Python overhead) dominates, or the machine was busy.")
    if not result.actual_matches_prediction():
        out.append("The steps computed differ from the policy's prediction (see the schedule plot).")
    return out
