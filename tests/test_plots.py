"""The app's figures at both screen sizes (no browser): Pareto labels that never overlap, the phone layouts of the
schedule and the Pareto plot, and the HTML that lets the browser pick between them."""

import base64
import io
import re

import numpy as np
from PIL import Image

from magcache import policy as P
from magcache.presets import get_preset
from magcache.studio.sweep import SweepResult, SweepRow, pareto_front, sweep_grid
from ui.plots import figure_html, label_box, pareto_figure, schedule_figure


def _crowded_sweep(n: int = 36, seed: int = 0) -> SweepResult:
    """A sweep whose points pile up: a dense Pareto front along a curve, ties on one spot, and points just off
    it (the predicted axis gives many points the same speed-up)."""
    rng = np.random.default_rng(seed)
    grid = sweep_grid([round(0.02 * (i + 1), 2) for i in range(12)], [2, 4, 6], [0.1])[:n]
    rows = []
    for i, point in enumerate(grid):
        speed = 1.5 + 0.05 * (i % 12) + rng.normal(0, 0.01)
        psnr = 45.0 - 2.0 * (speed - 1.5) * 10 / 3 + rng.normal(0, 0.05)
        rows.append(SweepRow(point, 1.0, speed, {"cond": 10}, 28, psnr, 0.99))
    rows.append(SweepRow(grid[0], 1.0, rows[3].measured_speedup, {"cond": 10}, 28, rows[3].psnr, 0.99))  # a tie
    for i in pareto_front(rows):
        rows[i].pareto = True
    return SweepResult(1.0, rows, len(rows))


def _label_boxes(fig):
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()  # the boxes as drawn, after the layout
    return [label_box(t, renderer) for t in ax.texts], ax.get_window_extent(renderer)


def test_pareto_labels_never_overlap_in_a_crowded_sweep():
    for compact in (False, True):
        result = _crowded_sweep()
        fig = pareto_figure(result, compact=compact)
        boxes, inside = _label_boxes(fig)
        front = [i for i, r in enumerate(result.rows) if r.pareto]
        assert len(front) >= 8, "the case must be crowded"
        labelled = [int(n) - 1 for t in fig.axes[0].texts for n in re.findall(r"#(\d+)", t.get_text())]
        assert set(labelled) <= set(front)  # only the front is labelled
        assert len(labelled) >= len(front) // 2  # and most of it is
        for i, a in enumerate(boxes):
            assert inside.x0 - 1 <= a.x0 and a.x1 <= inside.x1 + 1 and inside.y0 - 1 <= a.y0 and a.y1 <= inside.y1 + 1
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (compact, a, b)


def test_points_on_one_spot_share_a_label():
    result = _crowded_sweep()
    fig = pareto_figure(result)
    texts = [t.get_text() for t in fig.axes[0].texts]
    tied = [t for t in texts if "#4" in re.findall(r"#\d+", t)]
    assert result.rows[-1].pareto and tied == [f"#4, #{len(result.rows)}"], texts


def _png_size(data_uri: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).size


def test_schedule_and_pareto_have_a_phone_layout_the_browser_can_pick():
    p = get_preset("flux")
    schedule = P.simulate(p.curves, 28, p.settings(thresh=0.24, retention_ratio=0.2, K=5), p.rules)
    for fig in (schedule_figure(schedule, 0.24), pareto_figure(_crowded_sweep())):
        page = figure_html(fig)
        wide, = re.findall(r'<img src="([^"]+)"', page)
        phone, = re.findall(r'<source media="\(max-width: 700px\)" srcset="([^" ]+) 2x"', page)
        assert _png_size(wide)[0] == 800
        # the phone image is drawn for about 340 CSS px (twice the pixels for a phone's screen), not a shrunk copy
        assert _png_size(phone)[0] == 680
        phone_fig = fig.phone_layout()
        sizes = [t.get_fontsize() for ax in phone_fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()]
        assert min(sizes) >= 10  # 10 pt at 340 px: about 11 px of text on a 330-px-wide screen
        assert len(phone_fig.axes[0].get_xticks()) <= 8
        assert re.search(r'alt="(Schedule|Pareto plot): [^"]+"', page)
    assert "cond computes steps 0, 1" in schedule_figure(schedule, 0.24).get_label()
