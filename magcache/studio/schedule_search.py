"""A MagCache schedule searched on measured error: hill climbing over the computed steps of a budget.

    from magcache.studio.schedule_search import search_schedule
    result = search_schedule(pipe, {"num_inference_steps": 28, "height": 512, "width": 512},
                             [("a prompt", 0), ("another prompt", 1)], budget=9, max_minutes=30)
    handle.configure(computed_steps=result.computed)   # {"cond": [...], "uncond": [...]}

    python -m magcache.studio.schedule_search --weights DIR --prompts-file prompts.txt --budget 9 --minutes 30 \\
        --json schedule.json

The search measures: every schedule it tries costs one pipeline run per (prompt, seed) item, scored by the mean PSNR
of the outputs to the uncached ones (generated once). It starts from uniform skipping (or a given schedule) and
moves one computed step (never step 0) by one of ``moves`` steps earlier or later, in every branch where they share
it and, with ``per_branch``, in one branch alone; it takes the first move that raises the score and stops when no
move helps (a local optimum), when ``max_minutes`` have passed, or when ``should_stop()`` says so. No schedule skips
more than ``K`` steps in a row; the number of computed steps per branch (the budget) never changes. Each schedule is
measured once. A schedule found this way is fitted to its items: search on tuning prompts, check on held-out ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..metrics import PSNR_IDENTICAL, psnr
from ..runtime import MagCacheHandle, apply, get_handle
from .strategies import uniform_steps
from .sweep import main_output

Schedule = dict[str, list[int]]  # computed steps per branch
STOPPED_BY = ("local optimum", "time", "stop")


def schedule_key(computed: Mapping[str, Sequence[int]]) -> str:
    return json.dumps({b: list(v) for b, v in computed.items()}, sort_keys=True)


def max_skips_in_a_row(steps: Sequence[int], num_steps: int) -> int:
    return max(b - a - 1 for a, b in zip(steps, list(steps[1:]) + [num_steps]))


def neighbours(computed: Sequence[int] | Mapping[str, Sequence[int]], num_steps: int, max_skips: int,
               deltas: Sequence[int] = (-1, 1), per_branch: bool = False) -> list:
    """Schedules one move away: a computed step (never step 0) moved by one of ``deltas``, in all branches where
    they share it, and with ``per_branch`` also in one branch alone. Moves in all branches come first. A list (one
    branch) gives lists."""
    if not isinstance(computed, Mapping):
        return [c["cond"] for c in neighbours({"cond": list(computed)}, num_steps, max_skips, deltas)]
    branches = tuple(computed)
    out, seen = [], set()
    scopes = [branches] + ([(b,) for b in branches] if per_branch and len(branches) > 1 else [])
    for scope in scopes:
        shared = set.intersection(*(set(computed[b]) for b in scope))
        for step in sorted(shared - {0}):
            for delta in deltas:
                moved = step + delta
                if not 1 <= moved < num_steps or any(moved in computed[b] for b in scope):
                    continue
                cand = {b: list(v) for b, v in computed.items()}
                for b in scope:
                    cand[b] = sorted([x for x in computed[b] if x != step] + [moved])
                key = schedule_key(cand)
                if key not in seen and all(max_skips_in_a_row(cand[b], num_steps) <= max_skips for b in scope):
                    seen.add(key)
                    out.append(cand)
    return out


@dataclass
class SearchResult:
    computed: Schedule  # the best schedule found: what ``handle.configure(computed_steps=...)`` takes
    psnr: float  # its mean PSNR to the uncached outputs over the searched items
    start: Schedule
    start_psnr: float
    uniform_psnr: float  # uniform skipping at the same budget, on the same items
    budget: int
    stopped_by: str  # one of STOPPED_BY
    trace: list[dict] = field(default_factory=list)  # each improvement: {"computed", "psnr"}, the start first
    # every schedule its scorer has measured (a reused scorer: earlier searches too): {"computed", "psnr_per_item"}
    measured: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"computed_steps": self.computed, "psnr": round(self.psnr, 3), "budget": self.budget,
                "start": self.start, "start_psnr": round(self.start_psnr, 3),
                "uniform_psnr": round(self.uniform_psnr, 3), "stopped_by": self.stopped_by, "trace": self.trace,
                "measured": self.measured}


class ScheduleScorer:
    """Per-item scores of a fixed schedule over fixed ``(prompt, seed)`` items, each schedule measured once.

    The uncached outputs are generated once, with the handle on and caching off (bit for bit the plain pipeline),
    which also records the run's branch names. ``metric(output, reference)`` is PSNR (capped at identical) unless
    given. The pipeline's MagCache handle is used (its settings restored by :meth:`close`), else one is applied with
    ``apply_kwargs`` and removed by :meth:`close`.
    """

    def __init__(self, pipe: Any, call_kwargs: Mapping[str, Any], items: Sequence[tuple[str, int]],
                 metric: Callable[[Any, Any], float] | None = None, **apply_kwargs: Any):
        if not items:
            raise ValueError("the search needs at least one (prompt, seed) item")
        self.pipe, self.items = pipe, [tuple(i) for i in items]
        self.call_kwargs = dict(call_kwargs)
        self.call_kwargs.setdefault("output_type", "np")
        self.num_steps = int(self.call_kwargs["num_inference_steps"])
        self.metric = metric or (lambda out, ref: min(psnr(out, ref), PSNR_IDENTICAL))
        existing = get_handle(pipe)
        self._owned = existing is None
        self.handle: MagCacheHandle = existing if existing is not None else apply(pipe, **apply_kwargs)
        h = self.handle
        self._saved = (h.settings, h.enabled, h.calibrate, h.computed_steps, h.plan)
        h.configure(enabled=True, calibrate=False, computed_steps=None, schedule="threshold", thresh=0.0,
                    zero_thresh_disables=True)
        self.references = [self.generate(p, s) for p, s in self.items]
        self.branches: tuple[str, ...] = tuple(h.last_run.branches)
        # a fixed schedule needs caching on: any positive thresh, the schedule overrides the rule
        h.configure(thresh=self._saved[0].thresh or 1.0, zero_thresh_disables=False)
        self.measured: dict[str, list[float]] = {}

    def generate(self, prompt: str, seed: int) -> Any:
        kwargs = dict(self.call_kwargs, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed))
        with torch.inference_mode():
            return main_output(self.pipe(**kwargs))[0]

    def as_branches(self, computed: Sequence[int] | Mapping[str, Sequence[int]]) -> Schedule:
        """One schedule for every branch (a list), or one per branch."""
        if isinstance(computed, Mapping):  # a branch missing takes the "cond" entry, as the runtime does
            return {b: sorted(set(computed.get(b, computed.get("cond", ())))) for b in self.branches}
        return {b: sorted(set(computed)) for b in self.branches}

    def per_item(self, computed: Sequence[int] | Mapping[str, Sequence[int]]) -> list[float]:
        computed = self.as_branches(computed)
        key = schedule_key(computed)
        if key not in self.measured:
            self.handle.configure(computed_steps=computed)
            self.measured[key] = [round(self.metric(self.generate(p, s), ref), 3)
                                  for (p, s), ref in zip(self.items, self.references)]
        return self.measured[key]

    def score(self, computed: Sequence[int] | Mapping[str, Sequence[int]]) -> float:
        return float(np.mean(self.per_item(computed)))

    def measured_rows(self) -> list[dict]:
        return [{"computed": json.loads(k), "psnr_per_item": v} for k, v in self.measured.items()]

    def close(self) -> None:
        if self._owned:
            self.handle.remove()
            return
        s = self._saved
        self.handle.configure(enabled=s[1], calibrate=s[2], computed_steps=s[3], schedule="threshold")
        self.handle.settings, self.handle.plan = s[0], s[4]


def climb(score: Callable[[Schedule], float], start: Schedule, num_steps: int, max_skips: int,
          deltas: Sequence[int] = (-1, 1), per_branch: bool = False, deadline: float | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_measured: Callable[[Schedule, float, float], None] | None = None) -> tuple[Schedule, float, list, str]:
    """First-improvement hill climbing from ``start`` over :func:`neighbours`. Returns the best schedule, its score,
    the trace of improvements (the start first) and why it stopped (``STOPPED_BY``). ``on_measured(candidate, score,
    best)`` is called after each candidate."""
    computed, best = start, score(start)
    trace = [{"computed": computed, "psnr": round(best, 3)}]
    while True:
        for cand in neighbours(computed, num_steps, max_skips, deltas, per_branch):
            if should_stop is not None and should_stop():
                return computed, best, trace, "stop"
            if deadline is not None and time.time() >= deadline:
                return computed, best, trace, "time"
            value = score(cand)
            if on_measured is not None:
                on_measured(cand, value, best)
            if value > best:
                computed, best = cand, value
                trace.append({"computed": computed, "psnr": round(best, 3)})
                break
        else:
            return computed, best, trace, "local optimum"


def search_schedule(pipe: Any, call_kwargs: Mapping[str, Any], items: Sequence[tuple[str, int]], budget: int | None,
                    *, start: str | Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                    moves: Sequence[int] = (1, 2), per_branch: bool = True, K: int | None = None,
                    max_minutes: float | None = None,
                    progress: Callable[[Schedule, float, float], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, scorer: ScheduleScorer | None = None,
                    metric: Callable[[Any, Any], float] | None = None, **apply_kwargs: Any) -> SearchResult:
    """Search the computed steps of ``budget`` per branch that score best on ``items`` (module docstring).

    ``start``: None or ``"uniform"`` (uniform skipping), or computed steps (one list for every branch, or one per
    branch) with ``budget`` steps per branch (``budget=None`` takes the start's). ``moves``: step distances tried
    (1, 2 = -2, -1, +1, +2). ``K``: most skips in a row (default: the handle's). ``progress(candidate, psnr, best)``
    after each measured schedule; ``should_stop()`` before each. ``scorer`` reuses a :class:`ScheduleScorer` (its
    references and measured schedules; left open), else one is made for ``pipe`` (``metric``, ``apply_kwargs``) and
    closed at the end."""
    own = scorer is None
    if own:
        scorer = ScheduleScorer(pipe, call_kwargs, items, metric, **apply_kwargs)
    try:
        n = scorer.num_steps
        max_skips = scorer.handle.settings.K if K is None else int(K)
        if start is None or start == "uniform":
            if budget is None:
                raise ValueError("give a budget (computed steps per branch) or a start schedule")
            begin = scorer.as_branches(uniform_steps(n, budget))
        elif isinstance(start, str):
            raise ValueError(f"start must be None, 'uniform' or computed steps, got {start!r}")
        else:
            begin = scorer.as_branches(start)
        budget = len(next(iter(begin.values()))) if budget is None else int(budget)
        if not 1 <= budget <= n:
            raise ValueError(f"budget must be between 1 and {n} computed steps per branch, got {budget}")
        for b, steps in begin.items():
            if len(steps) != budget or steps[0] != 0 or steps[-1] >= n:
                raise ValueError(f"{b}: {steps} is not {budget} computed steps of {n} starting at step 0")
            if max_skips_in_a_row(steps, n) > max_skips:
                raise ValueError(f"{b}: {steps} skips more than K={max_skips} steps in a row; raise the budget or K")
        uniform = scorer.as_branches(uniform_steps(n, budget))
        deltas = tuple(sorted({d * sign for d in moves for sign in (-1, 1)}))
        deadline = None if max_minutes is None else time.time() + 60 * max_minutes
        uniform_psnr = scorer.score(uniform)
        computed, best, trace, stopped_by = climb(scorer.score, begin, n, max_skips, deltas, per_branch, deadline,
                                                  should_stop, progress)
        return SearchResult(computed, best, begin, scorer.score(begin), uniform_psnr, budget, stopped_by, trace,
                            scorer.measured_rows())
    finally:
        if own:
            scorer.close()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (blank lines and ``#`` comments left out), or a JSON list of strings."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return [str(p) for p in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="a diffusers pipeline folder (or hub id, loaded with local files only)")
    model.add_argument("--tiny", metavar="KIND", help="a tiny random-weight pipeline (magcache.studio.tiny): plumbing")
    ap.add_argument("--prompts-file", required=True, help="tuning prompts: one a line, or a JSON list")
    ap.add_argument("--seeds", default="0", help="seeds per prompt, e.g. 0,1")
    ap.add_argument("--budget", type=int, required=True, help="computed steps per branch")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--true-cfg-scale", type=float, help="two branches (with --negative-prompt)")
    ap.add_argument("--negative-prompt")
    ap.add_argument("--call-json", help='more pipeline call arguments as JSON, e.g. \'{"max_sequence_length": 32}\'')
    ap.add_argument("--preset", help="MagCache preset (default: by model)")
    ap.add_argument("--K", type=int, help="most skips in a row (default: the preset's)")
    ap.add_argument("--start", help="a JSON file with computed_steps to start from (default: uniform skipping)")
    ap.add_argument("--moves", default="1,2", help="step moves tried, e.g. 1,2 (= -2, -1, +1, +2)")
    ap.add_argument("--no-per-branch", action="store_true", help="move steps in every branch together only")
    ap.add_argument("--minutes", type=float, help="stop after this long (default: at a local optimum)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(args.tiny)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.weights, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    call = {"num_inference_steps": args.steps}
    call.update({k: v for k, v in dict(height=args.height, width=args.width, true_cfg_scale=args.true_cfg_scale,
                                       negative_prompt=args.negative_prompt).items() if v is not None})
    call.update(json.loads(args.call_json) if args.call_json else {})
    items = [(p, int(s)) for p in read_prompts(args.prompts_file) for s in args.seeds.split(",")]
    start = json.loads(Path(args.start).read_text()).get("computed_steps") if args.start else None
    apply_kwargs = {"preset": args.preset} if args.preset else {}
    began = time.time()
    print(f"{len(items)} items: each schedule measured costs {len(items)} runs; the uncached ones first", flush=True)

    def progress(cand: Schedule, value: float, best: float) -> None:
        print(f"  {' | '.join(f'{b} {v}' for b, v in cand.items())}: PSNR {value:.3f} (best {best:.3f}, "
              f"{(time.time() - began) / 60:.1f} min)", flush=True)

    result = search_schedule(pipe, call, items, args.budget, start=start,
                             moves=tuple(int(m) for m in args.moves.split(",")), per_branch=not args.no_per_branch,
                             K=args.K, max_minutes=args.minutes, progress=progress, **apply_kwargs)
    out = {"command": "python -m magcache.studio.schedule_search " + " ".join(sys.argv[1:] if argv is None else argv),
           "items": [list(i) for i in items], "num_inference_steps": args.steps, **result.to_json()}
    print(f"stopped by: {result.stopped_by}; {len(result.measured)} schedules measured, "
          f"{(time.time() - began) / 60:.1f} min")
    print(f"PSNR {result.psnr:.3f} dB (start {result.start_psnr:.3f}, uniform {result.uniform_psnr:.3f}) on these "
          f"items; check it on held-out prompts before using it")
    print(json.dumps(result.computed))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
