"""Caching strategies side by side at equal compute, on a loaded pipeline.

    from magcache.studio.strategies import run_strategies
    results = run_strategies(pipe, {"num_inference_steps": 28, "height": 128, "width": 128},
                             items=[("a red circle", 0)], levels=(2, 3, 4))
    results.to_json()          # ui.plots.strategies_figure(results) draws it

Every strategy runs the same prompts and seeds (a fresh CPU generator per call, so every run starts from the same
noise) and is measured against the uncached output of the same item:

* ``magcache``: MagCache's threshold rule, the smallest threshold that reaches each level (a block speed-up, solved
  at the preset's K with :func:`magcache.policy.solve_thresh_for_speedup`);
* ``magcache_optimal``: the budget-optimal schedule (:mod:`magcache.optimal`);
* ``uniform``: computed steps spread evenly (first and last included); ``random``: step 0 plus random steps (one draw
  per item). These three compute, per branch, as many steps as ``magcache`` computes at the same level (``ceil(N/X)``
  where the threshold rule cannot reach X), so they are compared at equal compute;
* each diffusers cache hook that runs on the model (``transformer.enable_cache``), swept over its own knob
  (``HOOK_KNOBS``): FirstBlockCache (threshold), TaylorSeer (cache interval), FasterCache and
  PyramidAttentionBroadcast (attention skip range), diffusers' own MagCacheConfig (threshold).

Compute is counted as work the transformer blocks actually execute (:class:`BlockWorkCounter`: multiply-accumulates
of every ``nn.Linear`` inside the adapter's block lists and of every scaled-dot-product attention call made while a
block runs), so a strategy that skips attention but runs the MLPs, or runs the first block to decide, is charged for
what it ran. Wall time and PSNR/SSIM (:mod:`magcache.metrics`) are measured too. A strategy that fails on the model
is reported in ``StrategyResults.unsupported`` with its error, not silently dropped.

The app's run kind, :func:`run_tab_strategies`, runs them on a tab's model through :func:`~.jobs.device_job` (the
queue, Stop and the clean-up every kind of run shares) for the tab's prompt and seed, with a cap on the runs.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .. import optimal as O
from .. import policy as P
from ..adapters import adapter_for
from ..metrics import PSNR_IDENTICAL, psnr, ssim
from ..curves import CurveChoice
from ..presets import get_preset
from ..runtime import MagCacheHandle, apply, get_handle
from .comparison import warm_up
from .jobs import ProgressFn, device_job
from .manager import ModelManager, is_out_of_memory
from .request import GenerationRequest, InvalidRequest
from .sweep import main_output
from .tuning import cos_curves_for, curve_for_job

SCHEDULE_STRATEGIES = ("magcache", "magcache_optimal", "uniform", "random")
# diffusers cache hooks and the knob each is swept over (values from gentle to aggressive)
HOOK_KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    "first_block_cache": ("threshold", (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)),
    "taylorseer": ("cache_interval", (2, 3, 4, 5, 6)),
    "faster_cache": ("spatial_attention_block_skip_range", (2, 3, 4, 6)),
    "pyramid_attention_broadcast": ("spatial_attention_block_skip_range", (2, 3, 4, 6)),
    "diffusers_magcache": ("threshold", (0.06, 0.12, 0.24, 0.5, 1.0)),
}
STRATEGIES = SCHEDULE_STRATEGIES + tuple(HOOK_KNOBS)
# diffusers hooks left out of the comparison, and why (they are not step caches that trade quality for speed here)
NOT_COMPARED = {
    "sea_cache": "SeaCacheConfig needs step_index/sigma in the pipeline's cache_context (FluxPipeline does not pass "
                 "them), so it runs every block (fail-open)",
    "text_kv_cache": "TextKVCacheConfig is lossless text key/value reuse, not a step cache",
}


# --------------------------------------------------------------------------------------------------
# Counting the work the blocks run
# --------------------------------------------------------------------------------------------------
class BlockWorkCounter:
    """Multiply-accumulates executed inside ``transformer``'s block lists while the counter is active.

    Forward hooks on each ``nn.Linear`` of the blocks fire only when that layer runs (a cache that returns a stored
    output skips the layers below it); attention scores are counted by wrapping
    ``torch.nn.functional.scaled_dot_product_attention`` while a block's forward is running (``B*H*Lq*Lk*(D+Dv)``).
    """

    def __init__(self, transformer: torch.nn.Module, block_lists: Sequence[str]):
        self.transformer, self.block_lists = transformer, tuple(block_lists)
        self.linear_macs = 0
        self.attention_macs = 0
        self._depth = 0
        self._hooks: list[Any] = []
        self._sdpa: Callable | None = None

    def _linear(self, module: torch.nn.Linear, args: tuple, output: Any) -> None:
        self.linear_macs += args[0].numel() // module.in_features * module.in_features * module.out_features

    @property
    def macs(self) -> int:
        return self.linear_macs + self.attention_macs

    def reset(self) -> None:
        self.linear_macs = self.attention_macs = 0

    def _enter(self, module, args) -> None:
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1

    def __enter__(self) -> "BlockWorkCounter":
        blocks = [b for name in self.block_lists for b in getattr(self.transformer, name)]
        for block in blocks:
            self._hooks.append(block.register_forward_pre_hook(self._enter))
            self._hooks.append(block.register_forward_hook(self._leave, always_call=True))
            self._hooks += [m.register_forward_hook(self._linear) for m in block.modules()
                            if isinstance(m, torch.nn.Linear)]
        original = torch.nn.functional.scaled_dot_product_attention
        counter = self

        def counted_sdpa(query, key, value, *args, **kwargs):
            if counter._depth > 0:
                batch = math.prod(query.shape[:-2])
                counter.attention_macs += batch * query.shape[-2] * key.shape[-2] * (query.shape[-1] + value.shape[-1])
            return original(query, key, value, *args, **kwargs)

        self._sdpa = original
        torch.nn.functional.scaled_dot_product_attention = counted_sdpa
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._sdpa
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._depth = 0


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyPoint:
    strategy: str
    knob: str  # "target_speedup" for the schedule strategies, else the hook's parameter
    value: float

    @property
    def label(self) -> str:
        return f"{self.strategy} {self.knob}={self.value:g}"


@dataclass
class StrategyRow:
    strategy: str
    knob: str
    value: float
    compute_fraction: float  # block work executed / block work of the uncached runs (sums over items)
    compute_speedup: float
    seconds: float  # mean per item
    time_speedup: float
    psnr: float  # mean over items (identical outputs count as 100 dB)
    psnr_min: float
    ssim: float
    ssim_min: float
    computed: dict | None = None  # MagCache-family schedules: computed steps per branch (first item)
    items: list[dict] = field(default_factory=list)  # per item: psnr, ssim, seconds, compute_fraction


@dataclass
class StrategyResults:
    num_steps: int
    items: list[tuple[str, int]]
    baseline_seconds: float  # mean per item
    rows: list[StrategyRow] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=lambda: dict(NOT_COMPARED))
    cancelled: bool = False
    outputs: dict[str, list] | None = None  # with keep_outputs: {point label or "uncached": output per item}

    def by_strategy(self) -> dict[str, list[StrategyRow]]:
        out: dict[str, list[StrategyRow]] = {}
        for r in self.rows:
            out.setdefault(r.strategy, []).append(r)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StrategyResults":
        return cls(data["num_steps"], [tuple(i) for i in data["items"]], data["baseline_seconds"],
                   [StrategyRow(**r) for r in data["rows"]], dict(data["unsupported"]), dict(data["not_compared"]),
                   data["cancelled"])

    def to_json(self) -> dict:
        return {"num_steps": self.num_steps, "items": [list(i) for i in self.items],
                "baseline_seconds": self.baseline_seconds, "rows": [asdict(r) for r in self.rows],
                "unsupported": self.unsupported, "not_compared": self.not_compared, "cancelled": self.cancelled}


# --------------------------------------------------------------------------------------------------
# Schedules of the schedule strategies
# --------------------------------------------------------------------------------------------------
def uniform_steps(num_steps: int, count: int) -> list[int]:
    """``count`` computed steps spread evenly, first and last included (N/2 = every other step)."""
    if count <= 1:
        return [0]
    return sorted({int(round(i * (num_steps - 1) / (count - 1))) for i in range(count)})


def random_steps(num_steps: int, count: int, rng: random.Random) -> list[int]:
    """Step 0 (no residual exists before it) plus ``count - 1`` steps drawn at random."""
    return sorted([0] + rng.sample(range(1, num_steps), max(0, count - 1)))


def reference_at(handle: MagCacheHandle, num_steps: int, num_branches: int, target: float) -> tuple[P.Settings, P.Schedule]:
    """The threshold rule at the smallest threshold reaching ``target`` (the handle's K, retention and the curves and
    expert switch of a run of ``num_steps``)."""
    settings, schedule, _ = P.solve_thresh_for_speedup(handle.curves_for(num_steps), num_steps, target, handle.settings,
                                                      handle.rules, num_branches,
                                                      split_step=handle.split_step(num_steps))
    return settings, schedule


def equal_compute_budget(handle: MagCacheHandle, num_steps: int, num_branches: int, target: float) -> int:
    """Computed steps per branch for the budget strategies at ``target``: what the threshold rule computes there (per
    branch on average, rounded up), so that they compare at equal compute; ``ceil(N / X)`` if the rule cannot reach X."""
    _, schedule = reference_at(handle, num_steps, num_branches, target)
    if schedule.predicted_speedup() >= target:
        return math.ceil(schedule.computed_count() / len(schedule.computed))
    return O.budget_for_speedup(num_steps, target)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def _hook_config(name: str, value: float, pipe: Any, handle: MagCacheHandle, num_steps: int):
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    timestep = lambda: pipe.current_timestep  # noqa: E731  (the timestep the pipeline is denoising)
    if name == "first_block_cache":
        return FirstBlockCacheConfig(threshold=float(value))
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), taylor_factors_dtype=pipe.transformer.dtype)
    if name == "faster_cache":
        # true CFG runs cond and uncond as separate calls: FasterCache's batched-uncond skipping does not apply
        return FasterCacheConfig(spatial_attention_block_skip_range=int(value), current_timestep_callback=timestep,
                                 is_guidance_distilled=True)
    if name == "pyramid_attention_broadcast":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                               current_timestep_callback=timestep)
    if name == "diffusers_magcache":
        prepared = P.prepare_curves(handle.curves[:1], num_steps, handle.settings.sqrt_ratios, handle.rules.step_mapping)
        return MagCacheConfig(threshold=float(value), max_skip_steps=handle.settings.K,
                              retention_ratio=handle.settings.retention_ratio, num_inference_steps=num_steps,
                              mag_ratios=prepared[0])
    raise KeyError(name)


class _Runner:
    def __init__(self, pipe: Any, call_kwargs: Mapping[str, Any], items: Sequence[tuple[str, int]],
                 handle: MagCacheHandle):
        self.pipe, self.items, self.handle = pipe, list(items), handle
        self.call_kwargs = dict(call_kwargs)
        self.call_kwargs.setdefault("output_type", "np")
        self.counter = BlockWorkCounter(pipe.transformer, handle.adapter.block_lists)
        self.references: list[Any] = []
        self.reference_macs: list[int] = []
        self.reference_seconds: list[float] = []

    def generate(self, prompt: str, seed: int) -> tuple[Any, float, int]:
        kwargs = dict(self.call_kwargs, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.counter.reset()
        with self.counter:
            start = time.perf_counter()
            out = main_output(self.pipe(**kwargs))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return out, seconds, self.counter.macs

    def baseline(self) -> int:
        """The uncached outputs; returns the number of branches per step. The handle stays on with caching off
        (thresh 0), which is bit for bit the plain pipeline and records the branches a run has."""
        self.handle.configure(enabled=True, computed_steps=None, schedule="threshold", thresh=0.0,
                              zero_thresh_disables=True)
        for prompt, seed in self.items:
            out, seconds, macs = self.generate(prompt, seed)
            self.references.append(out)
            self.reference_seconds.append(seconds)
            self.reference_macs.append(macs)
        return len(self.handle.last_run.branches)

    def measure(self, point: StrategyPoint, prepare: Callable[[int], None]) -> tuple[StrategyRow, list]:
        per_item, outputs, computed = [], [], None
        for i, (prompt, seed) in enumerate(self.items):
            prepare(i)
            out, seconds, macs = self.generate(prompt, seed)
            outputs.append(out)
            run = self.handle.last_run if self.handle.enabled else None
            if i == 0 and run is not None:
                computed = run.computed
            per_item.append({"psnr": min(psnr(out, self.references[i]), PSNR_IDENTICAL),
                             "ssim": ssim(out, self.references[i]), "seconds": seconds,
                             "compute_fraction": macs / self.reference_macs[i], "macs": macs})
        fraction = sum(r["macs"] for r in per_item) / sum(self.reference_macs)
        seconds = float(np.mean([r["seconds"] for r in per_item]))
        row = StrategyRow(
            point.strategy, point.knob, point.value, round(fraction, 5),
            round(1 / fraction, 4) if fraction else math.inf, round(seconds, 4),
            round(float(np.mean(self.reference_seconds)) / seconds, 4),
            round(float(np.mean([r["psnr"] for r in per_item])), 3), round(min(r["psnr"] for r in per_item), 3),
            round(float(np.mean([r["ssim"] for r in per_item])), 5), round(min(r["ssim"] for r in per_item), 5),
            computed, [{k: round(v, 5) for k, v in r.items() if k != "macs"} for r in per_item])
        return row, outputs


def strategy_points(strategies: Sequence[str] = STRATEGIES, levels: Sequence[float] = (2.0, 3.0, 4.0),
                    knobs: Mapping[str, Sequence[float]] | None = None,
                    error_models: Sequence[str] = (O.DEFAULT_ERROR_MODEL,)) -> list[StrategyPoint]:
    """The points :func:`run_strategies` measures, in order: each schedule strategy at every level, each hook over
    its knob values (``knobs`` overrides ``HOOK_KNOBS``). One pipeline call per point and item, plus the uncached one."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    points: list[StrategyPoint] = []
    for s in strategies:
        if s in HOOK_KNOBS:
            knob, values = HOOK_KNOBS[s]
            points += [StrategyPoint(s, knob, float(v)) for v in (knobs or {}).get(s, values)]
        elif s == "magcache_optimal" and len(error_models) > 1:
            points += [StrategyPoint(f"{s}/{m}", "target_speedup", float(x)) for m in error_models for x in levels]
        else:
            points += [StrategyPoint(s, "target_speedup", float(x)) for x in levels]
    return points


def run_strategies(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    items: Sequence[tuple[str, int]],
    levels: Sequence[float] = (2.0, 3.0, 4.0),
    strategies: Sequence[str] = STRATEGIES,
    *,
    knobs: Mapping[str, Sequence[float]] | None = None,
    error_models: Sequence[str] = (O.DEFAULT_ERROR_MODEL,),
    random_seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    keep_outputs: bool = False,
    **apply_kwargs: Any,
) -> StrategyResults:
    """Run each strategy on every ``(prompt, seed)`` item and measure it against the uncached output.

    ``levels`` are block speed-ups for the schedule strategies; ``knobs`` overrides a hook's values (``HOOK_KNOBS``).
    ``magcache_optimal`` runs once per error model of ``error_models`` (rows named ``magcache_optimal/<model>`` when
    there are several).
    MagCache uses the pipeline's handle (its preset, curves and rules; settings restored afterwards) or one applied
    with ``apply_kwargs`` and removed at the end. ``progress(done, total, label)`` is called before each point;
    ``cancel()`` is checked between points. With ``keep_outputs`` the rows' outputs are kept in ``.outputs``
    (``{label: [output per item]}``; the uncached ones under ``"uncached"``).
    """
    if not items:
        raise ValueError("run_strategies needs at least one (prompt, seed) item")
    num_steps = int(call_kwargs["num_inference_steps"])
    points = strategy_points(strategies, levels, knobs, error_models)
    existing = get_handle(pipe)
    handle = existing if existing is not None else apply(pipe, **apply_kwargs)
    saved = (handle.settings, handle.enabled, handle.calibrate, handle.computed_steps, handle.plan)
    runner = _Runner(pipe, call_kwargs, items, handle)
    results = StrategyResults(num_steps, [tuple(i) for i in items], 0.0)
    outputs: dict[str, list] = {}
    try:
        num_branches = runner.baseline()
        # the strategies start from the handle's own settings (a forced or planned schedule needs caching on)
        handle.configure(thresh=saved[0].thresh or 1.0, zero_thresh_disables=saved[0].zero_thresh_disables)
        results.baseline_seconds = round(float(np.mean(runner.reference_seconds)), 4)
        outputs["uncached"] = runner.references
        for done, point in enumerate(points):
            if cancel is not None and cancel():
                results.cancelled = True
                break
            if point.strategy in results.unsupported:
                continue
            if progress is not None:
                progress(done, len(points), point.label)
            try:
                with _strategy(point, pipe, handle, runner, num_steps, num_branches, error_models[0],
                               random_seed) as prepare:
                    row, outs = runner.measure(point, prepare)
            except Exception as e:  # a hook that does not fit this model: report it, go on with the others
                if is_out_of_memory(e):  # not the hook's fault: the caller frees memory and says what to change
                    raise
                results.unsupported[point.strategy] = f"{type(e).__name__}: {e}"
                continue
            results.rows.append(row)
            if keep_outputs:
                outputs[point.label] = outs
    finally:
        if existing is None:
            handle.remove()
        else:
            handle.configure(enabled=saved[1], calibrate=saved[2], computed_steps=saved[3], schedule="threshold")
            handle.settings, handle.plan = saved[0], saved[4]
    if keep_outputs:
        results.outputs = outputs
    return results


@contextlib.contextmanager
def _strategy(point: StrategyPoint, pipe: Any, handle: MagCacheHandle, runner: _Runner, num_steps: int,
              num_branches: int, error_model: str, random_seed: int) -> Iterator[Callable[[int], None]]:
    """Set the pipeline up for ``point``; yields ``prepare(item_index)``, called before each item's run."""
    name, value = point.strategy, point.value
    nothing = lambda i: None  # noqa: E731
    if name in HOOK_KNOBS:
        handle.configure(enabled=False)
        pipe.transformer.enable_cache(_hook_config(name, value, pipe, handle, num_steps))
        try:
            yield nothing
        finally:
            pipe.transformer.disable_cache()
        return
    handle.configure(enabled=True, computed_steps=None, schedule="threshold")
    if name == "magcache":
        settings, _ = reference_at(handle, num_steps, num_branches, value)
        handle.configure(thresh=settings.thresh, K=settings.K)
        yield nothing
        return
    budget = equal_compute_budget(handle, num_steps, num_branches, value)
    if name.startswith("magcache_optimal"):
        model = name.partition("/")[2] or error_model
        handle.configure(schedule="optimal", budget=budget, error_model=model)
        try:
            yield nothing
        finally:
            handle.configure(schedule="threshold")
        return
    if name == "uniform":
        steps = uniform_steps(num_steps, budget)
        handle.configure(computed_steps={"cond": steps})
        yield nothing
        return
    rng = random.Random(f"{random_seed}-{value}")
    draws = [random_steps(num_steps, budget, rng) for _ in runner.items]
    yield lambda i: handle.configure(computed_steps={"cond": draws[i]})


# --------------------------------------------------------------------------------------------------
# The app's run kind: every strategy on a tab's model, one prompt and seed
# --------------------------------------------------------------------------------------------------
DEFAULT_LEVELS = (2.0, 3.0, 4.0)
# pipeline calls of one Strategies run in the app, the uncached one included: the default plan (every strategy at
# three levels) fits, and a run on a large model stays a matter of minutes
MAX_RUNS = 40


@dataclass
class TabStrategies:
    results: StrategyResults
    curve: CurveChoice
    request: GenerationRequest  # validated
    planned_runs: int  # pipeline calls planned, the uncached one included


def plan_tab_strategies(strategies: Sequence[str], levels: Sequence[float], max_runs: int = MAX_RUNS,
                        knobs: Mapping[str, Sequence[float]] | None = None) -> list[StrategyPoint]:
    """The points of a Strategies run, refused with :class:`InvalidRequest` (saying what to lower) when there is
    nothing to run or more than ``max_runs`` pipeline calls, before anything queues."""
    if not strategies:
        raise InvalidRequest("Strategies: choose at least one strategy.")
    if any(s in SCHEDULE_STRATEGIES for s in strategies) and not levels:
        raise InvalidRequest("Strategies: give at least one speed-up level for the MagCache, uniform and random "
                             "strategies.")
    bad = [x for x in levels if not (math.isfinite(x) and 1 <= x <= 50)]
    if bad:
        raise InvalidRequest(f"Strategies: speed-up levels must be between 1 and 50, got {bad[0]:g}.")
    try:
        points = strategy_points(strategies, levels, knobs)
    except ValueError as e:
        raise InvalidRequest(f"Strategies: {e}") from None
    runs = 1 + len(points)
    if runs > max_runs:
        per = {}
        for point in points:
            per[point.strategy] = per.get(point.strategy, 0) + 1
        detail = ", ".join(f"{name} {count}" for name, count in per.items())
        raise InvalidRequest(f"Strategies: {runs} pipeline runs planned (the uncached one, then {detail}); the limit "
                             f"is {max_runs}. Give fewer speed-up levels or choose fewer strategies.")
    return points


def run_tab_strategies(manager: ModelManager, req: GenerationRequest, levels: Sequence[float] = DEFAULT_LEVELS,
                       strategies: Sequence[str] = STRATEGIES, stop: threading.Event | None = None,
                       on_progress: ProgressFn | None = None, max_runs: int = MAX_RUNS,
                       knobs: Mapping[str, Sequence[float]] | None = None) -> TabStrategies:
    """Every strategy of ``strategies`` on the tab's model for the request's prompt and seed (:func:`run_strategies`):
    MagCache with the request's ratio curve, retention and K (the threshold rule at the smallest thresh reaching
    each level, and the optimal schedule), uniform and random skipping at the same compute, and the diffusers hooks
    over their knobs (``knobs`` overrides ``HOOK_KNOBS``). An untimed warm-up first for a new shape. Stop ends it after the current run; a run that was
    interrupted is dropped (all of them if it was the uncached one). Progress phases: "Strategies: run k of n ..."."""
    levels = sorted({float(x) for x in levels})
    points = plan_tab_strategies(strategies, levels, max_runs, knobs)
    total = len(points) + 1
    running = ["uncached"]
    interrupted: set[str] = set()
    # like the sweep, the budget counts one run at a time; MAX_RUNS bounds how many there are
    with device_job(manager, req, stop, on_progress, runs=1) as job:
        job.phase = "running the strategies"
        curve = curve_for_job(job)
        step_arguments = job.step_arguments(None)  # nothing for a pipeline without a step callback
        count_steps = step_arguments.get("callback_on_step_end")

        def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            out = count_steps(p, i, t, kwargs)
            if job.stopped:
                interrupted.add(running[0])
            return out

        def progress(done: int, _points: int, label: str) -> None:
            running[0] = label
            job.progress(f"Strategies: run {done + 2} of {total}, {label}", done + 1, total)

        with job.eager_unless_compiled():
            warm_up(job)
            job.raise_if_stopped("strategies", started=False)
            try:
                handle = apply(job.pipe, preset=job.loaded.preset, thresh=job.request.thresh,
                               retention_ratio=job.request.retention_ratio, K=job.request.K, curves=curve.curves,
                               rules=curve.rules, **curve.options)
            except ValueError as e:  # a calibration curve that does not fit: the user's input, not a crash
                raise InvalidRequest(f"MagCache cannot run with this ratio curve: {e}") from None
            handle.cos_curves = cos_curves_for(curve, get_preset(job.loaded.preset))
            job.progress(f"Strategies: run 1 of {total}, uncached (the reference)", 0, total)
            call = dict(job.call, **({"callback_on_step_end": on_step_end} if count_steps is not None else {}))
            results = run_strategies(job.pipe, call,
                                     [(job.request.prompt, int(job.request.seed))], levels, strategies,
                                     knobs=knobs, progress=progress, cancel=lambda: job.stopped)
    if interrupted or job.stopped:
        results.cancelled = True
        results.rows = [] if "uncached" in interrupted else \
            [r for r in results.rows if StrategyPoint(r.strategy, r.knob, r.value).label not in interrupted]
    return TabStrategies(results, curve, job.request, total)
