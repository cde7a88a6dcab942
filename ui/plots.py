"""Matplotlib figures for the app: the step timeline (computed vs skipped per branch, predicted and actual) and
the accumulated error against the threshold. Built on ``matplotlib.figure.Figure`` (no pyplot global state)."""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from magcache.policy import Schedule
from magcache.runtime import RunStats

COMPUTED, SKIPPED, EDGE = "#2563eb", "#fde68a", "#1e293b"


def schedule_figure(predicted: Schedule, thresh: float, actual: Sequence[RunStats] | None = None,
                    title: str | None = None) -> Figure:
    """Top: one row per branch (predicted, and actual when given; the first section for FramePack), a square
    per step, blue = computed, yellow = skipped (cached residual reused). Bottom: accumulated error per step and
    the threshold it is compared with."""
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
