"""Budget-optimal MagCache schedules: for a budget of computed steps per branch, the computed steps that minimise a
modelled output error, found exactly by dynamic programming.

MagCache's own rule is greedy: it skips while an accumulated error stays under a threshold. For a fixed number of
computed steps (a fixed speed-up) the best placement is a different question, and it has an exact answer when the
modelled error of a run is a sum over its *skip runs* (the skipped steps between two computed ones): the cost of a
run depends only on the computed step it reuses and on how long it lasts, so the optimum over all placements is a
shortest path through "step ``j`` is computed, ``k`` steps computed so far" (``O(C * N * K)``).

Pure Python (no torch), like :mod:`magcache.policy`: the CLI, the runtime and the tests use the same code, and a
:class:`PlannedBranchPolicy` decides the run's steps with the same interface as the threshold rule's
:class:`~magcache.policy.BranchPolicy`, so ``handle.predict(N)`` equals the run.

Error models (``ERROR_MODELS``), per branch, for a step ``s`` skipped after the last computed step ``c``:

* ``"magcache"``: MagCache's accumulated error, ``|1 - prod(ratios[c+1..s])|`` summed over the skipped steps;
* ``"run_squared"``: the same step errors, but the errors of one skip run add up before they are squared (the
  steps of a run reuse one residual, so their errors point the same way and add linearly; different runs are
  treated as independent, so the squares add, as the mean squared output error would);
* ``"residual"``: the size of the residual change ``||r_s - r_c||`` relative to the first residual, from the norm
  curve (``||r_s|| / ||r_0|| = prod(ratios[1..s])``) and, where a calibration recorded it, the angle between
  ``r_c`` and ``r_s`` (the per-step angles from ``cos_dis = 1 - cos`` added along the way), summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from . import policy as P

ERROR_MODELS = ("magcache", "run_squared", "residual")
# Chosen on the demo model's tuning prompts: of these, it ranks measured output errors of equal-budget schedules best
# (docs/strategies.md).
DEFAULT_ERROR_MODEL = "residual"


# --------------------------------------------------------------------------------------------------
# Error models
# --------------------------------------------------------------------------------------------------
def step_errors(ratios: Sequence[float], model: str = DEFAULT_ERROR_MODEL,
                cos_dis: Sequence[float] | None = None) -> list[list[float]]:
    """``errors[c][s]`` (``s > c``): modelled error of skipping step ``s`` when ``c`` was the last computed step.
    ``ratios`` (and ``cos_dis``) are one branch's curves resampled to the run's steps (entry 0 the padding)."""
    if model not in ERROR_MODELS:
        raise ValueError(f"unknown error model {model!r}; choose one of {', '.join(ERROR_MODELS)}")
    n = len(ratios)
    if cos_dis is not None and len(cos_dis) != n:
        raise ValueError(f"cos_dis has {len(cos_dis)} entries for {n} steps")
    errors = [[0.0] * n for _ in range(n)]
    if model in ("magcache", "run_squared"):
        for c in range(n):
            acc = 1.0
            for s in range(c + 1, n):
                acc *= ratios[s]
                errors[c][s] = abs(1.0 - acc)
        return errors
    norms = [1.0]  # ||r_s|| / ||r_0||
    for s in range(1, n):
        norms.append(norms[-1] * ratios[s])
    # per-step angle between consecutive residuals: 1 - cos(theta) = cos_dis -> theta = acos(1 - cos_dis)
    angles = [0.0] + [math.acos(max(-1.0, min(1.0, 1.0 - float(d)))) for d in (cos_dis or [0.0] * n)[1:]]
    for c in range(n):
        theta = 0.0
        for s in range(c + 1, n):
            theta = min(math.pi, theta + angles[s])
            a, b = norms[c], norms[s]
            errors[c][s] = math.sqrt(max(0.0, a * a + b * b - 2 * a * b * math.cos(theta)))
    return errors


def run_costs(errors: Sequence[Sequence[float]], model: str = DEFAULT_ERROR_MODEL) -> list[list[float]]:
    """``cost[c][e]``: modelled error of the skip run ``c+1..e`` after computing ``c`` (0 when ``e == c``)."""
    n = len(errors)
    cost = [[0.0] * n for _ in range(n)]
    for c in range(n):
        total = 0.0
        for e in range(c + 1, n):
            total += errors[c][e]
            cost[c][e] = total * total if model == "run_squared" else total
    return cost


def schedule_cost(computed: Sequence[int], cost: Sequence[Sequence[float]]) -> float:
    """Modelled error of a schedule (its computed steps, step 0 among them) under ``run_costs``."""
    steps = sorted(set(computed))
    if not steps or steps[0] != 0:
        raise ValueError("a schedule must compute step 0 (no residual exists before it)")
    n = len(cost)
    ends = steps[1:] + [n]
    return sum(cost[c][e - 1] for c, e in zip(steps, ends))


# --------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------
def forced_steps(ratios: Sequence[float], settings: P.Settings, rules: P.Rules, branch_index: int = 0,
                 num_branches: int = 1, split_step: int | None = None) -> frozenset[int]:
    """Steps the schedule must compute, by the rules the threshold rule follows: step 0 (nothing to reuse yet), the
    retention steps, steps outside the window, the protected last steps, the rules' guarded steps (FLUX's step 11)
    and first step, and steps whose ratio jumps more than the rules allow (FramePack). The threshold is not used.
    ``split_step``: where a two-expert model switches experts (its retention windows follow the switch)."""
    num_steps = len(ratios)
    # the threshold's "cache off" switch does not apply to a planned schedule (K = 0 is handled by the caller)
    unthresholded = replace(settings, zero_thresh_disables=False, K=max(1, settings.K))
    policy = P.BranchPolicy(list(ratios), unthresholded, rules, num_steps, branch_index, num_branches,
                            split_step=split_step)
    forced = {0}
    for step in range(num_steps):
        if policy._eligible(step) is not None or policy._guarded_step(step):
            forced.add(step)
        elif rules.max_ratio_jump is not None and abs(1.0 - ratios[step]) > rules.max_ratio_jump:
            forced.add(step)
    return frozenset(forced)


def minimal_budget(num_steps: int, forced: frozenset[int] | set[int], max_skips: int | None) -> int:
    """The fewest computed steps that satisfy ``forced`` and at most ``max_skips`` consecutive skips."""
    if max_skips is None or max_skips >= num_steps:
        return len(forced)
    steps = sorted(forced) + [num_steps]
    # between consecutive forced steps f < g, the gap of g - f - 1 steps needs ceil((gap - K) / (K + 1)) computes
    return len(forced) + sum(max(0, -(-(g - f - 1 - max_skips) // (max_skips + 1))) for f, g in zip(steps, steps[1:]))


def budget_for_speedup(num_steps: int, target_speedup: float) -> int:
    """Computed steps per branch for a block-compute speed-up of at least ``target_speedup``: ``ceil(N / X)``."""
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) \
            or not math.isfinite(target_speedup) or target_speedup < 1:
        raise ValueError(f"target speed-up must be a number >= 1, got {target_speedup!r}")
    return max(1, math.ceil(num_steps / target_speedup - 1e-9))


# --------------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------------
def optimal_computed_steps(cost: Sequence[Sequence[float]], budget: int, forced: frozenset[int] | set[int] = frozenset({0}),
                           max_skips: int | None = None) -> tuple[list[int], float]:
    """The ``budget`` computed steps (of ``len(cost)``) with the least total ``cost`` (:func:`run_costs`), computing
    every ``forced`` step (step 0 always) and skipping at most ``max_skips`` steps in a row. Exact: dynamic
    programming over (last computed step, steps computed so far). Ties go to the earliest steps."""
    n = len(cost)
    forced = frozenset(forced) | {0}
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be between 1 and {n} computed steps, got {budget}")
    if max(forced) >= n:
        raise ValueError(f"forced step {max(forced)} outside a run of {n} steps")
    least = minimal_budget(n, forced, max_skips)
    if budget < least:
        raise ValueError(f"a budget of {budget} computed steps cannot satisfy the constraints of this run (retention, "
                         f"guards, K={max_skips}): it needs at least {least}")
    gap = n if max_skips is None else max_skips  # most consecutive skips
    # the earliest step a run ending just before j may start from: no forced step may be skipped
    last_forced_before = [0] * (n + 1)
    latest = 0
    for j in range(n + 1):
        last_forced_before[j] = latest
        if j in forced:
            latest = j
    inf = math.inf
    best = [[inf] * n for _ in range(budget + 1)]  # best[k][j]: k computed, the last of them j
    prev = [[-1] * n for _ in range(budget + 1)]
    best[1][0] = 0.0
    for k in range(2, budget + 1):
        for j in range(k - 1, n):
            lo = max(last_forced_before[j], j - gap - 1, k - 2)
            row, value, arg = best[k - 1], inf, -1
            for i in range(lo, j):
                v = row[i] + (cost[i][j - 1] if j - 1 > i else 0.0)
                if v < value:
                    value, arg = v, i
            best[k][j], prev[k][j] = value, arg
    lo = max(last_forced_before[n], n - 1 - gap, budget - 1)
    total, last = inf, -1
    for i in range(lo, n):
        v = best[budget][i] + (cost[i][n - 1] if n - 1 > i else 0.0)
        if v < total:
            total, last = v, i
    if last < 0 or total == inf:
        raise ValueError(f"no schedule of {budget} computed steps satisfies the constraints")
    steps, k = [], budget
    while last >= 0:
        steps.append(last)
        last, k = prev[k][last], k - 1
    return steps[::-1], total


# --------------------------------------------------------------------------------------------------
# A planned schedule as a per-branch policy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How to choose a run's computed steps: ``budget`` computed steps per branch, or ``ceil(N / target_speedup)``,
    placed to minimise ``error_model``."""

    budget: int | None = None
    target_speedup: float | None = None
    error_model: str = DEFAULT_ERROR_MODEL

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.target_speedup is None):
            raise ValueError("an optimal schedule needs exactly one of budget (computed steps per branch) or target_speedup")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"budget must be an integer >= 1 (computed steps per branch), got {self.budget!r}")
        if self.target_speedup is not None:
            budget_for_speedup(2, self.target_speedup)  # validates
        if self.error_model not in ERROR_MODELS:
            raise ValueError(f"unknown error model {self.error_model!r}; choose one of {', '.join(ERROR_MODELS)}")

    def budget_for(self, num_steps: int) -> int:
        if self.budget is not None:
            return min(self.budget, num_steps)
        return budget_for_speedup(num_steps, self.target_speedup)


@dataclass
class PlannedBranchPolicy:
    """One branch's run with a planned schedule. Same interface as :class:`magcache.policy.BranchPolicy`: the runtime
    and :func:`magcache.policy.simulate_policies` call ``decide`` step by step."""

    ratios: list[float]  # resampled to num_steps (and square-rooted if the settings say so)
    settings: P.Settings
    rules: P.Rules
    num_steps: int
    plan: Plan
    branch_index: int = 0
    num_branches: int = 1
    cos_dis: list[float] | None = None  # resampled like ratios; used by the "residual" model where calibrated
    split_step: int | None = None  # two-expert models: steps the first expert runs (see forced_steps)
    computed: frozenset[int] = field(init=False, default=frozenset())
    _errors: list[list[float]] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self.ratios) != self.num_steps:
            raise ValueError(f"ratio curve has {len(self.ratios)} entries for {self.num_steps} steps")
        self._errors = step_errors(self.ratios, self.plan.error_model, self.cos_dis)
        self.set_num_branches(self.num_branches)

    def set_num_branches(self, num_branches: int) -> None:
        """Retention counted in calls (Wan's rule) depends on the branch count, known from step 1 on; step 0 is
        computed in every plan, so planning again then changes no decision already taken."""
        self.num_branches = num_branches
        n = self.num_steps
        if self.settings.K == 0:
            self.computed = frozenset(range(n))
            return
        forced = forced_steps(self.ratios, self.settings, self.rules, self.branch_index, num_branches, self.split_step)
        cost = run_costs(self._errors, self.plan.error_model)
        steps, _ = optimal_computed_steps(cost, self.plan.budget_for(n), forced, self.settings.K)
        self.computed = frozenset(steps)

    def decide(self, step: int, has_residual: bool) -> P.Decision:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside a run of {self.num_steps} steps")
        ratio = self.ratios[step]
        if step in self.computed:
            return P.Decision(step, False, ratio, 0.0, "planned compute")
        if not has_residual:
            return P.Decision(step, False, ratio, 0.0, "no residual yet")
        last = max(c for c in self.computed if c < step)
        return P.Decision(step, True, ratio, self._errors[last][step], "planned skip")


def branch_cos_curve(cos_curves: Sequence[Sequence[float]] | None, num_steps: int, rules: P.Rules,
                     branch_index: int) -> list[float] | None:
    """One branch's cosine-distance curve resampled to ``num_steps`` (None where none was calibrated)."""
    if not cos_curves:
        return None
    return P.branch_curve(P.prepare_curves(cos_curves, num_steps, False, rules.step_mapping), branch_index)


def make_planned_policies(curves: Sequence[Sequence[float]], num_steps: int, num_branches: int, settings: P.Settings,
                          rules: P.Rules, plan: Plan, cos_curves: Sequence[Sequence[float]] | None = None,
                          split_step: int | None = None) -> list[PlannedBranchPolicy]:
    """One :class:`PlannedBranchPolicy` per branch (each planned on its own curves; ``cos_curves``: the calibrated
    cosine distances per branch, if any; ``split_step``: a two-expert model's switch)."""
    if num_branches < 1:
        raise ValueError("num_branches must be >= 1")
    prepared = P.prepare_curves(curves, num_steps, settings.sqrt_ratios, rules.step_mapping)
    return [PlannedBranchPolicy(P.branch_curve(prepared, b), settings, rules, num_steps, plan, b, num_branches,
                                branch_cos_curve(cos_curves, num_steps, rules, b), split_step)
            for b in range(num_branches)]


def simulate_plan(curves: Sequence[Sequence[float]], num_steps: int, settings: P.Settings, rules: P.Rules,
                  plan: Plan, num_branches: int = 1, cos_curves: Sequence[Sequence[float]] | None = None,
                  split_step: int | None = None) -> P.Schedule:
    """The schedule a run with ``plan`` takes (the runtime calls the same policies)."""
    policies = make_planned_policies(curves, num_steps, num_branches, settings, rules, plan, cos_curves, split_step)
    return P.simulate_policies(policies, num_steps)


def modelled_error(schedule: P.Schedule, curves: Sequence[Sequence[float]], settings: P.Settings, rules: P.Rules,
                   error_model: str = DEFAULT_ERROR_MODEL, cos_curves: Sequence[Sequence[float]] | None = None
                   ) -> dict[str, float]:
    """Each branch's modelled error of any schedule (threshold rule, planned, forced), to compare them."""
    prepared = P.prepare_curves(curves, schedule.num_steps, settings.sqrt_ratios, rules.step_mapping)
    out = {}
    for b, (name, steps) in enumerate(schedule.computed.items()):
        errors = step_errors(P.branch_curve(prepared, b), error_model,
                             branch_cos_curve(cos_curves, schedule.num_steps, rules, b))
        out[name] = schedule_cost(steps, run_costs(errors, error_model))
    return out
