"""Recalibrate the demo preset and re-choose its defaults on the tuning prompts; report on the held-out prompts.

    python -m magcache.studio.demo.retune --threads 1                 # measure; writes bench/results/demo_retune.json
    python -m magcache.studio.demo.retune --threads 1 --write         # ... and the preset (magcache/data/demo.json),
                                                                      # demo_settings.json and the two plots

The protocol of docs/strategies.md: settings are chosen on ``prompts_tuning.json`` and reported on
``prompts_heldout.json`` (disjoint scenes, both held out from training).

1. Calibration at the demo settings (true CFG: cond and uncond) averaged over every tuning prompt and seed
   (``CALIBRATION_SET``), compared with the shipped curve: how far each ratio moved, and how many settings of the
   sweep grid would take another schedule.
2. Sweep of the Demo tab's slider grid (``evaluate.SWEEP_*``) with the new curve on ``SWEEP_SET``; the defaults are
   chosen by ``evaluate.choose_defaults`` (the fastest setting with mean PSNR >= 40 dB and SSIM >= 0.99).
3. The chosen defaults, and the shipped preset (old curve, old defaults) for comparison, on ``SWEEP_SET`` and on the
   held-out set (``REPORT_SET``): PSNR/SSIM to the uncached image, transformer calls, wall time.
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

import numpy as np
import torch

from . import data as D
from . import evaluate as E

CALIBRATION_SET, SWEEP_SET, REPORT_SET = E.CALIBRATION_SET, E.SWEEP_SET, E.REPORT_SET
RESULTS = E.ROOT / "bench" / "results" / "demo_retune.json"


def curve_shift(old: list[list[float]], new: list[list[float]]) -> list[dict]:
    """Per branch: the largest and the mean absolute change of the ratio, and where the largest is (step)."""
    out = []
    for name, a, b in zip(("cond", "uncond"), old, new):
        d = np.abs(np.asarray(a[1:]) - np.asarray(b[1:]))  # step 0 is the 1.0 padding in both
        out.append({"branch": name, "max_abs": round(float(d.max()), 5), "at_step": int(d.argmax()) + 1,
                    "mean_abs": round(float(d.mean()), 5), "max_abs_after_step_1": round(float(d[1:].max()), 5)})
    return out


def changed_schedules(old: list[list[float]], new: list[list[float]], rules, num_steps: int) -> dict:
    """How many settings of the sweep grid compute other steps with the new curve than with the old."""
    import magcache.policy as P

    grid = [(t, k, r) for r in E.SWEEP_RETENTION for k in E.SWEEP_K for t in E.SWEEP_THRESH]
    changed = []
    for t, k, r in grid:
        s = P.Settings(t, r, k)
        a = P.simulate(old, num_steps, s, rules, len(old)).computed
        b = P.simulate(new, num_steps, s, rules, len(new)).computed
        if a != b:
            changed.append({"thresh": t, "K": k, "retention_ratio": r,
                            "calls_old": sum(map(len, a.values())), "calls_new": sum(map(len, b.values()))})
    return {"grid": len(grid), "changed": len(changed), "settings": changed}


def measure(bench: E.Bench, handle, thresh: float, K: int, retention: float, curves=None) -> dict:
    """One setting on every item of ``bench`` (curves: replace the handle's for this run)."""
    if curves is not None:
        handle.configure(curves=curves)
    handle.configure(thresh=thresh, K=K, retention_ratio=retention, computed_steps=None)
    res = bench.run(handle)
    res["steps_per_branch"] = {b: list(v) for b, v in res.pop("computed")[0].items()}
    return {"thresh": thresh, "K": K, "retention_ratio": retention, **res}


def plot(rows: list[dict], chosen: dict, old_tuning: dict, chosen_heldout: dict, old_heldout: dict,
         path: Path) -> None:
    def mark(ax) -> None:
        c = chosen["row"]
        ax.scatter([c["call_speedup"]], [c["psnr"]], s=140, facecolors="none", edgecolors="k", label="chosen (tuning)")
        ax.scatter([chosen_heldout["call_speedup"]], [chosen_heldout["psnr"]], s=90, marker="*", color="k",
                   label="chosen, held-out")
        ax.scatter([old_tuning["call_speedup"]], [old_tuning["psnr"]], s=60, marker="x", color="tab:red",
                   label="previous preset, tuning")
        ax.scatter([old_heldout["call_speedup"]], [old_heldout["psnr"]], s=60, marker="+", color="tab:red",
                   label="previous preset, held-out")
        ax.axhline(E.MIN_PSNR, color="gray", lw=0.8, ls="--")
        ax.set_ylim(top=max(r["psnr"] for r in rows if r["call_speedup"] > 1) + 3)  # leave out the uncached 100 dB

    E.sweep_figure(rows, "sweep on tuning", path, mark)


def main(argv: list[str] | None = None) -> None:
    import magcache
    from magcache.presets import CALIBRATED_FLUX, get_preset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(E.DEFAULT_MODEL))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS), help="every number goes here")
    ap.add_argument("--write", action="store_true",
                    help="write the new curve and defaults into magcache/data/demo.json and demo_settings.json, and "
                         "the calibration and sweep plots into docs/img/")
    ap.add_argument("--quick", action="store_true", help="a smoke pass: few prompts, a small grid; writes nothing")
    ap.add_argument("--replot", action="store_true", help="only redraw the two plots from --json")
    args = ap.parse_args(argv)
    if args.replot:
        write_plots(json.loads(Path(args.json).read_text()))
        return
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    pipe, settings = E.load_pipeline(args.model)
    n = settings["num_inference_steps"]
    cal_set, sweep_set, report_set = CALIBRATION_SET, SWEEP_SET, REPORT_SET
    if args.quick:
        cal_set, sweep_set, report_set = ("tuning", 2, 1), ("tuning", 2, 1), ("heldout", 2, 1)

    # 1. calibration on the tuning prompts, against the shipped curve
    print(f"== calibration on {cal_set} ==", flush=True)
    cal = E.calibrate(pipe, settings, D.prompt_set(*cal_set))
    names = list(cal["branches"])
    new_curves = [cal["branches"][b]["mag_ratios"] for b in (["cond", "uncond"] if len(names) > 1 else names)]
    old = get_preset("demo")
    old_curves = [list(c) for c in old.curves]
    shift = curve_shift(old_curves, new_curves)
    changed = changed_schedules(old_curves, new_curves, CALIBRATED_FLUX, n)
    for s in shift:
        print(f"  {s['branch']}: max |d ratio| {s['max_abs']} at step {s['at_step']}, mean {s['mean_abs']}", flush=True)
    print(f"  sweep-grid settings with another schedule: {changed['changed']}/{changed['grid']}", flush=True)

    # 2. sweep on the tuning prompts with the new curve, defaults by the stated rule
    print(f"== sweep on {sweep_set} ==", flush=True)
    # both uncached references before the cache is attached
    tuning = E.Bench(pipe, settings, D.prompt_set(*sweep_set))
    heldout = E.Bench(pipe, settings, D.prompt_set(*report_set))
    handle = magcache.apply(pipe, preset="flux", curves=new_curves, rules=CALIBRATED_FLUX)
    rows = E.sweep(tuning, handle, args.quick)
    chosen = E.choose_defaults(rows)
    c = chosen["row"]
    print(f"  -> defaults thresh {chosen['thresh']} K {chosen['K']} retention {chosen['retention_ratio']} "
          f"(x{c['call_speedup']:.2f}, PSNR {c['psnr']}, SSIM {c['ssim']})", flush=True)
    pick = (chosen["thresh"], chosen["K"], chosen["retention_ratio"])
    was = (old.thresh, old.K, old.retention_ratio)
    report = {
        "command": "python -m magcache.studio.demo.retune " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_at_start": load_start},
        "settings": E.call_kwargs(settings),
        "sets": {"calibration": cal_set, "sweep": sweep_set, "report": report_set},
        "rule": f"fastest setting (fewest transformer calls) with mean PSNR >= {E.MIN_PSNR} dB and SSIM >= "
                f"{E.MIN_SSIM} on the sweep set; ties: higher PSNR",
        "calibration": cal, "previous_curves": old_curves, "curve_shift": shift, "changed_schedules": changed,
        "previous_defaults": dict(zip(("thresh", "K", "retention_ratio"), was)),
        "defaults": {k: chosen[k] for k in ("thresh", "K", "retention_ratio")},
        "sweep_tuning": rows,
    }

    # 3. chosen and previous preset on tuning and held-out
    print("== chosen vs previous preset ==", flush=True)
    report["tuning"] = {"reference_seconds": round(tuning.reference_seconds, 4),
                        "chosen": measure(tuning, handle, *pick),
                        "previous": measure(tuning, handle, *was, curves=old_curves)}
    report["heldout"] = {"reference_seconds": round(heldout.reference_seconds, 4),
                         "previous": measure(heldout, handle, *was),
                         "chosen": measure(heldout, handle, *pick, curves=new_curves)}
    handle.remove()
    for name in ("tuning", "heldout"):
        for which in ("chosen", "previous"):
            r = report[name][which]
            print(f"  {name:8} {which:8} thresh {r['thresh']} K {r['K']} R {r['retention_ratio']}: "
                  f"{r['computed_calls']:g}/{r['total_calls']} calls (x{r['call_speedup']:.2f}, time x{r['time_speedup']:.2f}) "
                  f"PSNR {r['psnr']:.2f} (min {r['psnr_min']:.2f}) SSIM {r['ssim']:.4f}", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    report["minutes"] = round((time.time() - start) / 60, 2)
    if args.quick:
        print(json.dumps({k: report[k] for k in ("curve_shift", "defaults")}, indent=1))
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json} ({report['minutes']} min)")
    if args.write:
        write_preset(cal, settings, chosen, Path(args.model), cal_set)
        write_plots(report)


def write_plots(report: dict) -> None:
    E.plot_calibration(report["calibration"], E.IMG_DIR / "demo_calibration.png")
    chosen = next(r for r in report["sweep_tuning"] if all(r[k] == v for k, v in report["defaults"].items()))
    plot(report["sweep_tuning"], {"row": chosen}, report["tuning"]["previous"], report["heldout"]["chosen"],
         report["heldout"]["previous"], E.IMG_DIR / "demo_sweep.png")


def write_preset(cal: dict, settings: dict, chosen: dict, model: Path, cal_set: tuple) -> None:
    """The new curve and defaults into ``magcache/data/demo.json`` and the model's ``demo_settings.json``."""
    name, prompts, seeds = cal_set
    entry = E.preset_entry(cal, settings, chosen, prompts_note=f"mean of {prompts} {name} prompts x {seeds} seeds "
                           f"(prompts_{name}.json; python -m magcache.studio.demo.retune)",
                           rule_set=f"{SWEEP_SET[0]} prompts ({SWEEP_SET[1]} x {SWEEP_SET[2]} seeds)")
    E.PRESET_PATH.write_text(json.dumps(entry, indent=1) + "\n")
    path = model / "demo_settings.json"
    demo = json.loads(path.read_text())
    demo["magcache"] = {"preset": "demo", "thresh": chosen["thresh"], "K": chosen["K"],
                        "retention_ratio": chosen["retention_ratio"]}
    path.write_text(json.dumps(demo, indent=2) + "\n")
    print(f"wrote {E.PRESET_PATH} and {path}")


if __name__ == "__main__":
    main()
