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
import struct
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
    ``"linspace"`` is the research Qwen-Image code's variant (the same indices for ``n >= 2``, the first entry for
    ``n == 1``); ``"floor"`` is ComfyUI-MagCache's index map ``int(i * ((L - 1) / (n - 1)))`` (identity when
    ``n == L``); ``"raw"`` is ComfyUI-MagCache's Qwen-Image forward, which indexes the curve by its call counter: a
    run of fewer steps uses the curve's first ``n`` entries, and a longer run is refused (ComfyUI-MagCache fails
    there with an IndexError)."""
    if mapping == "nearest":
        return nearest_interp(src, n)
    if n < 1 or not src:
        raise ValueError(f"cannot resample a ratio curve of {len(src)} values to {n} steps")
    if mapping == "linspace":
        return [float(src[0])] if n == 1 else nearest_interp(src, n)
    if mapping == "raw":
        if n > len(src):
            raise ValueError(
                f"this curve has {len(src)} steps and ComfyUI-MagCache indexes it by its call counter without "
                f"resampling, so a {n}-step run would index past its end (an IndexError there); refused: use at most "
                f"{len(src)} steps, or a calibration for {n} steps")
        return [float(v) for v in src[:n]]
    return [float(src[floor_index(i, n, len(src))]) for i in range(n)]


def floor_index(step: int, num_steps: int, length: int) -> int:
    """ComfyUI-MagCache's calibrated index of ``step`` in a run of ``num_steps`` steps. A 1-step run divides by
    zero there; we map its only step to calibrated step 0 instead."""
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
                        research code and diffusers), ``"linspace"`` (research Qwen-Image code), ``"floor"``
                        (ComfyUI-MagCache's ``int(i*(L-1)/(N-1))``) or ``"raw"`` (ComfyUI Qwen-Image: no mapping).
    expert_retention:   research Wan2.2 A14B, whose two experts split a run at ``split_step`` (the number of steps
                        the high-noise expert runs), counted in calls like ``retention_per_call``. ``"each_phase"``
                        (T2V): the first R of each expert phase is computed, i.e. call ``c`` with
                        ``c < int(S*R)`` or ``S <= c <= (B*N - S)*R + S`` (S = B*split_step). ``"high_phase"``
                        (I2V): calls ``c < int(S + (B*N - S)*R)``, the whole high-noise phase and the first R of
                        the low-noise one. One state spans both experts, as in the research code.
    expert_boundary, expert_flow_shift: where a two-expert model switches when no pipeline says so: at the first
                        timestep below ``expert_boundary * 1000`` of the reference sampler (UniPC flow sigmas with
                        this shift; Wan2.2's configs). A run passes the pipeline's real switch as ``split_step``.
    uncond_lags_one_step: ComfyUI Qwen-Image: with separate calls (uncond first) and the per-call reset at step 0,
                        the uncond call of step ``i`` reads the curve entry of step ``i - 1`` (its call counter is
                        one behind the cond call's).
    uncond_loses_first_residual: ComfyUI-MagCache resets its state on every call of step 0; the uncond call comes
                        first, so the cond call's reset wipes the uncond residual of step 0. Until uncond computes
                        again it has no residual (ComfyUI-MagCache would fail on a skip there; we compute).
    float32:            accumulate in float32 (ComfyUI-MagCache passes the curve as a float32 tensor).
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
    expert_retention: str | None = None
    expert_boundary: float | None = None
    expert_flow_shift: float | None = None
    uncond_lags_one_step: bool = False
    uncond_loses_first_residual: bool = False
    float32: bool = False

    def __post_init__(self) -> None:
        if self.compare not in ("<", "<="):
            raise ValueError(f"compare must be '<' or '<=', got {self.compare!r}")
        if self.retention_rounding not in ("floor", "half_up"):
            raise ValueError(f"retention_rounding must be 'floor' or 'half_up', got {self.retention_rounding!r}")
        if self.step_mapping not in ("nearest", "linspace", "floor", "raw"):
            raise ValueError(f"step_mapping must be 'nearest', 'linspace', 'floor' or 'raw', got {self.step_mapping!r}")
        if self.expert_retention not in (None, "each_phase", "high_phase"):
            raise ValueError(f"expert_retention must be None, 'each_phase' or 'high_phase', got {self.expert_retention!r}")


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


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


# --------------------------------------------------------------------------------------------------
# The per-branch decision rule
# --------------------------------------------------------------------------------------------------
# A skip was due but the branch holds no residual: the research code and ComfyUI-MagCache fail there (they add a
# None residual); we compute the step instead.
NO_RESIDUAL = "no residual yet"


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
    split_step: int | None = None  # steps run by the first (high-noise) expert; rules with expert_retention need it
    _retain_until: int = field(init=False, default=0)
    _end: int = field(init=False, default=0)
    _first_residual_lost: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if len(self.ratios) != self.num_steps:
            raise ValueError(f"ratio curve has {len(self.ratios)} entries for {self.num_steps} steps")
        s = self.settings
        self._end = s.end_step if s.end_step >= 0 else self.num_steps + s.end_step
        if self.rules.expert_retention is not None:
            if self.split_step is None:
                self.split_step = reference_split_step(self.rules, self.num_steps)
            if self.split_step is None:
                raise ValueError("these rules protect each expert phase of a two-expert model and need split_step, the "
                                 "number of steps the high-noise expert runs")
            if not 0 <= self.split_step <= self.num_steps:
                raise ValueError(f"split_step must be between 0 and {self.num_steps}, got {self.split_step}")
        self._first_residual_lost = self.rules.uncond_loses_first_residual and self.branch_index == 1
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
        if r.expert_retention is not None:
            if self._expert_protected(position):
                return "retention"
        elif position < self._retain_until:
            return "retention"
        if r.first_step_computed and step < 1:
            return "first step"
        if not s.start_step <= step <= self._end:
            return "outside window"
        if step >= self.num_steps - s.protect_last_steps:
            return "last steps"
        return None

    def _expert_protected(self, call: int) -> bool:
        """The research Wan2.2 A14B retention windows, in calls over all branches (same float expressions)."""
        split = self.split_step * self.num_branches
        total = self.num_steps * self.num_branches
        R = self.settings.retention_ratio
        if self.rules.expert_retention == "high_phase":
            return call < int(split + (total - split) * R)
        return call < int(split * R) or split <= call <= (total - split) * R + split

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
        decision = self._decide(step, has_residual)
        if step > 0 and not decision.skip:
            self._first_residual_lost = False  # computed after step 0: a residual of its own again
        return decision

    def _decide(self, step: int, has_residual: bool) -> Decision:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside a run of {self.num_steps} steps")
        ratio = self.ratios[step]
        reason = self._eligible(step)
        if reason is not None:
            return Decision(step, False, ratio, 0.0, reason)
        if not self.rules.guard_accumulates and self._guarded_step(step):
            return Decision(step, False, ratio, self.acc_err, "guarded step")  # accumulators carry over
        thresh = self.settings.thresh
        if self.rules.float32:
            self.acc_ratio = _f32(self.acc_ratio * _f32(ratio))
            self.acc_err = _f32(self.acc_err + _f32(abs(1.0 - self.acc_ratio)))
            thresh = _f32(thresh)
        else:
            self.acc_ratio *= ratio
            self.acc_err += abs(1.0 - self.acc_ratio)
        self.acc_steps += 1
        err = self.acc_err
        under = err < thresh if self.rules.compare == "<" else err <= thresh
        if not under:
            reason = "error over thresh"
        elif self.acc_steps > self.settings.K:
            reason = "K reached"
        else:
            reason = self._guarded(step, ratio) or (None if has_residual and not self._first_residual_lost
                                                    else NO_RESIDUAL)
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


def branch_ratios(
    curves: Sequence[Sequence[float]], num_steps: int, branch_index: int, settings: Settings, rules: Rules
) -> list[float]:
    """The ratio a branch reads at each step of a run of ``num_steps``: its curve resampled by the rules' step
    mapping (optionally square-rooted), one step late for ComfyUI Qwen-Image's uncond call, float32 where the
    rules accumulate in float32."""
    prepared = prepare_curves(curves, num_steps, settings.sqrt_ratios, rules.step_mapping)
    ratios = branch_curve(prepared, branch_index)
    if rules.uncond_lags_one_step and branch_index == 1:
        ratios = [prepared[0][0]] + ratios[:-1]  # step 0 reads the first call's padding entry
    return [_f32(v) for v in ratios] if rules.float32 else ratios


def make_branch_policies(
    curves: Sequence[Sequence[float]], num_steps: int, num_branches: int, settings: Settings, rules: Rules,
    split_step: int | None = None,
) -> list[BranchPolicy]:
    """One fresh ``BranchPolicy`` per branch for a run of ``num_steps`` steps (``split_step``: see
    :class:`BranchPolicy`)."""
    if num_branches < 1:
        raise ValueError("num_branches must be >= 1")
    return [
        BranchPolicy(branch_ratios(curves, num_steps, b, settings, rules), settings, rules, num_steps, b, num_branches,
                     split_step=split_step)
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
    curves: Sequence[Sequence[float]], num_steps: int, settings: Settings, rules: Rules, num_branches: int = 1,
    split_step: int | None = None,
) -> Schedule:
    """Predict the schedule of one run, calling the very ``decide`` the runtime calls. ``split_step``: the number
    of steps a two-expert model's first expert runs (rules with ``expert_retention`` need it)."""
    return simulate_policies(make_branch_policies(curves, num_steps, num_branches, settings, rules, split_step),
                             num_steps)


def simulate_policies(policies: Sequence, num_steps: int) -> Schedule:
    """Run per-branch policies (anything with ``decide(step, has_residual)``, e.g. the threshold rule's
    ``BranchPolicy`` or a planned schedule) through one run, branch after branch within a step, as the runtime does."""
    num_branches = len(policies)
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
    split_step: int | None = None,
) -> tuple[bool, float, Schedule]:
    """For ``settings.K``, visit every distinct schedule in order of growing threshold until one reaches
    ``target``: ``(reached, thresh, schedule)`` with the smallest reaching threshold, else the threshold of the
    fastest schedule up to ``max_thresh``. Exact where bisection is not: the computed-step count is not monotonic
    in the threshold (an earlier skip moves every later reset)."""

    def simulate_at(thresh: float) -> Schedule:
        # here 0 is just the smallest threshold, not the "cache off" switch
        return simulate(curves, num_steps, replace(settings, thresh=thresh, zero_thresh_disables=False), rules,
                        num_branches, split_step)

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
    split_step: int | None = None,
) -> SpeedupSolution:
    """The smallest K (of ``K_candidates``, default ``settings.K``) that reaches ``target``, with the smallest
    threshold that does (the gentlest schedule fast enough); if none reaches it, the fastest setting found.
    ``split_step``: where a two-expert model switches experts (see :class:`BranchPolicy`)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"target speed-up must be a positive number, got {target!r}")
    Ks = sorted(set(K_candidates)) if K_candidates is not None else [settings.K]
    tried: list[tuple[int, float | None, float]] = []
    best: tuple[float, Settings, Schedule] | None = None
    for K in Ks:
        trial = replace(settings, K=K)
        reached, thresh, schedule = scan_thresh_for_speedup(
            curves, num_steps, target, trial, rules, num_branches, max_thresh, overhead_fraction, split_step)
        speedup = schedule.predicted_speedup(overhead_fraction)
        tried.append((K, thresh if reached else None, speedup))
        chosen = replace(trial, thresh=thresh)
        if reached:
            return SpeedupSolution(chosen, schedule, tried)
        if best is None or speedup > best[0] + 1e-12:
            best = (speedup, chosen, schedule)
    assert best is not None
    return SpeedupSolution(best[1], best[2], tried)


# --------------------------------------------------------------------------------------------------
# Two-expert models (Wan2.2 A14B): where the pipeline switches experts
# --------------------------------------------------------------------------------------------------
def flow_unipc_timesteps(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps of diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` (the
    scheduler of the Wan pipelines, and the grid of Wan2.2's own sampler) for ``num_steps`` steps, with the same
    float64 arithmetic: sigmas ``linspace(1, 1/T, N + 1)[:-1]``, shifted, the first nudged below 1, times T,
    truncated to integers."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    step = (1 / num_train_timesteps - 1.0) / num_steps
    sigmas = [i * step + 1.0 for i in range(num_steps)]
    sigmas = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return [int(s * num_train_timesteps) for s in sigmas]


def high_noise_steps(timesteps: Iterable[float], boundary_ratio: float, num_train_timesteps: int = 1000) -> int:
    """How many steps diffusers' Wan pipelines run on the first (high-noise) expert: those whose timestep is at or
    above ``boundary_ratio * num_train_timesteps`` (the pipeline's own test)."""
    boundary = boundary_ratio * num_train_timesteps
    return sum(1 for t in timesteps if t >= boundary)


def reference_split_step(rules: Rules, num_steps: int) -> int | None:
    """Steps the high-noise expert runs with the rules' reference sampler; None for one-model rules."""
    if rules.expert_retention is None or rules.expert_boundary is None or rules.expert_flow_shift is None:
        return None
    return high_noise_steps(flow_unipc_timesteps(num_steps, rules.expert_flow_shift), rules.expert_boundary)


def fallback_notes(schedule: Schedule, rules: Rules) -> list[str]:
    """Where the reference implementation would fail on this schedule and what we do instead, one sentence each."""
    notes = []
    for branch, decisions in schedule.decisions.items():
        steps = [d.step for d in decisions if d.reason == NO_RESIDUAL]
        if steps:
            notes.append(f"{branch}: step(s) {steps} were due to be skipped before this branch had a residual; the "
                         "reference implementation fails there (it adds a missing residual), we compute them")
    if rules.step_mapping == "floor" and schedule.num_steps == 1:
        notes.append("1-step run: ComfyUI-MagCache's step mapping divides by zero here; we map the step to "
                     "calibrated step 0")
    return notes
