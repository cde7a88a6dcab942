"""Evaluate the demo model and derive its MagCache preset.

    python -m magcache.studio.demo.evaluate                  # everything; writes docs/img/* and magcache/data/demo.json
    python -m magcache.studio.demo.evaluate --quick          # a fast smoke pass (few prompts), writes nothing shipped
    python -m magcache.studio.demo.evaluate --paraphrases    # plain-English paraphrases of the held-out scenes only

1. Prompt adherence on the 50 held-out prompts (never in training), without cache, at several true-CFG scales; the
   best scale becomes the demo default (``demo_settings.json``).
2. Calibration: ``magcache.apply(pipe, preset="flux", calibrate=True)`` at the default steps with true CFG (cond and
   uncond branches), averaged over the tuning prompts (``CALIBRATION_SET``) -> ``magcache/data/demo.json``
   (ratios interleaved, std, cos).
3. Sweep of (thresh, K, retention) with the calibrated curves on the tuning prompts (``SWEEP_SET``): computed
   transformer calls, wall time and PSNR/SSIM against the uncached image, averaged over prompts and seeds; the
   defaults are picked from it by a stated rule. (``retune.py`` redoes 2-3 alone and reports on held-out.)
4. Naive baselines at equal computed-step counts (``handle.configure(computed_steps=...)``): uniform spacing and
   random placement of the same number of computed steps, at several speed-up levels.
Outputs: ``docs/img/demo_eval.json`` (every number), ``demo_calibration.png``, ``demo_sweep.png``,
``demo_samples.png``; tables printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: spinning OpenMP threads on a shared CPU

import numpy as np
import torch

from . import data as D

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = ROOT / "assets" / "demo_model"
PRESET_PATH = ROOT / "magcache" / "data" / "demo.json"
IMG_DIR = ROOT / "docs" / "img"
# Plain-English prompts with the scene each describes, each set written by someone who had not seen the prompt
# reader (prompts.py): the reader's rules were refined on the tuning set; the held-out set was used only to measure.
PLAIN_ENGLISH_TUNING = Path(__file__).with_name("prompts_plain_english_tuning.json")
PLAIN_ENGLISH_HELD_OUT = Path(__file__).with_name("prompts_plain_english_heldout.json")
# The paraphrases ``--paraphrases`` scores: fixed, so that every model (today's and a retrained one) is judged on
# the same prompts.
PARAPHRASE_SEED = 19

# Choice rule for the preset defaults: the fastest setting (fewest computed transformer calls) whose mean
# PSNR to the uncached image is >= MIN_PSNR and mean SSIM >= MIN_SSIM; ties -> higher PSNR. On the CPU recipe's
# model a first bar of 30 dB / 0.95 picked 14 of 56 calls (PSNR 35.8, worst image 27.2), which recoloured an object
# in the sample grid; on these flat-colour images 40 dB / 0.99 keeps them unchanged to the eye.
MIN_PSNR = 40.0
MIN_SSIM = 0.99
# The grid spans the Demo tab's sliders (thresh 0-1, K up to 10): defaults outside them could not be shown there.
SWEEP_THRESH = (0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.24, 0.4, 0.6, 0.8, 1.0)
SWEEP_K = (1, 2, 3, 4, 6, 8, 10)
SWEEP_RETENTION = (0.1, 0.2, 0.3)
BASELINE_TARGETS = (1.5, 2.0, 2.5, 3.0)
# The protocol of docs/strategies.md, as (prompt set, prompts, seeds per prompt): the curve is averaged over every
# tuning prompt and seed, the defaults are chosen on the protocol's 8 tuning prompts x 2 seeds, and reported on
# 8 held-out prompts x 2 seeds (``retune.py``).
CALIBRATION_SET = ("tuning", 16, 2)
SWEEP_SET = ("tuning", 8, 2)
REPORT_SET = ("heldout", 8, 2)


# --------------------------------------------------------------------------------------------------
# Loading and generating
# --------------------------------------------------------------------------------------------------
def load_pipeline(path: str | Path = DEFAULT_MODEL):
    """The saved demo ``FluxPipeline`` (offline) and its ``demo_settings.json``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    settings = json.loads((Path(path) / "demo_settings.json").read_text())
    return pipe, settings


def call_kwargs(settings: dict, **overrides) -> dict:
    s = dict(settings, **overrides)
    kw = dict(height=s["height"], width=s["width"], num_inference_steps=s["num_inference_steps"],
              max_sequence_length=s["max_sequence_length"])
    if s["true_cfg_scale"] > 1:
        kw.update(true_cfg_scale=s["true_cfg_scale"], negative_prompt=s["negative_prompt"])
    return kw


def generate(pipe, prompt: str, seed: int, settings: dict, **overrides) -> np.ndarray:
    """One image as float32 ``(H, W, 3)`` in [0, 1]."""
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        out = pipe(prompt, generator=gen, output_type="np", **call_kwargs(settings, **overrides))
    return out.images[0]


# --------------------------------------------------------------------------------------------------
# 1. Adherence
# --------------------------------------------------------------------------------------------------
def adherence(pipe, settings: dict, scenes, **overrides) -> dict:
    """Check every held-out scene (seed = its index) -> counts and per-prompt verdicts."""
    results, t0 = [], time.time()
    for i, scene in enumerate(scenes):
        image = generate(pipe, scene.caption, i, settings, **overrides)
        results.append(D.check_adherence(image, scene))
    n = len(results)
    return {
        "prompts": n,
        "correct": sum(r["correct"] for r in results),
        "background_ok": sum(r["background"]["ok"] for r in results),
        "objects_ok": sum(r["objects_ok"] for r in results),
        "object_phrases_ok": sum(o["ok"] for r in results for o in r["objects"]),
        "object_phrases": sum(len(r["objects"]) for r in results),
        "correct_by_objects": {str(k): f"{sum(r['correct'] for r in results if len(r['objects']) == k)}/"
                                       f"{sum(len(r['objects']) == k for r in results)}"
                               for k in sorted({len(r["objects"]) for r in results})},
        "seconds_per_image": round((time.time() - t0) / n, 3),
        "failures": [r for r in results if not r["correct"]],
    }


def scene_from_annotation(item: dict) -> D.Scene:
    """A scene written as JSON (``background`` and ``objects`` with size, colour, shape and [row, col] cell)."""
    objects = tuple(D.SceneObject(o["size"], o["colour"], o["shape"], (int(o["cell"][0]), int(o["cell"][1])))
                    for o in item["objects"])
    return D.Scene(item["background"], objects)


def scene_annotation(scene: D.Scene) -> dict:
    """The inverse of :func:`scene_from_annotation`."""
    return {"background": scene.background,
            "objects": [{"size": o.size, "colour": o.colour, "shape": o.shape, "cell": list(o.cell)}
                        for o in scene.objects]}


def held_out_paraphrases(count: int = D.NUM_HELD_OUT, seed: int = PARAPHRASE_SEED) -> list[dict]:
    """Annotated prompts for :func:`plain_english`: held-out scene ``i`` (cycling past the 50) described by one
    paraphrase with a held-out sentence frame (kind ``paraphrase``), then by its grammar caption (kind ``grammar``),
    both with seed ``i``: the same scene and noise, phrased two ways."""
    rng = random.Random(seed)
    scenes = D.held_out_scenes()
    items = []
    for i in range(count):
        scene = scenes[i % len(scenes)]
        annotation = scene_annotation(scene)
        items.append({"prompt": D.paraphrase(scene, rng, "heldout"), "kind": "paraphrase", "seed": i, **annotation})
        items.append({"prompt": scene.caption, "kind": "grammar", "seed": i, **annotation})
    return items


def same_scene(a: D.Scene | None, b: D.Scene) -> bool:
    """Same background and the same objects, in any order."""
    return a is not None and a.background == b.background and set(a.objects) == set(b.objects)


def plain_english(pipe, settings: dict, items: list[dict], grid: Path | None = None, grid_count: int = 8) -> dict:
    """Each annotated prompt twice, same seed (its ``seed``, else its index): the model on the prompt as typed, and on
    the caption the Demo tab's reader rewrites it to (:func:`.prompts.understand`); both images are checked against
    the annotated scene. ``grid``: a PNG of the first ``grid_count`` prompts not in the grammar, as typed (top row)
    and as the reader's caption (bottom row)."""
    from .prompts import understand

    images: dict[tuple[str, int], np.ndarray] = {}

    def image(prompt: str, seed: int) -> np.ndarray:
        # one prompt and seed give one image: a caption the reader leaves as it was, or one that recurs, runs once
        if (prompt, seed) not in images:
            images[prompt, seed] = generate(pipe, prompt, seed, settings)
        return images[prompt, seed]

    rows = []
    for i, item in enumerate(items):
        scene, seed = scene_from_annotation(item), item.get("seed", i)
        reading = understand(item["prompt"])
        as_typed = D.check_adherence(image(item["prompt"], seed), scene)["correct"]
        rewritten = (D.check_adherence(image(reading.caption, seed), scene)["correct"]
                     if reading.scene else False)
        rows.append({"prompt": item["prompt"], "kind": item.get("kind", "plain"), "seed": seed,
                     "expected": scene.caption, "read_as": reading.caption, "read_right": same_scene(reading.scene, scene),
                     "ignored_words": reading.ignored_words, "correct_as_typed": as_typed,
                     "correct_rewritten": rewritten})

    if grid is not None:  # a prompt the reader could not read has a white image below it
        shown = [r for r in rows if r["kind"] != "grammar"][:grid_count]
        typed = [images[r["prompt"], r["seed"]] for r in shown]
        read = [images.get((r["read_as"], r["seed"]), np.ones_like(a)) for r, a in zip(shown, typed)]
        save_image_grid([[to_uint8(a) for a in typed], [to_uint8(a) for a in read]], grid)

    def count(kind: str, key: str) -> str:
        sel = [r for r in rows if r["kind"] == kind]
        return f"{sum(r[key] for r in sel)}/{len(sel)}"

    return {
        "summary": {kind: {"read_right": count(kind, "read_right"), "correct_as_typed": count(kind, "correct_as_typed"),
                           "correct_rewritten": count(kind, "correct_rewritten")}
                    for kind in sorted({r["kind"] for r in rows})},
        "rows": rows,
        "images_generated": len(images),
    }


def choose_cfg_scale(correct_by_scale: dict[str, int]) -> str:
    """The scale with the most correct prompts; on a tie the smallest true-CFG scale (> 1) among them: the Demo tab
    is there to run FLUX's real path, two CFG branches with their own cache state included."""
    best = max(correct_by_scale.values())
    tied = sorted((c for c, n in correct_by_scale.items() if n == best), key=float)
    return next((c for c in tied if float(c) > 1), tied[0])


# --------------------------------------------------------------------------------------------------
# 2. Calibration
# --------------------------------------------------------------------------------------------------
def calibrate(pipe, settings: dict, prompts: list[tuple[str, int]]) -> dict:
    import magcache

    handle = magcache.apply(pipe, preset="flux", calibrate=True)
    try:
        for prompt, seed in prompts:
            generate(pipe, prompt, seed, settings)
        return handle.calibration()
    finally:
        handle.remove()


def preset_entry(cal: dict, settings: dict, defaults: dict, prompts_note: str, rule_set: str) -> dict:
    """The ``magcache/data/demo.json`` record; ``prompts_note`` says which prompts the curve is averaged over and
    ``rule_set`` which prompts the defaults were chosen on (provenance the file keeps)."""
    names = list(cal["branches"])
    interleaved = len(names) > 1

    def merged(key: str) -> list[float]:
        if not interleaved:
            return cal["branches"][names[0]][key]
        return [v for pair in zip(*(cal["branches"][b][key] for b in ("cond", "uncond"))) for v in pair]

    return {
        "model": "MagCache Studio demo (tiny FLUX, 128x128 shapes)",
        "source": (f"our calibration of assets/demo_model: {cal['num_steps']} steps, true CFG "
                   f"{settings['true_cfg_scale']:g}, {prompts_note}"),
        "num_steps": cal["num_steps"],
        "cfg_interleaved": interleaved,
        "mag_ratios": merged("mag_ratios"),
        "mag_std": merged("mag_std"),
        "cos_dis": merged("cos_dis"),
        "defaults": {"magcache_thresh": defaults["thresh"], "retention_ratio": defaults["retention_ratio"],
                     "magcache_K": defaults["K"]},
        "defaults_rule": f"fastest sweep setting with mean PSNR >= {MIN_PSNR} dB and SSIM >= {MIN_SSIM} "
                         f"to the uncached image on the {rule_set} (docs/demo_model.md)",
        "skipped_part": "transformer_blocks + single_transformer_blocks; residual over the image tokens",
    }


# --------------------------------------------------------------------------------------------------
# 3./4. Cached runs against the uncached reference
# --------------------------------------------------------------------------------------------------
class Bench:
    """Uncached reference images for a fixed prompt set, and cached runs measured against them."""

    def __init__(self, pipe, settings: dict, prompts: list[tuple[str, int]]):
        self.pipe, self.settings, self.prompts = pipe, settings, prompts
        self.reference, times = [], []
        for prompt, seed in prompts:
            t = time.perf_counter()
            self.reference.append(generate(pipe, prompt, seed, settings))
            times.append(time.perf_counter() - t)
        self.reference_seconds = float(np.mean(times))

    def run(self, handle, schedules: list[dict] | None = None) -> dict:
        """Run every prompt with ``handle``'s current settings (or, per prompt, a forced schedule
        ``{branch: computed steps}``) -> mean PSNR/SSIM, computed calls, seconds."""
        from magcache.metrics import psnr, ssim

        ps, ss, calls, secs, computed = [], [], [], [], []
        for i, (prompt, seed) in enumerate(self.prompts):
            if schedules is not None:
                handle.configure(computed_steps=schedules[i])
            t = time.perf_counter()
            image = generate(self.pipe, prompt, seed, self.settings)
            secs.append(time.perf_counter() - t)
            run = handle.last_run
            computed.append(run.computed)
            calls.append(sum(len(v) for v in run.computed.values()))
            ps.append(min(psnr(image, self.reference[i]), 100.0))
            ss.append(ssim(image, self.reference[i]))
        if schedules is not None:
            handle.configure(computed_steps=None)
        total_calls = self.settings["num_inference_steps"] * len(computed[0])
        return {
            "psnr": round(float(np.mean(ps)), 2),
            "psnr_min": round(float(np.min(ps)), 2),
            "ssim": round(float(np.mean(ss)), 4),
            "ssim_min": round(float(np.min(ss)), 4),
            "computed_calls": round(float(np.mean(calls)), 2),
            "total_calls": total_calls,
            "call_speedup": round(total_calls / float(np.mean(calls)), 3),
            "seconds": round(float(np.mean(secs)), 4),
            "time_speedup": round(self.reference_seconds / float(np.mean(secs)), 3),
            "computed": computed,
        }


def sweep(bench: Bench, handle, quick: bool) -> list[dict]:
    grid = [(t, k, r) for r in SWEEP_RETENTION for k in SWEEP_K for t in SWEEP_THRESH]
    if quick:
        grid = [(t, k, 0.2) for k in (2, 4) for t in (0.04, 0.24)]
    rows, by_schedule = [], {}
    branches = 2 if bench.settings["true_cfg_scale"] > 1 else 1
    for thresh, K, retention in grid:
        handle.configure(thresh=thresh, K=K, retention_ratio=retention, computed_steps=None)
        # settings with the same schedule give the same images: measure each schedule once
        predicted = handle.predict(bench.settings["num_inference_steps"], branches).computed
        key = tuple(tuple(v) for _, v in sorted(predicted.items()))
        if key not in by_schedule:
            res = bench.run(handle)
            assert res.pop("computed")[0] == predicted, "runtime schedule differs from the policy's prediction"
            by_schedule[key] = res
        res = dict(by_schedule[key])
        rows.append({"thresh": thresh, "K": K, "retention_ratio": retention, **res})
        print(f"  sweep thresh {thresh:<5} K {K} R {retention}: {res['computed_calls']:>5}/{res['total_calls']} calls "
              f"x{res['call_speedup']:.2f} (time x{res['time_speedup']:.2f}) PSNR {res['psnr']:.2f} SSIM {res['ssim']:.4f}",
              flush=True)
    return rows


def choose_defaults(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["psnr"] >= MIN_PSNR and r["ssim"] >= MIN_SSIM]
    if not ok:  # nothing meets the bar: take the most faithful setting
        ok = [max(rows, key=lambda r: r["psnr"])]
    best = max(ok, key=lambda r: (r["call_speedup"], r["psnr"]))
    return {"thresh": best["thresh"], "K": best["K"], "retention_ratio": best["retention_ratio"], "row": best}


def baselines(bench: Bench, handle, defaults: dict, targets, random_draws: int) -> list[dict]:
    import magcache.policy as P
    from magcache.studio.strategies import random_steps, uniform_steps

    n = bench.settings["num_inference_steps"]
    branches = 2 if bench.settings["true_cfg_scale"] > 1 else 1
    base = replace(handle.settings, thresh=defaults["thresh"], K=defaults["K"], retention_ratio=defaults["retention_ratio"])
    rows, seen = [], set()
    for target in targets:
        s, sched, _ = P.solve_thresh_for_speedup(handle.curves, n, target, base, handle.rules, branches,
                                                 K_candidates=range(1, 9))
        key = (s.thresh, s.K)
        if key in seen:
            continue
        seen.add(key)
        handle.configure(thresh=s.thresh, K=s.K, retention_ratio=s.retention_ratio, computed_steps=None)
        mag = bench.run(handle)
        counts = {b: len(v) for b, v in mag["computed"][0].items()}
        uniform = [{b: uniform_steps(n, c) for b, c in counts.items()} for _ in bench.prompts]
        uni = bench.run(handle, uniform)
        rnd_runs = []
        for draw in range(random_draws):
            rng = random.Random(1234 + draw)
            rnd_runs.append(bench.run(handle, [{b: random_steps(n, c, rng) for b, c in counts.items()}
                                               for _ in bench.prompts]))
        rnd = {k: round(float(np.mean([r[k] for r in rnd_runs])), 4) for k in ("psnr", "ssim", "computed_calls")}
        row = {
            "target": target, "thresh": s.thresh, "K": s.K, "retention_ratio": s.retention_ratio,
            "computed_calls": mag["computed_calls"], "total_calls": mag["total_calls"],
            "call_speedup": mag["call_speedup"], "time_speedup": mag["time_speedup"],
            "magcache_steps": mag["computed"][0],
            "magcache": {"psnr": mag["psnr"], "ssim": mag["ssim"]},
            "uniform": {"psnr": uni["psnr"], "ssim": uni["ssim"], "computed_calls": uni["computed_calls"],
                        "steps": uniform[0]},
            "random": rnd,
        }
        rows.append(row)
        print(f"  x{row['call_speedup']:.2f} ({mag['computed_calls']:.0f} calls): MagCache {mag['psnr']:.2f}/{mag['ssim']:.4f}"
              f"  uniform {uni['psnr']:.2f}/{uni['ssim']:.4f}  random {rnd['psnr']:.2f}/{rnd['ssim']:.4f}", flush=True)
    handle.configure(computed_steps=None)
    return rows


# --------------------------------------------------------------------------------------------------
# Plots and tables
# --------------------------------------------------------------------------------------------------
def plot_calibration(cal: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ("mag_ratios", "mag_std", "cos_dis"),
                              ("magnitude ratio  mean ||r_t|| / ||r_t-1||", "ratio std over tokens",
                               "cosine distance 1 - cos(r_t, r_t-1)")):
        for name, curve in cal["branches"].items():
            ax.plot(range(1, len(curve[key])), curve[key][1:], marker=".", label=name)
        if key == "mag_ratios":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Demo model calibration ({cal['num_steps']} steps, mean of {cal['runs']} runs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_figure(rows: list[dict], sweep_label: str, path: Path, mark: Callable[[Any], None]) -> None:
    """The sweep's mean PSNR against its call speed-up, one colour per retention ratio; ``mark(ax)`` draws what
    the caller points out on top (baselines, the chosen setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r_ in sorted({r["retention_ratio"] for r in rows}):
        sel = [r for r in rows if r["retention_ratio"] == r_]
        ax.scatter([r["call_speedup"] for r in sel], [r["psnr"] for r in sel], s=14, label=f"{sweep_label}, R={r_}")
    mark(ax)
    ax.set_xlabel("speed-up (transformer calls, uncached / cached)")
    ax.set_ylabel("PSNR to uncached image (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], baseline_rows: list[dict], chosen: dict, path: Path) -> None:
    def mark(ax) -> None:
        for name, marker in (("uniform", "s"), ("random", "x")):
            ax.plot([b["call_speedup"] for b in baseline_rows], [b[name]["psnr"] for b in baseline_rows],
                    marker=marker, color="k" if name == "uniform" else "tab:red", label=f"{name} skipping (same count)")
        c = chosen["row"]
        ax.scatter([c["call_speedup"]], [c["psnr"]], s=120, facecolors="none", edgecolors="k", label="chosen default")

    sweep_figure(rows, "MagCache sweep", path, mark)


def sample_grid(pipe, settings: dict, handle, path: Path, n: int = 6) -> None:
    from magcache.metrics import difference_heatmap

    rows = [[], [], []]
    for i, scene in enumerate(D.held_out_scenes()[:n]):
        handle.configure(enabled=False)
        plain = generate(pipe, scene.caption, i, settings)
        handle.configure(enabled=True)
        cached = generate(pipe, scene.caption, i, settings)
        rows[0].append(to_uint8(plain))
        rows[1].append(to_uint8(cached))
        rows[2].append(difference_heatmap(plain, cached, gain=4.0))
    save_image_grid(rows, path)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as 8-bit pixels."""
    return (image * 255).round().astype(np.uint8)


def save_image_grid(rows: list[list[np.ndarray]], path: Path) -> None:
    """8-bit images in rows, each with a 2-pixel white border, as one PNG."""
    from PIL import Image

    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)  # noqa: E731
    Image.fromarray(np.concatenate([np.concatenate([pad(a) for a in r], axis=1) for r in rows], axis=0)).save(path)


def markdown_tables(report: dict) -> str:
    out = []
    a = report.get("adherence_by_cfg", {})
    if a:
        out.append("| true_cfg_scale | correct | background ok | all objects ok | object phrases ok | s/image |")
        out.append("|---|---|---|---|---|---|")
        for cfg, r in a.items():
            out.append(f"| {cfg} | {r['correct']}/{r['prompts']} | {r['background_ok']}/{r['prompts']} | "
                       f"{r['objects_ok']}/{r['prompts']} | {r['object_phrases_ok']}/{r['object_phrases']} | "
                       f"{r['seconds_per_image']} |")
        out.append("")
    rows = report.get("sweep", [])
    if rows:
        out.append("| thresh | K | retention | computed calls | speed-up (calls) | speed-up (time) | PSNR | SSIM |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            out.append(f"| {r['thresh']} | {r['K']} | {r['retention_ratio']} | {r['computed_calls']:g}/{r['total_calls']} "
                       f"| {r['call_speedup']:.2f} | {r['time_speedup']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
        out.append("")
    rows = report.get("baselines", [])
    if rows:
        out.append("| speed-up (calls) | computed calls | MagCache PSNR / SSIM | uniform PSNR / SSIM | random PSNR / SSIM |")
        out.append("|---|---|---|---|---|")
        for r in rows:
            out.append(f"| {r['call_speedup']:.2f} (thresh {r['thresh']}, K {r['K']}, R {r['retention_ratio']}) | "
                       f"{r['computed_calls']:g}/{r['total_calls']} | {r['magcache']['psnr']:.2f} / {r['magcache']['ssim']:.4f} | "
                       f"{r['uniform']['psnr']:.2f} / {r['uniform']['ssim']:.4f} | "
                       f"{r['random']['psnr']:.2f} / {r['random']['ssim']:.4f} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--weights", default=str(DEFAULT_MODEL), help="the saved demo pipeline's folder")
    ap.add_argument("--out-dir", default=str(IMG_DIR), help="JSON + PNGs go here")
    ap.add_argument("--cfg-scales", default="1,2,3,4,6", help="true-CFG scales for the adherence table")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="few prompts, small grids; writes to out/demo_eval_quick")
    ap.add_argument("--no-write", action="store_true", help="do not update demo.json / demo_settings.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adherence-only", action="store_true",
                    help="only the adherence table (e.g. right after training, on the training GPU); writes "
                         "demo_adherence.json to --out-dir")
    ap.add_argument("--device", default="cpu", help="cpu (the app's device; timings) or cuda (--adherence-only)")
    ap.add_argument("--plain-english", metavar="JSON", nargs="?", const=str(PLAIN_ENGLISH_HELD_OUT),
                    help="only the plain-English table: annotated prompts (default: the held-out set), as typed "
                         "and as rewritten by the Demo tab; writes demo_plain_english_<file stem>.json and .png")
    ap.add_argument("--paraphrases", action="store_true",
                    help="only the plain-English table on --count held-out scenes, each as a paraphrase with a "
                         "held-out sentence frame and as its grammar caption; writes demo_paraphrases_heldout.json and .png")
    ap.add_argument("--count", type=int, default=D.NUM_HELD_OUT,
                    help="--paraphrases: how many paraphrases (scene i %% %d)" % D.NUM_HELD_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plain_english or args.paraphrases:
        t0 = time.time()
        pipe, settings = load_pipeline(args.model)
        if args.paraphrases:
            items, name = held_out_paraphrases(args.count), "paraphrases_heldout"
            source = {"paraphrases": {"count": args.count, "seed": PARAPHRASE_SEED, "split": "heldout",
                                      "scenes": f"data.held_out_scenes(), scene i % {D.NUM_HELD_OUT}"}}
        else:
            items, name = json.loads(Path(args.plain_english).read_text()), Path(args.plain_english).stem
            source = {"prompts_file": Path(args.plain_english).name}
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = plain_english(pipe, settings, items, grid=out_dir / f"demo_{name}.png")
        report.update(model=str(args.model), **source, true_cfg_scale=settings["true_cfg_scale"],
                      num_inference_steps=settings["num_inference_steps"], threads=args.threads,
                      minutes=round((time.time() - t0) / 60, 2), load_average=[round(x, 2) for x in os.getloadavg()])
        (out_dir / f"demo_{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["summary"], indent=1))
        return
    if args.device != "cpu" and not args.adherence_only:
        ap.error("--device other than cpu needs --adherence-only: the timings and the preset are for the CPU demo")

    import magcache

    out_dir = Path(args.out_dir) if not args.quick else ROOT / "out" / "demo_eval_quick"
    out_dir.mkdir(parents=True, exist_ok=True)
    write = not (args.quick or args.no_write)
    pipe, settings = load_pipeline(args.model)
    pipe.to(args.device)
    scenes = D.held_out_scenes()[: (6 if args.quick else D.NUM_HELD_OUT)]
    report: dict = {"model": str(args.model), "settings_in": {k: settings[k] for k in ("num_inference_steps", "true_cfg_scale")}}
    t_all = time.time()

    # 1. adherence per CFG scale (no cache)
    print("== adherence (no cache) ==", flush=True)
    report["adherence_by_cfg"] = {}
    for cfg in [float(c) for c in args.cfg_scales.split(",")]:
        res = adherence(pipe, settings, scenes, true_cfg_scale=cfg)
        report["adherence_by_cfg"][str(cfg)] = res
        print(f"  true_cfg_scale {cfg}: {res['correct']}/{res['prompts']} correct (background {res['background_ok']}, "
              f"objects {res['objects_ok']}; by object count {res['correct_by_objects']}), {res['seconds_per_image']} s/image",
              flush=True)
    if args.adherence_only:
        report["adherence_by_cfg"] = {c: {k: v for k, v in r.items() if k != "failures"}
                                      for c, r in report["adherence_by_cfg"].items()}
        report["device"] = args.device
        (out_dir / "demo_adherence.json").write_text(json.dumps(report, indent=1) + "\n")
        return
    best_cfg = choose_cfg_scale({c: r["correct"] for c, r in report["adherence_by_cfg"].items()})
    settings["true_cfg_scale"] = float(best_cfg)
    report["adherence"] = {k: v for k, v in report["adherence_by_cfg"][best_cfg].items()}
    report["adherence"]["true_cfg_scale"] = float(best_cfg)
    print(f"  -> default true_cfg_scale {best_cfg}", flush=True)

    # 2. calibration at the default settings
    print("== calibration ==", flush=True)
    cal_set = ("tuning", 2, 1) if args.quick else CALIBRATION_SET
    cal_prompts = D.prompt_set(*cal_set)
    cal = calibrate(pipe, settings, cal_prompts)
    report["calibration"] = cal
    for name, c in cal["branches"].items():
        print(f"  {name}: ratios {c['mag_ratios']}", flush=True)
    plot_calibration(cal, out_dir / "demo_calibration.png")

    # 3. sweep with the calibrated curves
    print("== sweep ==", flush=True)
    names = list(cal["branches"])
    curves = [cal["branches"][b]["mag_ratios"] for b in (["cond", "uncond"] if len(names) > 1 else names)]
    bench = Bench(pipe, settings, D.prompt_set(*(("tuning", 3, 1) if args.quick else SWEEP_SET)))
    handle = magcache.apply(pipe, preset="flux", curves=curves, rules=magcache.presets.CALIBRATED_FLUX)
    report["reference_seconds_per_image"] = round(bench.reference_seconds, 4)
    report["sweep"] = sweep(bench, handle, args.quick)
    chosen = choose_defaults(report["sweep"])
    report["defaults"] = chosen
    print(f"  -> defaults thresh {chosen['thresh']} K {chosen['K']} retention {chosen['retention_ratio']} "
          f"(x{chosen['row']['call_speedup']:.2f}, PSNR {chosen['row']['psnr']}, SSIM {chosen['row']['ssim']})", flush=True)

    # 4. naive baselines at equal computed-step counts
    print("== naive baselines ==", flush=True)
    targets = BASELINE_TARGETS[:2] if args.quick else BASELINE_TARGETS
    report["baselines"] = baselines(bench, handle, chosen, targets, 1 if args.quick else args.random_draws)
    plot_sweep(report["sweep"], report["baselines"], chosen, out_dir / "demo_sweep.png")

    # adherence with MagCache at the chosen defaults, and the sample grid
    handle.configure(thresh=chosen["thresh"], K=chosen["K"], retention_ratio=chosen["retention_ratio"], computed_steps=None)
    res = adherence(pipe, settings, scenes)
    report["adherence_magcache"] = {k: v for k, v in res.items() if k != "failures"}
    print(f"== adherence with MagCache defaults: {res['correct']}/{res['prompts']} ==", flush=True)
    sample_grid(pipe, settings, handle, out_dir / "demo_samples.png")
    handle.remove()

    report["evaluate_minutes"] = round((time.time() - t_all) / 60, 1)
    (out_dir / "demo_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    if write:
        entry = preset_entry(cal, settings, chosen, f"mean of {cal_set[1]} {cal_set[0]} prompts x {cal_set[2]} seeds "
                             f"(prompts_{cal_set[0]}.json; python -m magcache.studio.demo.evaluate)",
                             f"{SWEEP_SET[0]} prompts ({SWEEP_SET[1]} x {SWEEP_SET[2]} seeds)")
        PRESET_PATH.write_text(json.dumps(entry, indent=1) + "\n")
        settings_path = Path(args.model) / "demo_settings.json"
        demo = json.loads(settings_path.read_text())
        demo["true_cfg_scale"] = settings["true_cfg_scale"]
        demo["magcache"] = {"preset": "demo", "thresh": chosen["thresh"], "K": chosen["K"],
                            "retention_ratio": chosen["retention_ratio"]}
        settings_path.write_text(json.dumps(demo, indent=2) + "\n")
        print(f"wrote {PRESET_PATH} and {settings_path}")
    print()
    print(markdown_tables(report))


if __name__ == "__main__":
    main()
