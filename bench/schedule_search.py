"""A schedule searched on measured error: hill climbing over computed steps, scored by the demo model's mean PSNR on
a prompt set, then evaluated on the other set.

    python -m bench.schedule_search --search --set tuning --budgets 9,7 --minutes 8 --json bench/results/demo_schedule_search_tuning.json
    python -m bench.schedule_search --search --resume bench/results/demo_schedule_search_tuning.json ... # go on
    python -m bench.schedule_search --search --set tuning --prompts 16 --moves 1,2 --per-branch --start OTHER.json ...
    python -m bench.schedule_search --search --oracle --set heldout ...   # an upper bound, never a result
    python -m bench.schedule_search --rank-models bench/results/demo_schedule_search_tuning.json
    python -m bench.schedule_search --evaluate A.json,B.json --set heldout --json bench/results/demo_schedule_search_heldout.json
    python -m bench.schedule_search --summarize EVALUATION.json --prompts 8 --seeds 2

Search (:func:`magcache.studio.schedule_search.search_schedule` on the demo model's items): it starts from uniform
skipping (``uniform_steps``), from the best schedule of each ``--start`` search, or (``--resume``) where an earlier
search of the same items stopped, and moves one computed step (never step 0) by one of ``--moves`` steps earlier or
later, in both branches (``--per-branch``: also in one branch alone), taking the first move that raises the mean PSNR
to the uncached images, until no move helps or the per-budget time runs out. At most ``K`` (the demo preset's, 6)
skips in a row. Uniform skipping is measured too (once per search file), to report against. Searching the held-out set needs ``--oracle``, and its JSON says it is one.
Rank models (``--rank-models SEARCH_JSON``, no model runs): how often each error model orders the search's measured
schedules as their PSNR does.
Evaluate: the best searched schedule of each file per budget, uniform, MagCache's threshold rule at the same budget,
the ``residual`` and ``run_squared`` optimal schedules (retention 0), each also with the last step computed
(``protect_last_steps=1``), and the flow-gain model's schedule. Summarize (no model runs): the first
``--prompts x --seeds`` items, the rest and all, each against uniform (paired mean difference, standard error, wins).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import magcache.optimal as O
import magcache.policy as P
from magcache.presets import get_preset
from magcache.studio.demo import data as D
from magcache.studio.demo import evaluate as E
from magcache.studio.schedule_search import ScheduleScorer, schedule_key, search_schedule
from magcache.studio.strategies import uniform_steps

from .error_model_fit import ordered_pairs
from .strategies import run_header


class Scorer(ScheduleScorer):
    """Mean PSNR of a schedule (one list: both branches alike) over the demo model's items of a prompt set, each
    schedule measured once (:class:`magcache.studio.schedule_search.ScheduleScorer`)."""

    def __init__(self, set_name: str, prompts: int, seeds: int):
        pipe, self.settings = E.load_pipeline()
        super().__init__(pipe, E.call_kwargs(self.settings), D.prompt_set(set_name, prompts, seeds), preset="demo")


BRANCHES = ("cond", "uncond")


def as_branches(computed: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """The demo model's two branches (true CFG)."""
    return dict(computed) if isinstance(computed, dict) else {b: list(computed) for b in BRANCHES}


def search(scorer: Scorer, budget: int, seconds: float, max_skips: int, start: dict | None = None,
           deltas: tuple[int, ...] = (-1, 1), per_branch: bool = False, start_name: str = "uniform") -> dict:
    """Hill climbing (:func:`magcache.studio.schedule_search.search_schedule`) from ``start`` (a row of an earlier
    search: its schedule and trace, which goes on; uniform skipping if None)."""

    def show(cand: dict, value: float, best: float) -> None:
        print(f"  {budget} steps {cand['cond']} {cand['uncond']} PSNR {value:.3f} (best {best:.3f})", flush=True)

    result = search_schedule(scorer.pipe, scorer.call_kwargs, scorer.items, budget,
                             start=None if start is None else row_schedule(start),
                             moves=tuple(sorted({abs(d) for d in deltas})), per_branch=per_branch, K=max_skips,
                             max_minutes=seconds / 60, progress=show, scorer=scorer)
    earlier = list(start.get("trace", [])) if start is not None else []
    computed = result.computed
    row = {"budget": budget, "start": start_name, "computed": computed, "psnr": round(result.psnr, 3),
           "moves": list(deltas), "per_branch": per_branch,
           "stopped": "time limit" if result.stopped_by == "time" else "no better neighbour",
           "evaluated": len(scorer.measured), "trace": earlier + result.trace[1:] if earlier else result.trace}
    if computed["cond"] == computed["uncond"]:
        row["steps"] = computed["cond"]
    return row


def flow_gain_schedule(scorer: Scorer, preset, budget: int) -> dict[str, list[int]]:
    """The optimal schedule for the ``residual`` step errors weighted by how much a latent error at noise level sigma
    reaches the output under rectified flow with unit-variance Gaussian data (``1 / sqrt((1 - sigma)^2 + sigma^2)``;
    the demo's latents are scaled to unit variance), summed per skip run and squared per run (retention 0)."""
    n = scorer.num_steps
    scorer.pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))  # as FluxPipeline passes them
    settings = preset.settings(retention_ratio=0.0)
    out = {}
    for b, (name, ratios, errors) in enumerate(branch_errors(preset, n, flow_gain(scorer.pipe.scheduler.sigmas.tolist()))):
        forced = O.forced_steps(ratios, settings, preset.rules, b, 2)
        out[name], _ = O.optimal_computed_steps(O.run_costs(errors, "run_squared"), budget, forced, settings.K)
    return out


def flow_gain(sigmas: list[float], data_std: float = 1.0) -> list[float]:
    """Per step: how much a latent error at that noise level reaches the output under rectified flow with Gaussian
    data of standard deviation ``data_std`` (the flow map from sigma to 0 scales by ``a / sqrt((1-s)^2 a^2 + s^2)``)."""
    return [data_std / (((1.0 - x) ** 2 * data_std ** 2 + x ** 2) ** 0.5) for x in sigmas]


def branch_errors(preset, num_steps: int, gain: list[float] | None):
    """``(branch name, ratios, residual step errors x gain[s])`` per branch of the demo preset (retention 0)."""
    settings = preset.settings(retention_ratio=0.0)
    prepared = P.prepare_curves(preset.curves, num_steps, settings.sqrt_ratios, preset.rules.step_mapping)
    for b, name in enumerate(("cond", "uncond")):
        ratios = P.branch_curve(prepared, b)
        errors = O.step_errors(ratios, "residual", O.branch_cos_curve(preset.cos_curves, num_steps, preset.rules, b))
        yield name, ratios, [[e * (gain[s] if gain else 1.0) for s, e in enumerate(row)] for row in errors]


def rank_models(path: str) -> dict:
    """How often each error model orders two measured schedules of a search (at least 0.3 dB apart) as their mean
    PSNR does; the models' cost is the sum over both branches."""
    data = json.loads(Path(path).read_text())
    n = 28
    sigmas = np.linspace(1.0, 1.0 / n, n).tolist()
    measured = [(m["computed"], float(np.mean(m["psnr_per_item"]))) for m in data["measured"]]
    out = {}
    for label, gain in [("no gain", None)] + [(f"flow gain, data std {a:g}", flow_gain(sigmas, a))
                                              for a in (2, 1, 0.5, 0.3, 0.2, 0.1)]:
        errors = {name: e for name, _, e in branch_errors(get_preset("demo"), n, gain)}
        for aggregate in ("residual", "run_squared"):
            costs = {name: O.run_costs(e, aggregate) for name, e in errors.items()}
            scored = [(sum(O.schedule_cost(c[name], costs[name]) for name in costs), p) for c, p in measured]
            right, total = ordered_pairs(scored)
            key = f"residual{', squared per run' if aggregate == 'run_squared' else ''}, {label}"
            out[key] = {"pairs_ordered_right": round(right / total, 3), "pairs": total}
            print(f"  {key:<52} {right}/{total} ({right / total:.3f})")
    return out


def row_schedule(row: dict) -> dict[str, list[int]]:
    """A search row's schedule per branch (rows of the first searches hold one list for both branches)."""
    return as_branches(row.get("computed", row.get("steps")))


def best_rows(rows: list[dict]) -> dict[int, dict]:
    """The best row per budget (a search may have several starts)."""
    out: dict[int, dict] = {}
    for row in rows:
        if row["budget"] not in out or row["psnr"] > out[row["budget"]]["psnr"]:
            out[row["budget"]] = row
    return out


def threshold_rule(num_steps: int, budget: int) -> dict[str, list[int]] | None:
    """MagCache's threshold rule (demo preset) at the smallest threshold whose mean computed steps per branch round up
    to ``budget`` (3x: 9 of 28, 4x: 7), as ``bench.optimal_budget`` runs it; None if no target gives that budget."""
    p = get_preset("demo")
    for target in (3.0, 4.0, 2.0, 2.5, 3.5, 5.0):
        _, schedule, _ = P.solve_thresh_for_speedup(p.curves, num_steps, target, p.settings(), p.rules, 2)
        if -(-schedule.computed_count() // 2) == budget:
            return schedule.computed
    return None


def summarize(path: str, first: int = 16) -> dict:
    """Per budget and schedule of an evaluation: mean PSNR over the first ``first`` items (the protocol's images), over
    the rest and over all, and the paired difference to uniform skipping (mean +- its standard error, images won)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for budget in sorted({r["budget"] for r in data["rows"]}, reverse=True):
        rows = [r for r in data["rows"] if r["budget"] == budget]
        uniform = next(r["psnr_per_item"] for r in rows if r["name"] == "uniform")
        for r in rows:
            x = r["psnr_per_item"]
            entry = {}
            for part, sl in (("first", slice(0, first)), ("rest", slice(first, None)), ("all", slice(None))):
                a, u = np.array(x[sl]), np.array(uniform[sl])
                if not len(a) or (part == "all" and len(x) <= first):
                    continue
                d = a - u
                entry[part] = {"images": len(a), "psnr": round(float(a.mean()), 2),
                               "vs_uniform": round(float(d.mean()), 2),
                               "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 2) if len(d) > 1 else None,
                               "wins": int((d > 0).sum())}
            out[f"{budget}: {r['name']}"] = entry
            print(f"{budget:>2} {r['name'][:58]:<58} " + "  ".join(
                f"{k} {v['psnr']:.2f} ({v['vs_uniform']:+.2f} +- {v['se']}, {v['wins']}/{v['images']})"
                for k, v in entry.items()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--search", action="store_true")
    mode.add_argument("--evaluate", metavar="SEARCH_JSON[,SEARCH_JSON...]")
    mode.add_argument("--rank-models", metavar="SEARCH_JSON", help="score error models on a search's measured schedules")
    mode.add_argument("--summarize", metavar="EVALUATE_JSON", help="means over the first --prompts x --seeds images, "
                      "the rest and all, and the paired difference to uniform (no model runs)")
    ap.add_argument("--set", choices=("tuning", "heldout"), default="tuning")
    ap.add_argument("--oracle", action="store_true", help="allow --search on the held-out set: an upper bound for "
                    "placement, never a result (the report says so)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budgets", default="9,7", help="computed steps per branch (3x: 9 of 28, 4x: 7)")
    ap.add_argument("--minutes", type=float, default=9.0, help="search time per budget (and start)")
    ap.add_argument("--resume", metavar="SEARCH_JSON", help="go on from an earlier search of the same set and items "
                    "(its measured schedules are not measured again; the climb goes on from its best schedule)")
    ap.add_argument("--start", metavar="SEARCH_JSON[,SEARCH_JSON...]", help="also climb from the best schedule of "
                    "each of these searches (any set), besides uniform skipping")
    ap.add_argument("--no-uniform-start", action="store_true")
    ap.add_argument("--moves", default="1", help="step moves tried, e.g. 1,2 (= -2, -1, +1, +2)")
    ap.add_argument("--per-branch", action="store_true", help="also move a step in one branch alone")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.rank_models:
        rank_models(args.rank_models)
        return
    if args.summarize:
        summarize(args.summarize, args.prompts * args.seeds)
        return
    if args.search and args.set == "heldout" and not args.oracle:
        raise SystemExit("searching on the held-out set is an oracle: pass --oracle (never report it as a result)")
    torch.set_num_threads(args.threads)
    start, load = time.time(), os.getloadavg()
    scorer = Scorer(args.set, args.prompts, args.seeds)
    preset = get_preset("demo")
    rows = []

    def report() -> dict:
        out = {**run_header("bench.schedule_search", argv, args.set, start, load),
               "items": [list(i) for i in scorer.items], "rows": rows, "measured": scorer.measured_rows()}
        if args.search and args.set == "heldout":
            out["oracle"] = "searched on the held-out set itself: an upper bound for step placement, not a result"
        return out

    if args.search:
        earlier = json.loads(Path(args.resume).read_text()) if args.resume else {"items": [], "rows": [], "measured": []}
        if args.resume and [tuple(i) for i in earlier["items"]] != scorer.items:
            raise SystemExit(f"{args.resume} was measured on other items")
        scorer.measured.update({schedule_key(m["computed"]): m["psnr_per_item"] for m in earlier["measured"]})
        resumed = best_rows(earlier["rows"])
        others = [(path, best_rows(json.loads(Path(path).read_text())["rows"]))
                  for path in (args.start.split(",") if args.start else [])]
        deltas = tuple(sorted({d * sign for d in (int(m) for m in args.moves.split(",")) for sign in (-1, 1)}))
        for budget in [int(b) for b in args.budgets.split(",")]:
            starts = []
            if budget in resumed:
                starts.append((resumed[budget].get("start", "uniform") + " (resumed)", resumed[budget]))
            elif not args.no_uniform_start:
                starts.append(("uniform", None))
            # another search's schedule starts a fresh trace
            starts += [(f"best of {path}", {"computed": row_schedule(found[budget])})
                       for path, found in others if budget in found]
            for name, row in starts:
                rows.append(search(scorer, budget, args.minutes * 60, preset.K, row, deltas, args.per_branch, name))
                print(f"{budget} steps from {name}: {rows[-1]['computed']} PSNR {rows[-1]['psnr']:.3f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(report(), indent=1) + "\n")
    else:
        searched = []
        for path in args.evaluate.split(","):
            data = json.loads(Path(path).read_text())
            if data.get("oracle"):
                label = "oracle (searched on held-out)"
            else:
                label = f"searched on {data['prompt_set']} ({len(data['items'])} images)"
            searched += [(f"{label}, {Path(path).name}", row) for row in best_rows(data["rows"]).values()]
        for budget in sorted({row["budget"] for _, row in searched}, reverse=True):
            candidates = {name: row_schedule(row) for name, row in searched if row["budget"] == budget}
            candidates["uniform"] = as_branches(uniform_steps(scorer.num_steps, budget))
            rule = threshold_rule(scorer.num_steps, budget)
            if rule is not None:
                candidates["magcache (threshold)"] = rule
            for model in ("residual", "run_squared"):
                for last in (0, 1):
                    plan = O.Plan(budget=budget, error_model=model)
                    settings = preset.settings(retention_ratio=0.0, protect_last_steps=last)
                    candidates[f"optimal {model}, retention 0" + (", last step computed" if last else "")] = \
                        O.simulate_plan(preset.curves, scorer.num_steps, settings, preset.rules, plan, 2,
                                        preset.cos_curves).computed
            candidates["flow-gain residual, squared per run, retention 0"] = flow_gain_schedule(scorer, preset, budget)
            for name, computed in candidates.items():
                ps = scorer.per_item(computed)
                rows.append({"budget": budget, "name": name, "computed": computed, "psnr": round(float(np.mean(ps)), 3),
                             "psnr_min": round(float(np.min(ps)), 3), "psnr_per_item": ps})
                print(f"  {budget} steps {name:<52} {computed} PSNR {rows[-1]['psnr']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report(), indent=1) + "\n")


if __name__ == "__main__":
    main()
