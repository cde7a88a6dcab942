"""The MagCache decision rule, ratio resampling and schedule simulation.

Pure Python (no torch, no numpy): the runtime, the CLI, the app's live preview and the tests all call
this one module, so a predicted schedule and the schedule a real run takes cannot drift apart.

Vocabulary
----------
* **step** ``i``: 0-based denoising step of one run (one scheduler pass; one FramePack section).
* **branch**: one transformer pass per step with its own cache (``"cond"``, and ``"uncond"`` with true CFG).
* **ratio curve**: ``mag_ratios[i]`` = mean over tokens of ``||r_i|| / ||r_{i-1}||`` for a branch's block-stack
  residual ``r``; entry 0 is padding (1.0).
* **Rules**: the details in which the reference implementations differ (comparison, retention rounding,
  guards). Each preset carries the rules of the implementation its curve comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, NamedTuple, Sequence

BRANCH_NAMES = ("cond", "uncond")


# --------------------------------------------------------------------------------------------------
# Ratio curves
# --------------------------------------------------------------------------------------------------
def nearest_interp(src: Sequence[float], n: int) -> list[float]:
    """Resample ``src`` to ``n`` points by nearest index, exactly like the reference ``nearest_interp``.

    ``idx = round(arange(n) * (len(src) - 1) / (n - 1))`` with round-half-to-even (numpy's ``np.round``;
    Python's ``round`` rounds the same way), and ``[src[-1]]`` for ``n == 1``.
    """
    if n < 1:
        raise ValueError(f"cannot resample a ratio curve to {n} steps")
    if not src:
        raise ValueError("empty ratio curve")
    if n == 1:
        return [float(src[-1])]
    scale = (len(src) - 1) / (n - 1)
    return [float(src[int(round(i * scale))]) for i in range(n)]


def resample(src: Sequence[float], n: int, mapping: str = "nearest") -> list[float]:
    """Resample a curve to ``n`` steps: ``"nearest"`` is :func:`nearest_interp` (research code, diffusers);
    ``"floor"`` is ComfyUI-MagCache's index map ``int(i * ((L - 1) / (n - 1)))`` (identity when ``n == L``)."""
    if mapping == "nearest":
        return nearest_interp(src, n)
    if n < 1 or not src:
        raise ValueError(f"cannot resample a ratio curve of {len(src)} values to {n} steps")
    return [float(src[floor_index(i, n, len(src))]) for i in range(n)]


def floor_index(step: int, num_steps: int, length: int) -> int:
    """ComfyUI-MagCache's calibrated index of ``step`` in a run of ``num_steps`` steps."""
    if num_steps == length or num_steps == 1:
        return step
    return int(step * ((length - 1) / (num_steps - 1)))


def split_branches(ratios: Sequence[float], interleaved: bool) -> list[list[float]]:
    """Split a published curve into per-branch curves: interleaved arrays hold cond at even and uncond at
    odd indices; a plain array is the cond curve (and is reused for uncond, which nobody calibrated)."""
    if interleaved:
        if len(ratios) % 2:
            raise ValueError(f"an interleaved ratio curve needs an even length, got {len(ratios)}")
        return [list(map(float, ratios[0::2])), list(map(float, ratios[1::2]))]
    return [list(map(float, ratios))]


def branch_curve(curves: Sequence[Sequence[float]], branch_index: int) -> list[float]:
    """The curve a branch uses: its own if calibrated, else the cond curve."""
    return list(curves[branch_index] if branch_index < len(curves) else curves[0])


# --------------------------------------------------------------------------------------------------
# Rules and settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rules:
    """How one reference implementation applies MagCache: the MagCache research code (one repository per model
    family), ComfyUI-MagCache or diffusers.

    compare:            ``"<="`` (research code for FLUX/Kontext/HunyuanVideo/FramePack, ComfyUI-MagCache's Wan,
                        diffusers) or ``"<"`` (research code for Wan, ComfyUI-MagCache's FLUX/HunyuanVideo/Chroma).
    retention_rounding: ``"floor"`` -> ``int(R*N)``; ``"half_up"`` -> ``int(R*N + 0.5)`` (research code for FLUX,
                        diffusers).
    retention_per_call: the research code for Wan counts transformer *calls* over interleaved cond/uncond: call
                        ``c = i*B + b`` is eligible once ``c >= floor(B*N*R)`` (B = number of branches).
    first_step_computed: FramePack's ``cnt >= 1``: step 0 is never eligible.
    max_ratio_jump:     FramePack's guard: skip only where ``|1 - ratio[i]| <= max_ratio_jump``.
    guarded_steps:      calibrated step indices that are never skipped (FLUX/Kontext: 11), mapped from a run of
                        N steps by ``round(i * ((guard_reference_steps - 1) / (N - 1)))`` (research code) or, with
                        ``step_mapping="floor"``, by ComfyUI's floor map.
    guard_accumulates:  True (research code): a guarded step's ratio is accumulated and, being computed, resets
                        the accumulators. False (ComfyUI FLUX): the guarded step is computed without touching them.
    step_mapping:       how a run of N steps indexes a curve of another length: ``"nearest"`` (``nearest_interp``,
                        research code and diffusers) or ``"floor"`` (ComfyUI-MagCache's ``int(i*(L-1)/(N-1))``).
    """

    compare: str = "<="
    retention_rounding: str = "floor"
    retention_per_call: bool = False
    first_step_computed: bool = False
    max_ratio_jump: float | None = None
    guarded_steps: tuple[int, ...] = ()
    guard_reference_steps: int = 28
    guard_accumulates: bool = True
    step_mapping: str = "nearest"

    def __post_init__(self) -> None:
        if self.compare not in ("<", "<="):
            raise ValueError(f"compare must be '<' or '<=', got {self.compare!r}")
        if self.retention_rounding not in ("floor", "half_up"):
            raise ValueError(f"retention_rounding must be 'floor' or 'half_up', got {self.retention_rounding!r}")
        if self.step_mapping not in ("nearest", "floor"):
            raise ValueError(f"step_mapping must be 'nearest' or 'floor', got {self.step_mapping!r}")


@dataclass(frozen=True)
class Settings:
    """User-facing knobs. ``thresh``/``retention_ratio``/``K`` are MagCache's; the rest are our options,
    documented and off by default unless noted, so the reference schedule is never changed silently.

    zero_thresh_disables: thresh 0 turns caching off (ComfyUI-MagCache's rule). On by default: with ``<=``
                          and a ratio of exactly 1.0 a zero threshold would otherwise still skip.
    protect_last_steps:   always compute the last n steps (no reference protects the final step).
    sqrt_ratios:          use ``sqrt(ratio)``, as the paper's evaluation did.
    start_step/end_step:  ComfyUI-style window of eligible steps; ``end_step`` < 0 counts from the end.
    """

    thresh: float
    retention_ratio: float
    K: int
    zero_thresh_disables: bool = True
    protect_last_steps: int = 0
    sqrt_ratios: bool = False
    start_step: int = 0
    end_step: int = -1

    def __post_init__(self) -> None:
        validate_settings(self.thresh, self.retention_ratio, self.K)
        if self.protect_last_steps < 0:
            raise ValueError("protect_last_steps must be >= 0")
        if self.start_step < 0:
            raise ValueError("start_step must be >= 0")

    @property
    def enabled(self) -> bool:
        return not (self.zero_thresh_disables and self.thresh == 0) and self.K > 0


def validate_settings(thresh: float, retention_ratio: float, K: int) -> None:
    """Raise ``ValueError`` with a message a user can act on."""
    for name, value in (("thresh", thresh), ("retention_ratio", retention_ratio)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if thresh < 0:
        raise ValueError(f"thresh must be >= 0, got {thresh}")
    if not 0 <= retention_ratio <= 1:
        raise ValueError(f"retention_ratio must be between 0 and 1, got {retention_ratio}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an integer >= 0, got {K!r}")


def retention_boundary(num_steps: int, retention_ratio: float, rounding: str, units: int = 1) -> int:
    """First eligible index, counted in steps (``units=1``) or in calls over ``units`` branches."""
    # Same float64 product as the references (``int(R*N)``, ``int(R*N + 0.5)``, Wan's research code ``int(2N*R)``); no
    # epsilon, so a product like 0.29*100 = 28.999999999999996 rounds exactly as theirs does.
    x = retention_ratio * (num_steps * units)
    return int(x + 0.5) if rounding == "half_up" else int(x)


# --------------------------------------------------------------------------------------------------
# The per-branch decision rule
# --------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    step: int
    skip: bool
    ratio: float
    acc_err: float  # accumulated error used for this decision (0.0 where the step was not eligible)
    reason: str  # why the step was computed or skipped (for stats and plots)


@dataclass
class BranchPolicy:
    """State of one branch over one run. ``decide`` is the whole MagCache rule."""

    ratios: list[float]  # already resampled to ``num_steps`` and (optionally) square-rooted
    settings: Settings
    rules: Rules
    num_steps: int
    branch_index: int = 0
    num_branches: int = 1
    acc_ratio: float = 1.0
    acc_steps: int = 0
    acc_err: float = 0.0
    _retain_until: int = field(init=False, default=0)
    _end: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.ratios) != self.num_steps:
            raise ValueError(f"ratio curve has {len(self.ratios)} entries for {self.num_steps} steps")
        s = self.settings
        self._end = s.end_step if s.end_step >= 0 else self.num_steps + s.end_step
        self.set_num_branches(self.num_branches)

    def set_num_branches(self, num_branches: int) -> None:
        """A run learns how many branches it has only after its first step, when the second branch has shown up
        or not. Step 0 is always computed (no residual exists yet) and leaves the accumulators reset either way,
        so fixing the count then changes no decision."""
        self.num_branches = num_branches
        units = num_branches if self.rules.retention_per_call else 1
        self._retain_until = retention_boundary(self.num_steps, self.settings.retention_ratio, self.rules.retention_rounding, units)

    def _eligible(self, step: int) -> str | None:
        """None if the step may be skipped, else the reason it must be computed (no accumulation)."""
        s, r = self.settings, self.rules
        if not s.enabled:
            return "cache off"
        position = step * self.num_branches + self.branch_index if r.retention_per_call else step
        if position < self._retain_until:
            return "retention"
        if r.first_step_computed and step < 1:
            return "first step"
        if not s.start_step <= step <= self._end:
            return "outside window"
        if step >= self.num_steps - s.protect_last_steps:
            return "last steps"
        return None

    def _guarded_step(self, step: int) -> bool:
        r = self.rules
        if not r.guarded_steps:
            return False
        if r.step_mapping == "floor":
            return floor_index(step, self.num_steps, r.guard_reference_steps) in r.guarded_steps
        if self.num_steps < 2:
            return False
        # same float expression as the research code: np.round(cnt * ((28 - 1) / (num_steps - 1)))
        return int(round(step * ((r.guard_reference_steps - 1) / (self.num_steps - 1)))) in r.guarded_steps

    def _guarded(self, step: int, ratio: float) -> str | None:
        """Guards that force a compute *after* accumulating, as the research code does."""
        r = self.rules
        if r.guard_accumulates and self._guarded_step(step):
            return "guarded step"
        if r.max_ratio_jump is not None and abs(1.0 - ratio) > r.max_ratio_jump:
            return "ratio jump"
        return None

    def decide(self, step: int, has_residual: bool) -> Decision:
        """Decide whether ``step`` of this branch reuses the cached residual. Mutates the accumulators."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside a run of {self.num_steps} steps")
        ratio = self.ratios[step]
        reason = self._eligible(step)
        if reason is not None:
            return Decision(step, False, ratio, 0.0, reason)
        if not self.rules.guard_accumulates and self._guarded_step(step):
            return Decision(step, False, ratio, self.acc_err, "guarded step")  # accumulators carry over
        self.acc_ratio *= ratio
        self.acc_steps += 1
        self.acc_err += abs(1.0 - self.acc_ratio)
        err = self.acc_err
        under = err < self.settings.thresh if self.rules.compare == "<" else err <= self.settings.thresh
        if not under:
            reason = "error over thresh"
        elif self.acc_steps > self.settings.K:
            reason = "K reached"
        else:
            reason = self._guarded(step, ratio) or (None if has_residual else "no residual yet")
        if reason is None:
            return Decision(step, True, ratio, err, "skipped")
        self.acc_ratio, self.acc_steps, self.acc_err = 1.0, 0, 0.0
        return Decision(step, False, ratio, err, reason)


# --------------------------------------------------------------------------------------------------
# Building policies for a run, and simulating schedules without a model
# --------------------------------------------------------------------------------------------------
def prepare_curves(
    curves: Sequence[Sequence[float]], num_steps: int, sqrt: bool = False, mapping: str = "nearest"
) -> list[list[float]]:
    """Resample each branch curve to ``num_steps`` (and apply the optional sqrt smoothing)."""
    out = []
    for c in curves:
        rc = resample(c, num_steps, mapping)
        if sqrt:
            if any(v < 0 for v in rc):
                raise ValueError("sqrt smoothing needs non-negative ratios")
            rc = [math.sqrt(v) for v in rc]
        out.append(rc)
    return out


def make_branch_policies(
    curves: Sequence[Sequence[float]], num_steps: int, num_branches: int, settings: Settings, rules: Rules
) -> list[BranchPolicy]:
    """One fresh ``BranchPolicy`` per branch for a run of ``num_steps`` steps."""
    if num_branches < 1:
        raise ValueError("num_branches must be >= 1")
    prepared = prepare_curves(curves, num_steps, settings.sqrt_ratios, rules.step_mapping)
    return [
        BranchPolicy(branch_curve(prepared, b), settings, rules, num_steps, b, num_branches)
        for b in range(num_branches)
    ]


def branch_name(index: int) -> str:
    return BRANCH_NAMES[index] if index < len(BRANCH_NAMES) else f"branch{index}"


def computed_steps(decisions: Sequence[Decision]) -> list[int]:
    """The steps of one branch's decisions that ran the blocks (simulated or recorded by the runtime)."""
    return [d.step for d in decisions if not d.skip]


def skipped_steps(decisions: Sequence[Decision]) -> list[int]:
    """The steps of one branch's decisions that reused the cached residual."""
    return [d.step for d in decisions if d.skip]


@dataclass
class Schedule:
    """What a run does per branch: the decisions in step order."""

    num_steps: int
    decisions: dict[str, list[Decision]]

    @property
    def computed(self) -> dict[str, list[int]]:
        return {b: computed_steps(ds) for b, ds in self.decisions.items()}

    @property
    def skipped(self) -> dict[str, list[int]]:
        return {b: skipped_steps(ds) for b, ds in self.decisions.items()}

    def computed_count(self) -> int:
        return sum(len(v) for v in self.computed.values())

    def predicted_speedup(self, overhead_fraction: float = 0.0) -> float:
        """Block-compute speed-up; ``overhead_fraction`` is the share of a full step spent outside the blocks
        (embeddings, head, scheduler, which every step pays)."""
        total = self.num_steps * len(self.decisions)
        computed = self.computed_count()
        f = overhead_fraction
        return total / (f * total + (1 - f) * computed) if computed or f else float("inf")


def simulate(
    curves: Sequence[Sequence[float]], num_steps: int, settings: Settings, rules: Rules, num_branches: int = 1
) -> Schedule:
    """Predict the schedule of one run, calling the very ``decide`` the runtime calls."""
    policies = make_branch_policies(curves, num_steps, num_branches, settings, rules)
    decisions: dict[str, list[Decision]] = {branch_name(b): [] for b in range(num_branches)}
    has_residual = [False] * num_branches
    for step in range(num_steps):
        for b, policy in enumerate(policies):
            d = policy.decide(step, has_residual[b])
            has_residual[b] = has_residual[b] or not d.skip
            decisions[branch_name(b)].append(d)
    return Schedule(num_steps, decisions)


def _next_breakpoint(schedule: Schedule, compare: str) -> float | None:
    """The smallest threshold above the current one at which some decision of ``schedule`` flips. Only decisions
    computed because their error was over the threshold can flip when it grows, and the first of them to flip
    decides everything after it, so the schedule is constant between consecutive breakpoints."""
    over = [d.acc_err for ds in schedule.decisions.values() for d in ds if d.reason == "error over thresh"]
    if not over:
        return None
    err = min(over)
    return err if compare == "<=" else math.nextafter(err, math.inf)


def _short_thresh(exact: float, schedule: Schedule, simulate_at: Callable[[float], Schedule]) -> float:
    """A short decimal (4 digits if possible) at or above ``exact`` that gives the very same schedule."""
    for digits in range(4, 9):
        f = 10**digits
        candidate = math.ceil(exact * f) / f
        if candidate >= exact and simulate_at(candidate).computed == schedule.computed:
            return candidate
    return exact


def scan_thresh_for_speedup(
    curves: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    settings: Settings,
    rules: Rules,
    num_branches: int = 1,
    max_thresh: float = math.inf,
    overhead_fraction: float = 0.0,
) -> tuple[bool, float, Schedule]:
    """For ``settings.K``, visit every distinct schedule in order of growing threshold until one reaches
    ``target``: ``(reached, thresh, schedule)`` with the smallest reaching threshold, else the threshold of the
    fastest schedule up to ``max_thresh``. Exact where bisection is not: the computed-step count is not monotonic
    in the threshold (an earlier skip moves every later reset)."""

    def simulate_at(thresh: float) -> Schedule:
        # here 0 is just the smallest threshold, not the "cache off" switch
        return simulate(curves, num_steps, replace(settings, thresh=thresh, zero_thresh_disables=False), rules,
                        num_branches)

    thresh = 0.0
    fastest: tuple[float, float, Schedule] | None = None  # (speed-up, thresh, schedule)
    for _ in range(100_000):  # far above the number of breakpoints of any real curve
        schedule = simulate_at(thresh)
        speedup = schedule.predicted_speedup(overhead_fraction)
        if speedup >= target:
            return True, _short_thresh(max(thresh, 1e-6), schedule, simulate_at), schedule
        if fastest is None or speedup > fastest[0]:
            fastest = (speedup, thresh, schedule)
        nxt = _next_breakpoint(schedule, rules.compare)
        if nxt is None or nxt > max_thresh:
            break
        thresh = nxt
    assert fastest is not None
    _, thresh, schedule = fastest
    return False, _short_thresh(max(thresh, 1e-6), schedule, simulate_at), schedule


class SpeedupSolution(NamedTuple):
    """What :func:`solve_thresh_for_speedup` chose: the settings, their schedule, and each K tried in order as
    ``(K, smallest reaching threshold or None, best predicted speed-up)``; the target was reached iff the last
    entry has a threshold."""

    settings: Settings
    schedule: Schedule
    tried: list[tuple[int, float | None, float]]

    @property
    def reached(self) -> bool:
        return self.tried[-1][1] is not None


def solve_thresh_for_speedup(
    curves: Sequence[Sequence[float]],
    num_steps: int,
    target: float,
    settings: Settings,
    rules: Rules,
    num_branches: int = 1,
    K_candidates: Iterable[int] | None = None,
    overhead_fraction: float = 0.0,
    max_thresh: float = math.inf,
) -> SpeedupSolution:
    """The smallest K (of ``K_candidates``, default ``settings.K``) that reaches ``target``, with the smallest
    threshold that does (the gentlest schedule fast enough); if none reaches it, the fastest setting found."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"target speed-up must be a positive number, got {target!r}")
    Ks = sorted(set(K_candidates)) if K_candidates is not None else [settings.K]
    tried: list[tuple[int, float | None, float]] = []
    best: tuple[float, Settings, Schedule] | None = None
    for K in Ks:
        trial = replace(settings, K=K)
        reached, thresh, schedule = scan_thresh_for_speedup(
            curves, num_steps, target, trial, rules, num_branches, max_thresh, overhead_fraction)
        speedup = schedule.predicted_speedup(overhead_fraction)
        tried.append((K, thresh if reached else None, speedup))
        chosen = replace(trial, thresh=thresh)
        if reached:
            return SpeedupSolution(chosen, schedule, tried)
        if best is None or speedup > best[0] + 1e-12:
            best = (speedup, chosen, schedule)
    assert best is not None
    return SpeedupSolution(best[1], best[2], tried)
