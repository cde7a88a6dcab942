"""The budget-optimal schedule against MagCache's threshold rule and uniform skipping at equal computed steps, on the
demo model and a fixed prompt set.

    python -m bench.optimal_budget --set tuning  --json bench/results/demo_optimal_tuning.json
    python -m bench.optimal_budget --set heldout --json bench/results/demo_optimal_heldout.json

For each target speed-up X the threshold rule runs at the smallest threshold reaching X (the demo preset's K and
retention); every other schedule computes as many steps per branch as it does (``ceil`` of its mean per branch).
Variants of the optimal schedule: each error model, with the preset's retention (steps 0-2 forced) and without
(retention 0: only step 0 forced). PSNR/SSIM against the uncached image of the same prompt and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import magcache
import magcache.optimal as O
import magcache.policy as P
from magcache.metrics import PSNR_IDENTICAL, psnr, ssim
from magcache.presets import get_preset
from magcache.studio.demo import data as D
from magcache.studio.demo import evaluate as E
from magcache.studio.strategies import uniform_steps

from .strategies import run_header


def schedules_at(target: float, num_steps: int, models: list[str]) -> dict[str, dict[str, list[int]]]:
    p = get_preset("demo")
    _, reference, _ = P.solve_thresh_for_speedup(p.curves, num_steps, target, p.settings(), p.rules, 2)
    budget = math.ceil(reference.computed_count() / 2)
    out = {"magcache (threshold)": reference.computed, "uniform": {"cond": uniform_steps(num_steps, budget),
                                                                    "uncond": uniform_steps(num_steps, budget)}}
    for model in models:
        for retention in (p.retention_ratio, 0.0):
            plan = O.Plan(budget=budget, error_model=model)
            sched = O.simulate_plan(p.curves, num_steps, p.settings(retention_ratio=retention), p.rules, plan, 2,
                                    p.cos_curves)
            out[f"optimal {model}, retention {retention:g}"] = sched.computed
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("tuning", "heldout"), default="heldout")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--targets", default="3,4")
    ap.add_argument("--error-models", default=",".join(O.ERROR_MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = D.prompt_set(args.set, args.prompts, args.seeds)
    pipe, settings = E.load_pipeline()
    n = settings["num_inference_steps"]
    start, load = time.time(), os.getloadavg()
    references = [E.generate(pipe, prompt, seed, settings) for prompt, seed in items]
    handle = magcache.apply(pipe, preset="demo")
    rows = []
    for target in [float(x) for x in args.targets.split(",")]:
        seen: dict[str, str] = {}
        for name, computed in schedules_at(target, n, args.error_models.split(",")).items():
            key = json.dumps(computed, sort_keys=True)
            if key in seen:
                rows.append({"target": target, "name": name, "same_as": seen[key], "computed": computed})
                continue
            seen[key] = name
            handle.configure(computed_steps=computed)
            ps, ss = [], []
            for (prompt, seed), ref in zip(items, references):
                image = E.generate(pipe, prompt, seed, settings)
                assert handle.last_run.computed == computed
                ps.append(min(psnr(image, ref), PSNR_IDENTICAL))
                ss.append(ssim(image, ref))
            rows.append({"target": target, "name": name, "computed": computed,
                         "computed_calls": sum(len(v) for v in computed.values()),
                         "psnr": round(float(np.mean(ps)), 3), "psnr_min": round(float(np.min(ps)), 3),
                         "ssim": round(float(np.mean(ss)), 5), "psnr_per_item": [round(x, 3) for x in ps]})
            print(f"  {target:g}x {name:<34} {rows[-1]['computed_calls']}/{2 * n} calls  PSNR {rows[-1]['psnr']:.2f} "
                  f"(min {rows[-1]['psnr_min']:.2f})  SSIM {rows[-1]['ssim']:.4f}", flush=True)
    handle.remove()
    report = {**run_header("bench.optimal_budget", argv, args.set, start, load), "items": [list(i) for i in items],
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
