"""Caching strategies side by side on the demo model (or any saved FluxPipeline-like model), at equal compute.

    python -m bench.strategies --set heldout --prompts 8 --seeds 2 --levels 3,4 \\
        --strategies magcache,magcache_optimal,uniform,random --json bench/results/demo_strategies_heldout.json
    python -m bench.strategies --set heldout --prompts 4 --seeds 1 --plot docs/img/demo_strategies.png   # every hook

Runs :func:`magcache.studio.strategies.run_strategies` on the prompts of a fixed prompt set
(``magcache/studio/demo/prompts_<set>.json``: ``tuning`` to choose, ``heldout`` to report) and writes its results
with the machine, the set and the command line (JSON), a Markdown table on stdout, and optionally the
quality-vs-speed-up plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared CPU: idle OpenMP threads should not spin

import torch

from magcache.studio import strategies as S
from magcache.studio.demo import data as D
from magcache.studio.demo import evaluate as E
from ui.plots import strategies_figure


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg()}


def run_header(module: str, argv: list[str] | None, prompt_set: str, start: float, load: tuple) -> dict:
    """What every demo bench JSON opens with: the command that wrote it, its prompt set, the machine with its load
    average when the measuring started (``load``, taken with ``start = time.time()``), and the minutes since."""
    return {"command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
            "prompt_set": prompt_set, "machine": {**machine(), "load_average_at_start": load},
            "minutes": round((time.time() - start) / 60, 2)}


def markdown(results: S.StrategyResults) -> str:
    lines = ["| strategy | knob | value | block work | speed-up (work) | speed-up (time) | PSNR (min) | SSIM (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results.rows:
        lines.append(f"| {r.strategy} | {r.knob} | {r.value:g} | {r.compute_fraction:.3f} | {r.compute_speedup:.2f}x | "
                     f"{r.time_speedup:.2f}x | {r.psnr:.2f} ({r.psnr_min:.2f}) | {r.ssim:.4f} ({r.ssim_min:.4f}) |")
    for name, why in {**results.unsupported, **results.not_compared}.items():
        lines.append(f"\n{name}: not compared ({why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(E.DEFAULT_MODEL))
    ap.add_argument("--set", choices=("tuning", "heldout"), default="heldout")
    ap.add_argument("--prompts", type=int, default=8, help="first N prompts of the set")
    ap.add_argument("--seeds", type=int, default=2, help="first N seeds of each prompt")
    ap.add_argument("--levels", default="2,3,4", help="block speed-ups of the schedule strategies")
    ap.add_argument("--strategies", default=",".join(S.STRATEGIES))
    ap.add_argument("--error-models", default="residual", help="error models of magcache_optimal (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the quality-vs-speed-up plot here (PNG)")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot from the results of an earlier run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        plot(S.StrategyResults.from_json(report), args.plot, report["prompt_set"], report["settings"])
        return
    items = D.prompt_set(args.set, args.prompts, args.seeds)
    pipe, settings = E.load_pipeline(args.model)
    start, load = time.time(), os.getloadavg()
    results = S.run_strategies(
        pipe, E.call_kwargs(settings), items, levels=[float(x) for x in args.levels.split(",")],
        strategies=args.strategies.split(","), error_models=args.error_models.split(","), preset="demo",
        progress=lambda done, total, label: print(f"  [{done + 1}/{total}] {label}", flush=True))
    report = {**run_header("bench.strategies", argv, args.set, start, load), "settings": E.call_kwargs(settings),
              **results.to_json()}
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot, args.set, E.call_kwargs(settings))


def plot(results: S.StrategyResults, path: str, prompt_set: str, call: dict) -> None:
    fig = strategies_figure(results, title=f"demo model, {prompt_set} prompts ({len(results.items)} images), "
                                             f"{call['num_inference_steps']} steps, true CFG")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
