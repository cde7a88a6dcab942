"""Caching strategies side by side at equal compute, on a loaded pipeline.

    from magcache.studio.strategies import run_strategies, strategies_figure
    results = run_strategies(pipe, {"num_inference_steps": 28, "height": 128, "width": 128},
                             items=[("a red circle", 0)], levels=(2, 3, 4))
    results.to_json(); strategies_figure(results)

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
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .. import optimal as O
from .. import policy as P
from ..adapters import adapter_for
from ..metrics import PSNR_IDENTICAL, psnr, ssim
from ..runtime import MagCacheHandle, apply, get_handle
from .sweep import main_output

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
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if not items:
        raise ValueError("run_strategies needs at least one (prompt, seed) item")
    num_steps = int(call_kwargs["num_inference_steps"])
    existing = get_handle(pipe)
    handle = existing if existing is not None else apply(pipe, **apply_kwargs)
    saved = (handle.settings, handle.enabled, handle.calibrate, handle.computed_steps, handle.plan)
    runner = _Runner(pipe, call_kwargs, items, handle)
    points: list[StrategyPoint] = []
    for s in strategies:
        if s in HOOK_KNOBS:
            knob, values = HOOK_KNOBS[s]
            points += [StrategyPoint(s, knob, float(v)) for v in (knobs or {}).get(s, values)]
        elif s == "magcache_optimal" and len(error_models) > 1:
            points += [StrategyPoint(f"{s}/{m}", "target_speedup", float(x)) for m in error_models for x in levels]
        else:
            points += [StrategyPoint(s, "target_speedup", float(x)) for x in levels]
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
# Plot
# --------------------------------------------------------------------------------------------------
def strategies_figure(results: StrategyResults, quality: str = "psnr", title: str | None = None):
    """Quality vs compute speed-up, one line per strategy (each over its own knob)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    markers = "osD^v<>xP*"
    for i, (name, rows) in enumerate(results.by_strategy().items()):
        # a setting that skipped nothing reproduces the uncached output (100 dB): left out, it would only stretch the axis
        rows = sorted((r for r in rows if r.compute_fraction < 1), key=lambda r: r.compute_speedup)
        ax.plot([r.compute_speedup for r in rows], [getattr(r, quality) for r in rows], marker=markers[i % len(markers)],
                lw=2.2 if name.startswith("magcache") else 1.2, label=name)
    ax.set_xlabel("speed-up in block work (uncached / executed, counted)")
    ax.set_ylabel("PSNR to the uncached output (dB)" if quality == "psnr" else "SSIM to the uncached output")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
