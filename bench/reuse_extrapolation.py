"""Bench experiment, not the library's cache: what if a skipped step reused a residual *extrapolated* from the last two
computed steps instead of the last one?

    python -m bench.reuse_extrapolation --set tuning --json bench/results/demo_reuse_extrapolation_tuning.json

The library's invariant stays as it is (a skipped step = block input + that branch's cached residual). Here, in this
process only, ``MagCacheHandle._on_exit`` is wrapped: on a skipped step ``s`` of a branch whose last two computed
steps were ``c' < c``, the residual added is ``r_c + alpha * (s - c) / (c - c') * (r_c - r_c')`` (linear in the step
index; the demo's sigmas are evenly spaced, so also in sigma). ``alpha = 0`` is the library's cache (checked: it
gives the same images). Schedules: uniform and the searched ones of ``--searched`` (per budget), forced with
``handle.configure(computed_steps=...)``; PSNR to the uncached image of the same prompt and seed.
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

import magcache
from magcache import runtime as R
from magcache.metrics import PSNR_IDENTICAL, psnr
from magcache.studio.demo import data as D
from magcache.studio.demo import evaluate as E
from magcache.studio.strategies import uniform_steps

from .schedule_search import as_branches, best_rows, row_schedule
from .strategies import run_header


class Extrapolation:
    """Wraps ``MagCacheHandle._on_exit`` (before ``magcache.apply``, since the hooks bind it then)."""

    def __init__(self) -> None:
        self.alpha = 0.0
        self.history: dict[int, list[tuple[int, torch.Tensor]]] = {}  # id(branch) -> last two (step, residual)
        original = R.MagCacheHandle._on_exit
        extra = self

        def _on_exit(handle, module, args):
            call = handle._call
            if call is None:
                return original(handle, module, args)
            branch, step, skip = call.branch, call.step, call.skip
            if step == 0:
                extra.history[id(branch)] = []
            past = extra.history.setdefault(id(branch), [])
            if skip and extra.alpha and len(past) == 2 and branch.residual is not None:
                (c0, r0), (c1, r1) = past
                kept = branch.residual
                branch.residual = r1 + (extra.alpha * (step - c1) / (c1 - c0)) * (r1 - r0)
                try:
                    return original(handle, module, args)
                finally:
                    branch.residual = kept
            out = original(handle, module, args)
            if not skip and branch.residual is not None:
                past.append((step, branch.residual.detach().clone()))
                del past[:-2]
            return out

        R.MagCacheHandle._on_exit = _on_exit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("tuning", "heldout"), default="tuning")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budgets", default="9,7")
    ap.add_argument("--alphas", default="0,0.25,0.5,1")
    ap.add_argument("--searched", default="bench/results/demo_schedule_search_tuning.json",
                    help="search JSON(s) whose best schedule per budget is also run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load = time.time(), os.getloadavg()
    extra = Extrapolation()
    items = D.prompt_set(args.set, args.prompts, args.seeds)
    pipe, settings = E.load_pipeline()
    n = settings["num_inference_steps"]
    references = [E.generate(pipe, p, s, settings) for p, s in items]
    handle = magcache.apply(pipe, preset="demo")
    searched = {}
    for path in args.searched.split(","):
        for budget, row in best_rows(json.loads(Path(path).read_text())["rows"]).items():
            searched.setdefault(budget, []).append((f"searched, {Path(path).name}", row))
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        schedules = [("uniform", as_branches(uniform_steps(n, budget)))]
        schedules += [(name, row_schedule(row)) for name, row in searched.get(budget, [])]
        for name, computed in schedules:
            handle.configure(computed_steps=computed)
            for alpha in [float(a) for a in args.alphas.split(",")]:
                extra.alpha = alpha
                ps = [round(min(psnr(E.generate(pipe, p, s, settings), ref), PSNR_IDENTICAL), 3)
                      for (p, s), ref in zip(items, references)]
                rows.append({"budget": budget, "name": name, "alpha": alpha, "computed": computed,
                             "psnr": round(float(np.mean(ps)), 3), "psnr_min": round(float(np.min(ps)), 3),
                             "psnr_per_item": ps})
                print(f"  {budget} steps {name:<50} alpha {alpha:<5g} PSNR {rows[-1]['psnr']:.3f}", flush=True)
    report = {**run_header("bench.reuse_extrapolation", argv, args.set, start, load),
              "experiment": "bench only: skipped steps reuse an extrapolated residual (not the library's cache)",
              "items": [list(i) for i in items], "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
