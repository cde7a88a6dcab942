"""Command line: ``python -m magcache schedule --preset flux --steps 28 [--thresh T] [--retention R] [--K K] [--json]``.

``schedule`` prints the steps each branch computes (0-based) as the runtime would take them, without a model.
``--target-speedup X`` solves the threshold (the smallest that reaches X at the given K); ``--optimal --budget C``
(or ``--optimal --target-speedup X``, C = ceil(N / X)) prints the budget-optimal schedule (``magcache.optimal``).
``presets`` lists the shipped presets.
``calibrate --tiny KIND | --model-path DIR --steps N [--height H --width W] [--out FILE] [--save]`` measures a
model's ratio curves (see ``docs/tuning.md``).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import optimal as O
from . import policy as P
from .presets import get_preset, list_presets


def _schedule(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    steps = preset.calibrated_steps if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    settings = preset.settings(thresh=args.thresh, retention_ratio=args.retention, K=args.K,
                               protect_last_steps=args.protect_last or None, sqrt_ratios=args.sqrt or None)
    branches = 1 if args.no_cfg else len(preset.curves) if args.cfg is None else (2 if args.cfg else 1)
    plan, note = None, ""
    if args.optimal:
        if (args.budget is None) == (args.target_speedup is None):
            raise ValueError("--optimal needs exactly one of --budget C (computed steps per branch) or --target-speedup X")
        plan = O.Plan(budget=args.budget, target_speedup=args.target_speedup, error_model=args.error_model)
        sched = O.simulate_plan(preset.curves, steps, settings, preset.rules, plan, branches, preset.cos_curves)
        note = (f"budget-optimal schedule: {plan.budget_for(steps)} computed steps per branch, error model "
                f"{plan.error_model!r} (thresh not used)")
    elif args.budget is not None:
        raise ValueError("--budget needs --optimal (the threshold rule is solved for a speed-up with --target-speedup)")
    elif args.target_speedup is not None:
        settings, sched, tried = P.search_speedup_settings(preset.curves, steps, args.target_speedup, settings,
                                                           preset.rules, branches)
        reached = tried[-1][1] is not None
        note = (f"smallest thresh reaching {args.target_speedup:g}x at K {settings.K}" if reached else
                f"{args.target_speedup:g}x is not reachable at K {settings.K}: the fastest schedule")
    else:
        sched = P.simulate(preset.curves, steps, settings, preset.rules, branches)
    if args.json:
        out = {
            "preset": preset.id,
            "steps": steps,
            "thresh": None if plan else settings.thresh,
            "retention_ratio": settings.retention_ratio,
            "K": settings.K,
            "computed": sched.computed,
            "skipped": sched.skipped,
            "computed_per_branch": {b: len(v) for b, v in sched.computed.items()},
            "predicted_speedup": round(sched.predicted_speedup(), 4),
            "schedule": "optimal" if plan else "threshold",
            "modelled_error": {b: round(v, 6) for b, v in O.modelled_error(
                sched, preset.curves, settings, preset.rules, plan.error_model if plan else O.DEFAULT_ERROR_MODEL,
                preset.cos_curves).items()},
        }
        if plan:
            out.update(budget=plan.budget_for(steps), error_model=plan.error_model)
        elif args.target_speedup is not None:
            out["reached"] = reached
        print(json.dumps(out))
        return 0
    print(f"{preset.id}: {preset.model}")
    thresh = "" if plan else f", thresh {settings.thresh}"
    print(f"steps {steps}{thresh}, retention {settings.retention_ratio}, K {settings.K} (rules: {preset.rules_source})")
    if note:
        print(f"  {note}")
    for branch, decisions in sched.decisions.items():
        line = "".join("#" if not d.skip else "." for d in decisions)
        n = len(sched.computed[branch])
        print(f"  {branch:>6} {line}  computed {n}/{steps}")
    print(f"  (# computed, . skipped)  predicted block speed-up {sched.predicted_speedup():.2f}x")
    return 0


def _presets(args: argparse.Namespace) -> int:
    rows = [get_preset(p).summary() for p in list_presets()]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            d = r["defaults"]
            adapter = r["family"] or "curve only"
            print(f"{r['id']:<26} {r['calibrated_steps']:>3} steps  thresh {d['thresh']:<5} R {d['retention_ratio']:<4} "
                  f"K {d['K']}  [{adapter}]  {r['model']}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration import run_calibrate_command

    return run_calibrate_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magcache", description="MagCache schedules and presets")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schedule", help="print which steps each branch computes")
    s.add_argument("--preset", required=True, help="preset id (python -m magcache presets)")
    s.add_argument("--steps", type=int, help="number of inference steps (default: the preset's calibrated steps)")
    s.add_argument("--thresh", type=float)
    s.add_argument("--retention", type=float, help="retention ratio")
    s.add_argument("--K", type=int, help="max consecutive skipped steps")
    s.add_argument("--protect-last", type=int, default=0, help="always compute the last N steps (our option)")
    s.add_argument("--sqrt", action="store_true", help="sqrt-smoothed ratios as in the paper's evaluation")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cfg", action="store_true", default=None, help="two branches (cond + uncond)")
    g.add_argument("--no-cfg", action="store_true", help="one branch even for CFG presets")
    s.add_argument("--target-speedup", type=float, metavar="X",
                   help="block speed-up: the smallest thresh reaching it, or with --optimal a budget of ceil(N/X)")
    s.add_argument("--optimal", action="store_true", help="budget-optimal schedule instead of the threshold rule")
    s.add_argument("--budget", type=int, metavar="C", help="with --optimal: computed steps per branch")
    s.add_argument("--error-model", default=O.DEFAULT_ERROR_MODEL, choices=O.ERROR_MODELS,
                   help="with --optimal: the modelled error it minimises")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=_schedule)
    p = sub.add_parser("presets", help="list presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_presets)
    from .calibration import add_calibrate_arguments

    c = sub.add_parser("calibrate", help="run one uncached calibration and print / save its ratio curves")
    add_calibrate_arguments(c)
    c.set_defaults(func=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
