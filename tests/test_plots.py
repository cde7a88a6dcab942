"""The app's figures at both screen sizes (no browser): Pareto labels that never overlap, the phone layouts of the
schedule, the Pareto, the calibration and the strategies plot, and the HTML that lets the browser pick between
them."""

import base64
import io
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from magcache import policy as P
from magcache.calibration import Calibration, Resolution
from magcache.presets import get_preset
from magcache.studio.strategies import STRATEGIES, StrategyResults, StrategyRow
from magcache.studio.sweep import SweepResult, SweepRow, pareto_front, sweep_grid
from ui.plots import calibration_figure, figure_html, label_box, pareto_figure, schedule_figure, strategies_figure


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


def _calibration(n: int = 28) -> Calibration:
    """A CFG calibration of a model with a long hub id (its heading must wrap in the phone layout)."""
    curve = [1.0] + [0.99 - 0.003 * i for i in range(n - 1)]
    branches = {b: {"mag_ratios": [v * scale for v in curve], "mag_std": [0.01] * n,
                     "cos_dis": [0.002 * i for i in range(n)]} for b, scale in (("cond", 1.0), ("uncond", 0.99))}
    return Calibration("black-forest-labs/FLUX.1-dev-a-finetune-with-a-long-name", "flux", n, Resolution(1024, 1024),
                       "FlowMatchEulerDiscreteScheduler shift=3", branches, "2026-01-01T00:00:00Z", "synthetic")


def _strategies() -> StrategyResults:
    """Every strategy the app runs, three points each (the legend is as long as it gets)."""
    rows = [StrategyRow(name, "target_speedup", level, 1 / level, level, 1.0, level, 50 - 4 * level - i, 0, 0.99, 0.98)
            for i, name in enumerate(STRATEGIES) for level in (2, 3, 4)]
    return StrategyResults(28, [("a prompt", 0)], 2.0, rows)


def _schedule_figure():
    p = get_preset("flux")
    schedule = P.simulate(p.curves, 28, p.settings(thresh=0.24, retention_ratio=0.2, K=5), p.rules)
    return schedule_figure(schedule, 0.24)


FIGURES = {"schedule": (_schedule_figure, "Schedule"),
           "pareto": (lambda: pareto_figure(_crowded_sweep()), "Pareto plot"),
           "calibration": (lambda: calibration_figure(_calibration(), "flux"), "Calibration of black-forest-labs/"),
           "strategies": (lambda: strategies_figure(_strategies(), title="Demo: seed 0, 28 steps"), "Strategies plot")}


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_has_a_phone_layout_the_browser_can_pick(name):
    draw, alt = FIGURES[name]
    fig = draw()
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
    assert re.search(rf'alt="{alt}[^"]+"', page)


def test_phone_layouts_keep_every_text_inside_the_image():
    """The long model name of a calibration and the strategies' nine legend entries fit the 340-px figure."""
    for fig in (calibration_figure(_calibration(), "flux"), strategies_figure(_strategies(), title="Demo: seed 0")):
        phone = fig.phone_layout()
        FigureCanvasAgg(phone).draw()  # the layout done, as savefig does it
        drawn = phone.get_tightbbox(phone.canvas.get_renderer())  # inches: every text and line drawn
        width, height = phone.get_size_inches()
        assert -0.01 <= drawn.x0 and drawn.x1 <= width + 0.01 and -0.01 <= drawn.y0 and drawn.y1 <= height + 0.01, drawn


def test_schedule_label_names_the_computed_steps():
    assert "cond computes steps 0, 1" in _schedule_figure().get_label()
