"""Tuning helpers for the studio: solve for a speed-up target, and sweep thresh x K (x retention) on a model.

No Gradio here: the app's handlers call these functions and draw what they return.

* :func:`solve_for_speedup` picks the threshold (and suggests K) that reaches a target speed-up with the current
  ratio curve and retention, by simulating schedules with the policy code the runtime uses.
* :func:`run_sweep` runs a bounded grid for one prompt/seed through any ``generate(point)`` callable (the app
  plugs in its runner; :class:`PipelineSweep` is the default for a diffusers pipeline): a baseline once, then
  per point the measured and predicted speed-up, PSNR/SSIM to the baseline and the computed steps, with a
  progress callback and cancellation between points. :func:`pareto_front` and
  :meth:`SweepResult.table` give the front and dataframe rows (``ui/plots.py`` draws the plot).
"""

from __future__ import annotations

import csv
import io
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import optimal as O
from .. import policy as P

DEFAULT_MAX_POINTS = 36
DEFAULT_K_RANGE = range(1, 7)  # ComfyUI-MagCache's K widget allows 0-6; K=0 never skips
DEFAULT_MAX_THRESH = 1.0  # the references use 0.02-0.24; an accumulated error of 1 is far past useful


# --------------------------------------------------------------------------------------------------
# Speed-up target
# --------------------------------------------------------------------------------------------------
@dataclass
class TargetSolution:
    """What :func:`solve_for_speedup` chose, and why."""

    target: float
    reached: bool
    settings: P.Settings  # thresh and K chosen; the other fields as given
    schedule: P.Schedule
    predicted_speedup: float
    explanation: str
    tried: list[tuple[int, float | None, float]] = field(default_factory=list)  # (K, thresh or None, best speed-up)
    optimal: OptimalSolution | None = None  # the budget-optimal schedule for the same target (optimal_for_target)

    @property
    def computed(self) -> int:
        return self.schedule.computed_count()

    @property
    def total(self) -> int:
        return self.schedule.num_steps * len(self.schedule.decisions)


@dataclass
class OptimalSolution:
    """The budget-optimal schedule (:mod:`magcache.optimal`) for a speed-up target, beside the threshold rule's: both
    scored by the same error model (summed over branches; a model of the output error, not a measurement)."""

    budget: int  # computed steps per branch: ceil(N / target)
    error_model: str
    schedule: P.Schedule | None  # None: the budget cannot satisfy the retention, the rules' guards and K (problem)
    modelled_error: float | None
    threshold_error: float  # the threshold rule's schedule of the same solve
    problem: str = ""


def optimal_for_target(solution: TargetSolution, curves: Sequence[Sequence[float]], rules: P.Rules,
                       cos_curves: Sequence[Sequence[float]] | None = None,
                       error_model: str = O.DEFAULT_ERROR_MODEL) -> OptimalSolution:
    """The optimal schedule of ``ceil(N / target)`` computed steps per branch under the settings ``solution`` chose
    (its retention and K), and the modelled error of both schedules."""
    settings, threshold = solution.settings, solution.schedule
    n, branches = threshold.num_steps, len(threshold.decisions)
    budget = O.budget_for_speedup(n, solution.target)
    threshold_error = sum(O.modelled_error(threshold, curves, settings, rules, error_model, cos_curves).values())
    try:
        schedule = O.simulate_plan(curves, n, settings, rules, O.Plan(budget=budget, error_model=error_model), branches,
                                   cos_curves)
    except ValueError as e:
        return OptimalSolution(budget, error_model, None, None, threshold_error, str(e))
    error = sum(O.modelled_error(schedule, curves, settings, rules, error_model, cos_curves).values())
    return OptimalSolution(budget, error_model, schedule, error, threshold_error)


def solve_for_speedup(
    curves: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    settings: P.Settings,
    rules: P.Rules,
    num_branches: int = 1,
    K_range: Iterable[int] = DEFAULT_K_RANGE,
    max_thresh: float = DEFAULT_MAX_THRESH,
    overhead_fraction: float = 0.0,
) -> TargetSolution:
    """Threshold and K for a target speed-up with the given curve, retention and rules: the smallest K that can
    reach the target with a threshold up to ``max_thresh``, then the smallest threshold for that K (the gentlest
    schedule that is fast enough). If no K reaches it, the fastest setting found. The speed-up is the predicted
    block-compute speed-up (:meth:`magcache.policy.Schedule.predicted_speedup`). Same contract as
    :func:`magcache.policy.solve_thresh_for_speedup`, plus the explanation shown in the app."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target < 1:
        raise ValueError(f"target speed-up must be a number >= 1, got {target!r}")
    Ks = sorted({int(k) for k in K_range if int(k) >= 1})
    if not Ks:
        raise ValueError("K_range needs at least one K >= 1")
    chosen, schedule, tried = P.solve_thresh_for_speedup(curves, num_steps, target, settings, rules, num_branches, Ks,
                                                         overhead_fraction, max_thresh)
    reached = tried[-1][1] is not None
    speedup = schedule.predicted_speedup(overhead_fraction)
    text = _explain(target, reached, chosen, schedule, speedup, tried, rules, max_thresh)
    return TargetSolution(target, reached, chosen, schedule, speedup, text, tried)


def _explain(target: float, reached: bool, s: P.Settings, schedule: P.Schedule, speedup: float,
             tried: list[tuple[int, float | None, float]], rules: P.Rules, max_thresh: float) -> str:
    n, branches = schedule.num_steps, len(schedule.decisions)
    computed = schedule.computed_count()
    if branches == 1:
        steps = f"{computed} of {n} steps"
    else:
        per_branch = ", ".join(f"{b} {len(v)}" for b, v in schedule.computed.items())
        steps = f"{computed} of {n * branches} branch steps ({per_branch})"
    per_call = rules.retention_per_call and branches > 1
    kept = P.retention_boundary(n, s.retention_ratio, rules.retention_rounding, branches if per_call else 1)
    kept_text = f"retention {s.retention_ratio:g} always computes the first {kept} {'calls' if per_call else 'steps'}"
    if reached:
        text = (f"Target {target:g}x: thresh {s.thresh:g} with K={s.K} computes {steps}, predicted {speedup:.2f}x "
                f"(block compute); {kept_text}.")
        failed = [f"K={k} tops out at {sp:.2f}x" for k, t, sp in tried if t is None]
        if failed:
            text += f" Smaller K cannot reach it with thresh <= {max_thresh:g} ({'; '.join(failed)})."
        return text
    return (f"Target {target:g}x is out of reach with thresh <= {max_thresh:g} and K <= {max(k for k, _, _ in tried)}: "
            f"the fastest is thresh {s.thresh:g} with K={s.K}, computing {steps} for {speedup:.2f}x; {kept_text}. "
            f"Lower the retention for more.")


# --------------------------------------------------------------------------------------------------
# Sweep: grid, rows, result
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    thresh: float
    K: int
    retention_ratio: float

    def settings(self) -> dict:
        """Keyword arguments for ``handle.configure(**point.settings())`` (what clicking a point applies)."""
        return {"thresh": self.thresh, "K": self.K, "retention_ratio": self.retention_ratio}

    def label(self) -> str:
        return f"t{self.thresh:g} K{self.K} R{self.retention_ratio:g}"


def sweep_grid(
    thresholds: Iterable[float],
    Ks: Iterable[int],
    retentions: Iterable[float],
    max_points: int = DEFAULT_MAX_POINTS,
) -> list[SweepPoint]:
    """All combinations (duplicates dropped, each value validated), retention outermost and thresh innermost.
    Raises ``ValueError`` if the grid is empty or larger than ``max_points``."""
    ts, ks, rs = (list(dict.fromkeys(v)) for v in (thresholds, Ks, retentions))
    for t in ts:
        for k in ks:
            for r in rs:
                P.validate_settings(t, r, k)
    points = [SweepPoint(float(t), int(k), float(r)) for r in rs for k in ks for t in ts]
    if not points:
        raise ValueError("the sweep grid is empty: give at least one thresh, one K and one retention")
    if len(points) > max_points:
        raise ValueError(f"the sweep grid has {len(points)} points; the limit is {max_points}")
    return points


@dataclass
class SweepRow:
    point: SweepPoint
    seconds: float
    measured_speedup: float  # baseline seconds / seconds
    computed: dict[str, int]  # computed steps per branch (summed over runs: FramePack sections)
    total_steps: int  # branch steps of a full run (summed over runs)
    psnr: float
    ssim: float
    predicted_speedup: float | None = None  # from the policy's simulated schedule
    matches_prediction: bool | None = None  # the run computed exactly the predicted steps
    pareto: bool = False

    @property
    def computed_steps(self) -> int:
        return sum(self.computed.values())

    @property
    def actual_block_speedup(self) -> float:
        return self.total_steps / self.computed_steps if self.computed_steps else float("inf")

    def speedup(self, axis: str) -> float:
        """The speed-up on ``axis``: "measured" (wall clock) or "predicted" (block compute, simulated)."""
        if axis == "predicted":
            return self.predicted_speedup if self.predicted_speedup is not None else self.actual_block_speedup
        return self.measured_speedup


TABLE_HEADERS = ["thresh", "K", "retention", "computed", "predicted x", "measured x", "time s", "PSNR dB", "SSIM",
                 "Pareto"]


@dataclass
class SweepResult:
    baseline_seconds: float
    rows: list[SweepRow]
    total_points: int
    cancelled: bool = False
    speedup_axis: str = "measured"  # which speed-up the Pareto front uses

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Headers and rows for a dataframe, one row per finished point, in grid order."""
        out = []
        for r in self.rows:
            p = r.point
            out.append([
                p.thresh, p.K, p.retention_ratio, f"{r.computed_steps}/{r.total_steps}",
                None if r.predicted_speedup is None else round(r.predicted_speedup, 3), round(r.measured_speedup, 3),
                round(r.seconds, 3), round(r.psnr, 2), round(r.ssim, 4), "yes" if r.pareto else "",
            ])
        return list(TABLE_HEADERS), out

    def to_csv(self) -> str:
        headers, rows = self.table()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(headers)
        writer.writerows(rows)
        return buf.getvalue()

    def front(self) -> list[SweepRow]:
        """Pareto-optimal rows, fastest first."""
        return sorted((r for r in self.rows if r.pareto), key=lambda r: -r.speedup(self.speedup_axis))

    def settings_at(self, index: int) -> dict:
        """Settings of the ``index``-th row (a clicked table row or plot point), for ``handle.configure``."""
        return self.rows[index].point.settings()


def pareto_front(rows: Sequence[SweepRow], speedup: str = "measured", quality: str = "psnr") -> list[int]:
    """Indices of the rows no other row beats on both speed-up and quality (higher is better for both)."""
    if speedup not in ("measured", "predicted") or quality not in ("psnr", "ssim"):
        raise ValueError("speedup is 'measured' or 'predicted'; quality is 'psnr' or 'ssim'")
    values = [(r.speedup(speedup), getattr(r, quality)) for r in rows]
    front = []
    for i, (x, y) in enumerate(values):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(values) if j != i)
        if not dominated:
            front.append(i)
    return front


# --------------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------------
Generate = Callable[[SweepPoint | None], tuple[Any, float, Any]]
Predict = Callable[[Sequence[Any]], Sequence[P.Schedule]]
Progress = Callable[[int, int, str], None]


def _as_runs(run_stats: Any) -> list:
    if run_stats is None:
        return []
    return list(run_stats) if isinstance(run_stats, (list, tuple)) else [run_stats]


def _stop_check(cancel: Any) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a threading.Event or a callable returning True to stop")


def run_sweep(
    generate: Generate,
    points: Sequence[SweepPoint],
    *,
    predict: Predict | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    warmup: bool = True,
    speedup_axis: str = "measured",
) -> SweepResult:
    """Baseline once (``generate(None)``: cache off), then ``generate(point)`` for each point.

    ``generate(point) -> (output, seconds, run_stats)``: the output (image/video array in [0, 1] or PIL), the
    generation time and the MagCache ``RunStats`` of the call (one, a list for multi-run pipelines, or ``None``).
    ``predict(runs) -> schedules`` (optional) simulates each run's schedule, giving the predicted speed-up and a
    check that the run took the predicted steps. ``warmup`` runs the baseline once untimed first, so one-time
    start-up costs do not inflate the speed-ups. ``cancel`` (an Event or a callable) is checked before each
    generation; a cancelled sweep returns the rows finished so far with ``cancelled=True``.
    """
    from ..metrics import psnr, ssim

    if len(points) > max_points:
        raise ValueError(f"the sweep has {len(points)} points; the limit is {max_points}")
    if speedup_axis not in ("measured", "predicted"):
        raise ValueError("speedup_axis is 'measured' or 'predicted'")
    stop = _stop_check(cancel)
    total = len(points) + 1 + int(warmup)
    done = 0

    def report(message: str) -> None:
        if progress is not None:
            progress(done, total, message)

    result = SweepResult(float("nan"), [], len(points), speedup_axis=speedup_axis)
    if warmup:
        report("warm-up run (not timed)")
        if stop():
            result.cancelled = True
            return result
        generate(None)
        done += 1
    report("baseline (cache off)")
    if stop():
        result.cancelled = True
        return result
    baseline, result.baseline_seconds, _ = generate(None)
    done += 1
    for point in points:
        report(f"{done - int(warmup)}/{len(points)}: {point.label()}")
        if stop():
            result.cancelled = True
            break
        output, seconds, run_stats = generate(point)
        runs = _as_runs(run_stats)
        computed: dict[str, int] = {}
        for r in runs:
            for branch, steps in r.computed.items():
                computed[branch] = computed.get(branch, 0) + len(steps)
        row = SweepRow(
            point=point,
            seconds=seconds,
            measured_speedup=result.baseline_seconds / seconds if seconds > 0 else float("inf"),
            computed=computed,
            total_steps=sum(r.num_steps * len(r.branches) for r in runs),
            psnr=psnr(baseline, output),
            ssim=ssim(baseline, output),
        )
        if predict is not None and runs:
            schedules = list(predict(runs))
            predicted_computed = sum(s.computed_count() for s in schedules)
            predicted_total = sum(s.num_steps * len(s.decisions) for s in schedules)
            row.predicted_speedup = predicted_total / predicted_computed if predicted_computed else float("inf")
            row.matches_prediction = len(schedules) == len(runs) and all(
                s.computed == r.computed for s, r in zip(schedules, runs))
        result.rows.append(row)
        done += 1
    for i in pareto_front(result.rows, speedup_axis):
        result.rows[i].pareto = True
    report("cancelled" if result.cancelled else "done")
    return result


def predictor(curves: Sequence[Sequence[float]], rules: P.Rules) -> Predict:
    """``predict`` for :func:`run_sweep`: each run's schedule simulated from its own settings and branch count."""

    def predict(runs: Sequence[Any]) -> list[P.Schedule]:
        return [P.simulate(curves, r.num_steps, r.settings, rules, max(1, len(r.branches))) for r in runs]

    return predict


def main_output(result: Any) -> Any:
    """The image/video array of a diffusers pipeline result (``.images`` or ``.frames``), else the result."""
    for name in ("images", "frames"):
        value = getattr(result, name, None)
        if value is not None:
            return value
    if isinstance(result, (tuple, list)) and result:
        return result[0]
    return result


class PipelineSweep:
    """Default sweep runner for a diffusers pipeline: the same prompt and seed for every generation (a fresh CPU
    generator per call, so every run starts from the same noise), MagCache switched per point on the pipeline's
    handle (applied with ``apply_kwargs`` if there is none), timings around the pipeline call (CUDA synchronised).
    The handle's settings, curves and switches are restored afterwards.

        sweep = PipelineSweep(pipe, {"prompt": "...", "num_inference_steps": 28}, seed=0)
        result = sweep.run(sweep_grid([0.06, 0.12, 0.24], [2, 4], [0.2]), progress=..., cancel=event)
    """

    def __init__(self, pipe: Any, call_kwargs: Mapping[str, Any], *, seed: int = 0, handle: Any = None,
                 **apply_kwargs: Any):
        from ..runtime import apply, get_handle

        self.pipe = pipe
        self.call_kwargs = dict(call_kwargs)
        self.call_kwargs.setdefault("output_type", "np")
        self.seed = seed
        existing = handle or get_handle(pipe)
        self._own_handle = existing is None
        self.handle = existing if existing is not None else apply(pipe, **apply_kwargs)

    def generate(self, point: SweepPoint | None) -> tuple[Any, float, list]:
        import torch

        from ..measure import new_runs_of
        from .jobs import synchronize

        h = self.handle
        if point is None:
            h.configure(enabled=False)
        else:
            h.configure(enabled=True, calibrate=False, computed_steps=None, **point.settings())
        kwargs = dict(self.call_kwargs)
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(self.seed)
        with new_runs_of(h) as runs:
            synchronize()
            start = time.perf_counter()
            result = self.pipe(**kwargs)
            synchronize()
            seconds = time.perf_counter() - start
        return main_output(result), seconds, runs

    def run(self, points: Sequence[SweepPoint], **kwargs: Any) -> SweepResult:
        """:func:`run_sweep` with this runner and the handle's curve/rules as predictor; restores the handle."""
        h = self.handle
        saved = (h.settings, h.enabled, h.calibrate, h.computed_steps)
        try:
            return run_sweep(self.generate, points, predict=predictor(h.curves, h.rules), **kwargs)
        finally:
            if self._own_handle:
                h.remove()
            else:
                s = saved[0]
                h.configure(thresh=s.thresh, retention_ratio=s.retention_ratio, K=s.K, enabled=saved[1],
                            calibrate=saved[2], computed_steps=saved[3])
