"""Every matplotlib figure of the app: the step timeline (computed vs skipped per branch, predicted and actual)
with the accumulated error against the threshold, a calibration's curves over the preset's, a sweep's Pareto
plot and the strategies' quality against speed-up. Built on ``matplotlib.figure.Figure`` (no pyplot global state,
safe in server threads).

Every figure has a phone layout too: a figure function decorated with :func:`with_phone_layout` draws the wide
figure (800 px), which carries the phone one as ``phone_layout`` (a function drawing the same data 340 px wide),
and :func:`figure_html` puts both into one ``<picture>`` so the browser shows the one that fits."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from functools import partial, wraps
from typing import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

from magcache import policy as P
from magcache.calibration import Calibration
from magcache.policy import Schedule
from magcache.presets import Preset, get_preset
from magcache.runtime import RunStats
from magcache.studio.strategies import StrategyResults
from magcache.studio.sweep import SweepResult

COMPUTED, SKIPPED, EDGE, EXPERT_SWITCH = "#2563eb", "#fde68a", "#1e293b", "#7c3aed"
# the phone layout: 340 px at 100 dpi (a 390-px screen less the page's margins), 10-pt ticks (about 11 px of text)
PHONE_WIDTH, PHONE_FONT = 3.4, 10


def with_phone_layout(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Give a figure function ``draw(..., compact=False)`` its phone layout: the wide figure it returns carries
    ``phone_layout``, which draws the same arguments with ``compact=True`` when called (:func:`figure_html` does,
    once per page it writes)."""

    @wraps(draw)
    def wide_or_phone(*args, compact: bool = False, **kwargs) -> Figure:
        fig = draw(*args, compact=compact, **kwargs)
        if not compact:
            fig.phone_layout = partial(draw, *args, compact=True, **kwargs)
        return fig

    return wide_or_phone


def _wrap(text: str, width: int = 40) -> str:
    """A heading in lines that fit the phone layout (a long model path is broken inside the word)."""
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


@with_phone_layout
def schedule_figure(predicted: Schedule, thresh: float, actual: Sequence[RunStats] | None = None,
                    title: str | None = None, expert_switch: int | None = None, *, compact: bool = False) -> Figure:
    """Top: one row per branch (predicted, and actual when given; the first section for FramePack), a square
    per step, blue = computed, yellow = skipped (cached residual reused). Bottom: accumulated error per step and
    the threshold it is compared with. ``expert_switch`` (two-expert models: the steps the high-noise expert
    runs) draws a vertical line labelled "expert switch" before the first low-noise step, in both panels.

    ``compact``: the phone layout (read at about 330 px wide): shorter labels, about five step ticks, larger
    type, the legend in two columns (:func:`with_phone_layout`). Its label (``get_label``) is a one-line
    summary, the image's alt text."""
    branches = list(predicted.decisions)
    rows: list[tuple[str, list[bool]]] = []
    first = actual[0] if actual else None
    said = ("pred.", "actual") if compact else ("predicted", "actual")
    for b in branches:
        rows.append((f"{b} {said[0]}", [d.skip for d in predicted.decisions[b]]))
        if first is not None and b in first.branches:
            rows.append((f"{b} {said[1]}", [d.skip for d in first.branches[b].decisions]))
    n = predicted.num_steps
    computed = predicted.computed_count()
    total = n * len(branches)
    done = sum(len(v) for v in first.computed.values()) if first is not None else None
    sections = f" (section 1 of {len(actual)})" if actual and len(actual) > 1 else ""
    font, small = (PHONE_FONT, PHONE_FONT - 1) if compact else (8, 7)
    if compact:
        # a phone shows the image about 330 px wide: a narrow figure with few, larger labels, rows and legend stacked
        fig = Figure(figsize=(PHONE_WIDTH, 2.9 + 0.32 * len(rows)), dpi=100, layout="constrained")
        top, bottom = fig.subplots(2, 1, height_ratios=[0.32 * len(rows) + 0.4, 1.6])
        heading = title or (f"{computed}/{total} passes computed, {predicted.predicted_speedup():.2f}x (blocks only)"
                            + (f"\nactual: {done}/{total}{sections}" if done is not None else ""))
    else:
        fig = Figure(figsize=(8.0, 1.9 + 0.34 * len(rows)), dpi=100, layout="constrained")
        top, bottom = fig.subplots(2, 1, height_ratios=[0.45 * len(rows) + 0.3, 1.6])
        heading = title or (f"Predicted: {computed}/{total} transformer passes computed, "
                            f"{predicted.predicted_speedup():.2f}x (blocks only)"
                            + (f" · actual: {done}/{total}{sections}" if done is not None else ""))
    for y, (label, skips) in enumerate(reversed(rows)):
        for step, skip in enumerate(skips):
            top.add_patch(_square(step, y, SKIPPED if skip else COMPUTED))
    top.set_xlim(-0.6, n - 0.4)
    top.set_ylim(-0.6, len(rows) - 0.4)
    top.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=font)
    top.tick_params(axis="x", labelsize=font)
    top.xaxis.set_major_locator(MaxNLocator(nbins=5 if compact else 14, integer=True))
    top.set_frame_on(False)
    if compact:  # the whole width for the heading, not only the axes' (the row labels take a third)
        fig.suptitle(heading, x=0.02, ha="left", fontsize=font)
    else:
        top.set_title(heading, fontsize=font + 1, loc="left")

    for b in branches:
        errs = [d.acc_err for d in predicted.decisions[b]]
        bottom.plot(range(n), errs, marker="o", markersize=3, linewidth=1, label=f"{b} {said[0]}")
        if first is not None and b in first.branches:
            bottom.plot(range(n), first.branches[b].acc_err, linestyle="none", marker="x", markersize=5,
                        label=f"{b} {said[1]}")
    bottom.axhline(thresh, color="#dc2626", linestyle="--", linewidth=1, label=f"thresh {thresh:g}")
    if expert_switch is not None and 0 < expert_switch < n:
        for ax in (top, bottom):
            ax.axvline(expert_switch - 0.5, color=EXPERT_SWITCH, linestyle=":", linewidth=1.5)
        late = expert_switch > n / 2  # the label on the side of the line with room for it
        bottom.annotate("expert switch", (expert_switch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3 if late else 3, -3), textcoords="offset points", fontsize=small,
                        color=EXPERT_SWITCH, va="top", ha="right" if late else "left")
    bottom.set_xlim(-0.6, n - 0.4)
    bottom.xaxis.set_major_locator(MaxNLocator(nbins=5 if compact else 10, integer=True))
    bottom.set_ylabel("accumulated\nerror", fontsize=font)
    bottom.tick_params(labelsize=font)
    handles, _ = bottom.get_legend_handles_labels()
    handles = [Patch(facecolor=COMPUTED, edgecolor=EDGE, label="computed"),
               Patch(facecolor=SKIPPED, edgecolor=EDGE, label="skipped (reused)" if compact
                     else "skipped (cached residual reused)")] + handles
    if compact:  # centred on the figure and part of its layout: centred on the axes it would run off the right
        fig.legend(handles=handles, fontsize=small, ncols=2, frameon=False, loc="outside lower center")
    else:
        bottom.legend(handles=handles, fontsize=small, ncol=min(len(handles), 4), frameon=False, loc="upper center",
                      bbox_to_anchor=(0.5, -0.18))
    bottom.grid(alpha=0.3)
    fig.set_label(_schedule_summary(predicted, first, computed, total))
    return fig


def _schedule_summary(predicted: Schedule, first: RunStats | None, computed: int, total: int) -> str:
    """The schedule in one line of words (the figure's alt text): the steps each branch computes."""
    steps = "; ".join(f"{b} computes steps {', '.join(str(s) for s in v)}" for b, v in predicted.computed.items())
    ran = ""
    if first is not None:
        same = all(list(first.computed.get(b, [])) == list(v) for b, v in predicted.computed.items())
        ran = " The run computed " + ("the same steps." if same else "other steps: " + "; ".join(
            f"{b} {', '.join(str(s) for s in v)}" for b, v in first.computed.items()) + ".")
    return f"Schedule: {computed} of {total} transformer passes computed ({steps}).{ran}"


def _square(x: int, y: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.42, y - 0.36), 0.84, 0.72, facecolor=color, edgecolor=EDGE, linewidth=0.4)


@with_phone_layout
def calibration_figure(cal: Calibration, reference: Preset | str | None = None, *, compact: bool = False) -> Figure:
    """The measured ratio curve per branch (band: +-1 std over tokens) over the reference curve resampled to the
    same steps, and the cosine distance below. ``compact``: the phone layout (:func:`with_phone_layout`): the
    heading in lines across the whole width, integer step ticks, 10-pt type, the legend below the axes. Returns a
    matplotlib ``Figure`` (no pyplot state)."""
    ref = get_preset(reference) if isinstance(reference, str) else reference
    font = PHONE_FONT if compact else 10
    said = ("calibrated", "preset") if compact else ("(calibrated)", f"(preset {ref.id})" if ref else "")
    fig = Figure(figsize=(PHONE_WIDTH, 4.9) if compact else (8.0, 5.0), dpi=100, layout="constrained")
    ratio_ax, cos_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = list(range(cal.num_steps))
    for name, curves in cal.branches.items():
        r, sd = curves["mag_ratios"], curves["mag_std"]
        line, = ratio_ax.plot(steps, r, marker=".", label=f"{name} {said[0]}")
        ratio_ax.fill_between(steps, [a - b for a, b in zip(r, sd)], [a + b for a, b in zip(r, sd)],
                              color=line.get_color(), alpha=0.2, lw=0)
        cos_ax.plot(steps, curves["cos_dis"], marker=".", color=line.get_color(), label=name)
    if ref is not None:
        for i, curve in enumerate(ref.curves):
            ratio_ax.plot(steps, P.resample(curve, cal.num_steps, ref.rules.step_mapping), ls="--", color="gray",
                          alpha=0.9 if i == 0 else 0.5, label=f"{P.branch_name(i)} {said[1]}")
    ratio_ax.axhline(1.0, color="black", lw=0.6, alpha=0.4)
    ratio_ax.set_ylabel("magnitude ratio", fontsize=font)
    cos_ax.set_ylabel("cosine dist." if compact else "cosine distance", fontsize=font)
    cos_ax.set_xlabel("step", fontsize=font)
    cos_ax.xaxis.set_major_locator(MaxNLocator(nbins=5 if compact else 12, integer=True))
    heading = f"{cal.model}: {cal.num_steps} steps, {cal.resolution.label()}"
    if compact:  # the whole width for the heading and the legend (beside the axes they would squeeze them)
        fig.suptitle(_wrap(f"{cal.model}:\n{cal.num_steps} steps, {cal.resolution.label()}"), x=0.02, ha="left",
                     fontsize=font)
        fig.legend(handles=ratio_ax.get_legend_handles_labels()[0], fontsize=font - 1, ncols=2, frameon=False,
                   loc="outside lower center")
    else:
        ratio_ax.legend(fontsize=7, loc="best")
        ratio_ax.set_title(heading, fontsize=font)
    for ax in (ratio_ax, cos_ax):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=font)
    fig.set_label(f"Calibration of {heading}: the measured magnitude ratio per branch"
                  + (f" over preset {ref.id}'s curve" if ref else "") + ", and the cosine distance per step.")
    return fig


@with_phone_layout
def pareto_figure(result: SweepResult, quality: str = "psnr", title: str | None = None, *,
                  compact: bool = False) -> Figure:
    """Speed-up vs quality to the baseline, the Pareto front joined by a line. Only the front's points carry a
    label (their row numbers in the sweep table; points drawn on the same spot share one), placed where it covers
    no other label, no marker and stays inside the axes (:func:`place_labels`); every other point is an unlabelled
    marker, the table is its key. ``compact``: the phone layout (:func:`with_phone_layout`). Returns a matplotlib
    ``Figure`` (no pyplot state, safe in server threads)."""
    if quality not in ("psnr", "ssim"):
        raise ValueError("quality is 'psnr' or 'ssim'")
    font = PHONE_FONT if compact else 8
    fig = Figure(figsize=(PHONE_WIDTH, 3.6) if compact else (8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    axis = result.speedup_axis
    rows = result.rows
    if rows:
        xs = [r.speedup(axis) for r in rows]
        ys = [getattr(r, quality) for r in rows]
        ax.scatter(xs, ys, c=["tab:orange" if r.pareto else "tab:blue" for r in rows],
                   s=[36 if r.pareto else 20 for r in rows], zorder=3)
        front = sorted((i for i, r in enumerate(rows) if r.pareto), key=lambda i: xs[i])
        line, = ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", lw=1.2, zorder=2,
                        label="Pareto front (# = table row)")
        others = Line2D([], [], color="tab:blue", marker="o", markersize=4.5, linestyle="none",
                        label="other points (see the table)")
        # below the axes: inside, it would cover points and labels
        fig.legend(handles=[line, others], loc="outside lower center", ncols=1 if compact else 2, fontsize=font - 1,
                   frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"speed-up ({axis}, x)", fontsize=font + 1)
    ax.set_ylabel("PSNR to baseline (dB)" if quality == "psnr" else "SSIM to baseline", fontsize=font + 1)
    ax.tick_params(labelsize=font)
    ax.grid(alpha=0.3)
    cancelled = " (cancelled)" if result.cancelled else ""
    heading = title or f"Sweep: {len(rows)} of {result.total_points} points{cancelled}"
    ax.set_title(heading, fontsize=font + 2)
    if rows:
        # points on the same spot (the same schedule on the predicted axis) share one label
        groups: dict[tuple[float, float], list[int]] = {}
        for i in front:
            groups.setdefault((xs[i], ys[i]), []).append(i)
        labels = [("#" + ", #".join(str(i + 1) for i in members), xy) for xy, members in groups.items()]
        left = place_labels(fig, ax, labels, list(zip(xs, ys)), fontsize=font)
        if left:  # say so in the title, then lay out again (a taller title moves the axes) and place them anew
            for note in list(ax.texts):
                note.remove()
            ax.set_title(f"{heading}\n({_left_off(left)})", fontsize=font + 2)
            fig.set_layout_engine("constrained")
            left = place_labels(fig, ax, labels, list(zip(xs, ys)), fontsize=font)
            ax.set_title(f"{heading}\n({_left_off(left)})" if left else heading, fontsize=font + 2)
    fig.set_label(f"Pareto plot: {len(rows)} sweep points, front rows "
                  + (", ".join(f"#{i + 1}" for i in front) if rows else "none") + ".")
    return fig


def _left_off(n: int) -> str:
    return f"{n} label{'s' if n > 1 else ''} left off: see the table"


# label offsets tried in turn (points): close first, then further out with a leader line
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
_RADII = (5, 12, 20, 30, 42)


def place_labels(fig: Figure, ax, labels: Sequence[tuple[str, tuple[float, float]]],
                 markers: Sequence[tuple[float, float]], fontsize: float = 8, marker_px: float = 4.0) -> int:
    """Annotate ``ax`` with each ``(text, (x, y))`` label at the first offset around its point (close ones
    first, further ones with a leader line) where the text's box overlaps no label or leader line placed
    before, no marker (a ``marker_px`` half-width square around each of ``markers``) and lies inside the axes,
    and where its leader line crosses no label placed before. A label with no such place is left off: returns
    how many. The figure's layout is done first and then frozen, so the boxes measured here are the ones drawn."""
    if not labels:
        return 0
    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # the boxes below must stay where they were measured
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    half = marker_px * fig.dpi / 72  # points -> pixels
    marks = [Bbox.from_extents(x - half, y - half, x + half, y + half)
             for x, y in ax.transData.transform(list(markers))]
    texts: list[Bbox] = []  # placed labels
    lines: list[Bbox] = []  # placed leader lines, as small boxes along them
    left = 0
    for text, xy in labels:
        px, py = ax.transData.transform(xy)
        for radius, (dx, dy) in ((r, d) for r in _RADII for d in _DIRECTIONS):
            leader = radius >= 12
            note = ax.annotate(text, xy, xytext=(dx * radius, dy * radius), textcoords="offset points",
                               fontsize=fontsize, ha={1: "left", -1: "right", 0: "center"}[dx],
                               va={1: "bottom", -1: "top", 0: "center"}[dy], zorder=4,
                               arrowprops=dict(arrowstyle="-", lw=0.6, color="0.4", shrinkA=0, shrinkB=3)
                               if leader else None)
            box = label_box(note, renderer).padded(1.0)
            # the leader runs from the text's centre to the point: what lies between the box and the marker
            cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
            along = [(px + t * (cx - px), py + t * (cy - py)) for t in [i / 20 for i in range(21)]] if leader else []
            along = [(x, y) for x, y in along if not box.contains(x, y) and abs(x - px) + abs(y - py) > half]
            if (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                    and not any(box.overlaps(b) for b in marks + texts + lines)
                    and not any(b.contains(x, y) for b in texts for x, y in along)):
                texts.append(box)
                lines += [Bbox.from_extents(x - 1, y - 1, x + 1, y + 1) for x, y in along]
                break
            note.remove()
        else:
            left += 1
    return left


def label_box(note, renderer) -> Bbox:
    """The box of an annotation's text in pixels (its own extent also covers the leader line, which ends at a
    marker)."""
    note.get_window_extent(renderer)  # places the text for this renderer
    return Text.get_window_extent(note, renderer)


def figure_html(fig: Figure | None, css_class: str = "mc-figure") -> str:
    """A figure as an HTML ``<picture>``: the wide layout, and where the figure has a ``phone_layout`` that
    one for screens up to 700 px (drawn at twice the resolution, the way a phone shows it). The browser picks
    (one image cannot be read at 330 px and at 800 px). Alt text: the figure's label."""
    if fig is None:
        return ""
    alt = html.escape(fig.get_label() or "figure", quote=True)
    wide = _png(fig, fig.dpi)
    phone = getattr(fig, "phone_layout", None)
    source = ""
    if phone is not None:
        small = phone()
        source = f'<source media="(max-width: 700px)" srcset="{_png(small, 2 * small.dpi)} 2x">'
    return (f'<picture class="{css_class}">{source}<img src="{wide}" alt="{alt}" '
            'style="max-width: 100%; height: auto; display: block; margin: 0 auto;"></picture>')


def _png(fig: Figure, dpi: float) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@with_phone_layout
def strategies_figure(results: StrategyResults, quality: str = "psnr", title: str | None = None, *,
                      compact: bool = False) -> Figure:
    """Quality vs speed-up in block work, one line per strategy (each over its own knob). ``compact``: the phone
    layout (:func:`with_phone_layout`): shorter axis labels, 10-pt type, the legend in one column below the axes.
    Returns a matplotlib ``Figure`` (no pyplot state)."""
    if quality not in ("psnr", "ssim"):
        raise ValueError("quality is 'psnr' or 'ssim'")
    by_strategy = results.by_strategy()
    font = PHONE_FONT if compact else 10
    fig = Figure(figsize=(PHONE_WIDTH, 3.3 + 0.2 * len(by_strategy)) if compact else (8.0, 4.8), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>xP*"
    for i, (name, rows) in enumerate(by_strategy.items()):
        # a setting that skipped nothing reproduces the uncached output (100 dB): left out, it would only stretch the axis
        rows = sorted((r for r in rows if r.compute_fraction < 1), key=lambda r: r.compute_speedup)
        ax.plot([r.compute_speedup for r in rows], [getattr(r, quality) for r in rows], marker=markers[i % len(markers)],
                lw=2.2 if name.startswith("magcache") else 1.2, label=name)
    if not results.rows:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    against = "uncached" if compact else "the uncached output"
    ax.set_xlabel("speed-up in block work (x)" if compact else "speed-up in block work (uncached / executed, counted)",
                  fontsize=font)
    ax.set_ylabel(f"PSNR to {against} (dB)" if quality == "psnr" else f"SSIM to {against}", fontsize=font)
    ax.tick_params(labelsize=font)
    ax.grid(alpha=0.3)
    if results.rows and compact:  # below the axes: nine names beside or inside them would cover the lines
        fig.legend(fontsize=font - 1, ncols=1, frameon=False, loc="outside lower center",
                   handles=ax.get_legend_handles_labels()[0])
    elif results.rows:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(_wrap(title) if compact else title, fontsize=font)
    fig.set_label(f"Strategies plot: {'PSNR' if quality == 'psnr' else 'SSIM'} against speed-up in block work, "
                  f"{len(results.rows)} points of {', '.join(by_strategy) or 'no strategy'}; the table lists them.")
    return fig
