"""Which error model predicts measured output error? Forced schedules on the demo model's tuning prompts.

    python -m bench.error_model_fit --collect bench/results/demo_error_model_fit_tuning.json   # measure (slow)
    python -m bench.error_model_fit --analyze bench/results/demo_error_model_fit_tuning.json   # score the models

Collect: the uncached image of each tuning item (first 8 prompts, first seed), then forced schedules (both branches
alike): every single skipped step, and uniform plus random schedules of 7, 9, 10 and 14 computed steps; per
schedule and item the mean squared error to the uncached image.
Analyze: for schedules of equal computed steps, how often each error model orders a pair as the measured PSNR does
(pairs at least 0.3 dB apart), and the rank correlation. "weighted" models scale each step's error by its measured
single-skip sensitivity (measured error / modelled error of skipping that step alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np

import magcache.optimal as O
import magcache.policy as P
from magcache.presets import get_preset


def collect(path: str, prompts: int = 8) -> None:
    import torch

    import magcache
    from magcache.studio.demo import data as D
    from magcache.studio.demo import evaluate as E
    from magcache.studio.strategies import random_steps, uniform_steps

    torch.set_num_threads(2)
    items = D.prompt_set("tuning", prompts, 1)
    pipe, settings = E.load_pipeline()
    n = settings["num_inference_steps"]
    refs = [E.generate(pipe, prompt, seed, settings).astype(np.float64) for prompt, seed in items]
    handle = magcache.apply(pipe, preset="demo")
    rng = random.Random(7)
    schedules = [("single", [i for i in range(n) if i != s]) for s in range(1, n)]
    for count in (7, 9, 10, 14):
        schedules.append(("uniform", uniform_steps(n, count)))
        schedules += [("random", random_steps(n, count, rng)) for _ in range(10 if count == 14 else 16)]
    out = []
    for kind, steps in schedules:
        handle.configure(computed_steps={"cond": steps, "uncond": steps})
        mse = [float(np.mean((E.generate(pipe, prompt, seed, settings).astype(np.float64) - ref) ** 2))
               for (prompt, seed), ref in zip(items, refs)]
        out.append({"kind": kind, "steps": steps, "mse": mse})
        Path(path).write_text(json.dumps({"items": items, "schedules": out}) + "\n")  # partial results survive


def ordered_pairs(scored: list[tuple[float, float]], min_db: float = 0.3) -> tuple[int, int]:
    """Of the pairs of ``(modelled error, measured PSNR)`` at least ``min_db`` apart in PSNR: how many the model
    orders as the measurement does (lower error = higher PSNR), and how many there are."""
    pairs = [(a, b) for a, b in itertools.combinations(scored, 2) if abs(a[1] - b[1]) > min_db]
    return sum((a[0] < b[0]) == (a[1] > b[1]) for a, b in pairs), len(pairs)


def analyze(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    p = get_preset("demo")
    n = 28
    ratios = P.resample(p.curves[0], n)
    cos = P.resample(p.cos_curves[0], n)
    rows = data["schedules"]
    psnr = lambda mse: float(np.mean([10 * math.log10(1 / max(m, 1e-10)) for m in mse]))  # noqa: E731
    single = {(set(range(n)) - set(r["steps"])).pop(): math.sqrt(float(np.mean(r["mse"])))
              for r in rows if r["kind"] == "single"}
    multi = [r for r in rows if r["kind"] != "single"]

    def model(kind: str, use_cos: bool = True, aggregate: str | None = None, weighted: bool = False):
        errors = O.step_errors(ratios, kind, cos if use_cos and kind == "residual" else None)
        if weighted:
            w = [0.0] + [single[s] / errors[s - 1][s] for s in range(1, n)]
            errors = [[e * w[s] for s, e in enumerate(row)] for row in errors]
        return O.run_costs(errors, aggregate or kind)

    models = {
        "magcache": model("magcache"), "run_squared": model("run_squared"), "residual": model("residual"),
        "residual without cos_dis": model("residual", use_cos=False),
        "residual, squared per run": model("residual", aggregate="run_squared"),
        "weighted magcache": model("magcache", weighted=True),
        "weighted residual": model("residual", weighted=True),
        "weighted residual, squared per run": model("residual", aggregate="run_squared", weighted=True),
    }
    report = {"schedules": len(multi), "single_skip_rmse": single, "models": {}}
    for name, cost in models.items():
        right = total = 0
        rhos = []
        for count in sorted({len(r["steps"]) for r in multi}):
            group = [(O.schedule_cost(r["steps"], cost), psnr(r["mse"])) for r in multi if len(r["steps"]) == count]
            group_right, group_total = ordered_pairs(group)
            right, total = right + group_right, total + group_total
            if len(group) > 2:
                ranks = lambda xs: np.argsort(np.argsort(xs))  # noqa: E731
                rhos.append(float(np.corrcoef(ranks([g[0] for g in group]), ranks([-g[1] for g in group]))[0, 1]))
        report["models"][name] = {"pairs_ordered_right": round(right / total, 3), "pairs": total,
                                  "rank_correlation_mean": round(float(np.mean(rhos)), 3)}
        print(f"  {name:<36} {right}/{total} pairs ordered right ({right / total:.3f}), "
              f"mean rank correlation {np.mean(rhos):.3f}")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--collect", metavar="JSON")
    g.add_argument("--analyze", metavar="JSON")
    args = ap.parse_args(argv)
    if args.collect:
        collect(args.collect)
    else:
        analyze(args.analyze)


if __name__ == "__main__":
    main()
