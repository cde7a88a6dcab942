"""Every matplotlib figure of the app: the step timeline (computed vs skipped per branch, predicted and actual)
with the accumulated error against the threshold, a calibration's curves over the preset's, a sweep's Pareto
plot and the strategies' quality against speed-up. Built on ``matplotlib.figure.Figure`` (no pyplot global state, safe in server threads)."""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from magcache import policy as P
from magcache.calibration import Calibration
from magcache.policy import Schedule
from magcache.presets import Preset, get_preset
from magcache.runtime import RunStats
from magcache.studio.strategies import StrategyResults
from magcache.studio.sweep import SweepResult

COMPUTED, SKIPPED, EDGE, EXPERT_SWITCH = "#2563eb", "#fde68a", "#1e293b", "#7c3aed"


def schedule_figure(predicted: Schedule, thresh: float, actual: Sequence[RunStats] | None = None,
                    title: str | None = None, expert_switch: int | None = None) -> Figure:
    """Top: one row per branch (predicted, and actual when given; the first section for FramePack), a square
    per step, blue = computed, yellow = skipped (cached residual reused). Bottom: accumulated error per step and
    the threshold it is compared with. ``expert_switch`` (two-expert models: the steps the high-noise expert
    runs) draws a vertical line labelled "expert switch" before the first low-noise step, in both panels."""
    branches = list(predicted.decisions)
    rows: list[tuple[str, list[bool]]] = []
    first = actual[0] if actual else None
    for b in branches:
        rows.append((f"{b} predicted", [d.skip for d in predicted.decisions[b]]))
        if first is not None and b in first.branches:
            rows.append((f"{b} actual", [d.skip for d in first.branches[b].decisions]))
    n = predicted.num_steps
    fig = Figure(figsize=(8.0, 1.9 + 0.34 * len(rows)), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[0.45 * len(rows) + 0.3, 1.6])
    for y, (label, skips) in enumerate(reversed(rows)):
        for step, skip in enumerate(skips):
            top.add_patch(_square(step, y, SKIPPED if skip else COMPUTED))
    top.set_xlim(-0.6, n - 0.4)
    top.set_ylim(-0.6, len(rows) - 0.4)
    top.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    top.tick_params(axis="x", labelsize=8)
    top.set_xticks(range(0, n, max(1, n // 14)))
    top.set_frame_on(False)
    computed = predicted.computed_count()
    total = n * len(branches)
    heading = title or f"Predicted: {computed}/{total} transformer passes computed, {predicted.predicted_speedup():.2f}x (blocks only)"
    if actual:
        done = sum(len(v) for v in actual[0].computed.values())
        heading += f" · actual: {done}/{total}" + (f" (section 1 of {len(actual)})" if len(actual) > 1 else "")
    top.set_title(heading, fontsize=9, loc="left")

    for b in branches:
        errs = [d.acc_err for d in predicted.decisions[b]]
        bottom.plot(range(n), errs, marker="o", markersize=3, linewidth=1, label=f"{b} predicted")
        if first is not None and b in first.branches:
            bottom.plot(range(n), first.branches[b].acc_err, linestyle="none", marker="x", markersize=5, label=f"{b} actual")
    bottom.axhline(thresh, color="#dc2626", linestyle="--", linewidth=1, label=f"thresh {thresh:g}")
    if expert_switch is not None and 0 < expert_switch < n:
        for ax in (top, bottom):
            ax.axvline(expert_switch - 0.5, color=EXPERT_SWITCH, linestyle=":", linewidth=1.5)
        bottom.annotate("expert switch", (expert_switch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -3), textcoords="offset points", fontsize=7, color=EXPERT_SWITCH, va="top")
    bottom.set_xlim(-0.6, n - 0.4)
    bottom.set_ylabel("accumulated\nerror", fontsize=8)
    bottom.tick_params(labelsize=8)
    handles, _ = bottom.get_legend_handles_labels()
    handles = [Patch(facecolor=COMPUTED, edgecolor=EDGE, label="computed"),
               Patch(facecolor=SKIPPED, edgecolor=EDGE, label="skipped (cached residual reused)")] + handles
    bottom.legend(handles=handles, fontsize=7, ncol=min(len(handles), 4), frameon=False, loc="upper center",
                  bbox_to_anchor=(0.5, -0.18))
    bottom.grid(alpha=0.3)
    return fig


def _square(x: int, y: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.42, y - 0.36), 0.84, 0.72, facecolor=color, edgecolor=EDGE, linewidth=0.4)


def calibration_figure(cal: Calibration, reference: Preset | str | None = None):
    """The measured ratio curve per branch (band: +-1 std over tokens) over the reference curve resampled to the
    same steps, and the cosine distance below. Returns a matplotlib ``Figure`` (no pyplot state)."""
    ref = get_preset(reference) if isinstance(reference, str) else reference
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ratio_ax, cos_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = list(range(cal.num_steps))
    for name, curves in cal.branches.items():
        r, sd = curves["mag_ratios"], curves["mag_std"]
        line, = ratio_ax.plot(steps, r, marker=".", label=f"{name} (calibrated)")
        ratio_ax.fill_between(steps, [a - b for a, b in zip(r, sd)], [a + b for a, b in zip(r, sd)],
                              color=line.get_color(), alpha=0.2, lw=0)
        cos_ax.plot(steps, curves["cos_dis"], marker=".", color=line.get_color(), label=name)
    if ref is not None:
        for i, curve in enumerate(ref.curves):
            ratio_ax.plot(steps, P.resample(curve, cal.num_steps, ref.rules.step_mapping), ls="--", color="gray",
                          alpha=0.9 if i == 0 else 0.5, label=f"{P.branch_name(i)} (preset {ref.id})")
    ratio_ax.axhline(1.0, color="black", lw=0.6, alpha=0.4)
    ratio_ax.set_ylabel("magnitude ratio")
    ratio_ax.legend(fontsize=7, loc="best")
    ratio_ax.set_title(f"{cal.model}: {cal.num_steps} steps, {cal.resolution.label()}", fontsize=10)
    cos_ax.set_ylabel("cosine distance")
    cos_ax.set_xlabel("step")
    for ax in (ratio_ax, cos_ax):
        ax.grid(alpha=0.3)
    return fig


def pareto_figure(result: SweepResult, quality: str = "psnr", title: str | None = None):
    """Speed-up vs quality to the baseline, every point labelled with its row number in the sweep table, the
    Pareto front joined by a
    line. Returns a matplotlib ``Figure`` (no pyplot state, safe in server threads)."""
    if quality not in ("psnr", "ssim"):
        raise ValueError("quality is 'psnr' or 'ssim'")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    axis = result.speedup_axis
    rows = result.rows
    if rows:
        xs = [r.speedup(axis) for r in rows]
        ys = [getattr(r, quality) for r in rows]
        colors = ["tab:orange" if r.pareto else "tab:blue" for r in rows]
        ax.scatter(xs, ys, c=colors, zorder=3)
        # the table's row numbers, not the settings: short labels, alternately above and below, stay apart
        for i, (x, y) in enumerate(zip(xs, ys)):
            ax.annotate(f"#{i + 1}", (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -11),
                        fontsize=8)
        front = sorted((r for r in rows if r.pareto), key=lambda r: r.speedup(axis))
        ax.plot([r.speedup(axis) for r in front], [getattr(r, quality) for r in front], color="tab:orange",
                lw=1.2, zorder=2, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"speed-up ({axis}, x)")
    ax.set_ylabel("PSNR to baseline (dB)" if quality == "psnr" else "SSIM to baseline")
    ax.grid(alpha=0.3)
    cancelled = " (cancelled)" if result.cancelled else ""
    ax.set_title(title or f"Sweep: {len(rows)} of {result.total_points} points{cancelled}", fontsize=10)
    return fig


def strategies_figure(results: StrategyResults, quality: str = "psnr", title: str | None = None):
    """Quality vs speed-up in block work, one line per strategy (each over its own knob). Returns a matplotlib
    ``Figure`` (no pyplot state)."""
    if quality not in ("psnr", "ssim"):
        raise ValueError("quality is 'psnr' or 'ssim'")
    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>xP*"
    for i, (name, rows) in enumerate(results.by_strategy().items()):
        # a setting that skipped nothing reproduces the uncached output (100 dB): left out, it would only stretch the axis
        rows = sorted((r for r in rows if r.compute_fraction < 1), key=lambda r: r.compute_speedup)
        ax.plot([r.compute_speedup for r in rows], [getattr(r, quality) for r in rows], marker=markers[i % len(markers)],
                lw=2.2 if name.startswith("magcache") else 1.2, label=name)
    if not results.rows:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("speed-up in block work (uncached / executed, counted)")
    ax.set_ylabel("PSNR to the uncached output (dB)" if quality == "psnr" else "SSIM to the uncached output")
    ax.grid(alpha=0.3)
    if results.rows:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
