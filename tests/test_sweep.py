"""Speed-up target solver and the thresh x K sweep (fake runner for the bookkeeping, a tiny pipeline end to end)."""

import math
import threading
from dataclasses import replace

import numpy as np
import pytest

import magcache
from magcache import policy as P
from magcache.presets import get_preset
from magcache.studio.sweep import (
    PipelineSweep,
    SweepRow,
    pareto_front,
    run_sweep,
    solve_for_speedup,
    sweep_grid,
)
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs
from ui.plots import pareto_figure


# --------------------------------------------------------------------------------------------------
# Speed-up target
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset_id, steps, target", [
    ("flux", 28, 2.5),
    ("wan2.1_t2v_1.3B", 50, 2.0),
    ("hunyuan_video", 50, 2.0),
    ("chroma", 26, 2.0),  # '<' rules: the 4-decimal rounding must not land on the breakpoint itself
    ("wan2.1_t2v_14B", 50, 2.5),
    ("flux", 28, 3.0),
])
def test_target_solver_hits_the_target_within_one_step(preset_id, steps, target):
    p = get_preset(preset_id)
    branches = len(p.curves)
    sol = solve_for_speedup(p.curves, steps, target, p.settings(), p.rules, branches)
    assert sol.reached
    total = steps * branches
    computed = sol.schedule.computed_count()
    # within one step: reaches the target, and one computed step more would not
    assert total / computed >= target > total / (computed + 1)
    # the returned settings (with the user's zero_thresh_disables) really give that schedule
    again = P.simulate(p.curves, steps, sol.settings, p.rules, branches)
    assert again.computed == sol.schedule.computed and again.predicted_speedup() >= target
    # smallest K: no smaller K reaches the target (independent brute-force grid up to thresh 1)
    for K in range(1, sol.settings.K):
        grid = (replace(p.settings(), K=K, thresh=t / 1000) for t in range(1, 1001))
        assert all(P.simulate(p.curves, steps, s, p.rules, branches).predicted_speedup() < target for s in grid)
    # smallest thresh for that K, up to the 4-decimal rounding
    below = [replace(sol.settings, thresh=t / 10000) for t in range(1, int(sol.settings.thresh * 10000))]
    assert all(P.simulate(p.curves, steps, s, p.rules, branches).predicted_speedup() < target for s in below)
    assert f"K={sol.settings.K}" in sol.explanation and f"{computed} of {total}" in sol.explanation


def test_target_solver_reports_an_unreachable_target():
    p = get_preset("flux")
    sol = solve_for_speedup(p.curves, 28, 20.0, p.settings(), p.rules)
    assert not sol.reached and "out of reach" in sol.explanation
    assert sol.predicted_speedup == max(sp for _, _, sp in sol.tried)
    again = P.simulate(p.curves, 28, sol.settings, p.rules)
    assert again.computed == sol.schedule.computed
    with pytest.raises(ValueError):
        solve_for_speedup(p.curves, 28, 0.5, p.settings(), p.rules)
    assert not P.scan_thresh_for_speedup(p.curves, 28, 20.0, p.settings(K=2), p.rules, max_thresh=1.0)[0]


# --------------------------------------------------------------------------------------------------
# Grid, rows, Pareto front
# --------------------------------------------------------------------------------------------------
def test_sweep_grid_is_bounded_and_validated():
    grid = sweep_grid([0.06, 0.12, 0.24], [2, 4], [0.2])
    assert len(grid) == 6 and grid[0].settings() == {"thresh": 0.06, "K": 2, "retention_ratio": 0.2}
    assert [p.K for p in grid] == [2, 2, 2, 4, 4, 4]
    assert len(sweep_grid([0.1, 0.1], [2], [0.2, 0.1])) == 2
    with pytest.raises(ValueError, match="limit is 36"):
        sweep_grid([i / 100 for i in range(10)], [1, 2, 3, 4], [0.1])
    for bad in (([-0.1], [2], [0.2]), ([0.1], [-1], [0.2]), ([0.1], [2], [1.5]), ([], [2], [0.2]),
                ([float("nan")], [2], [0.2])):
        with pytest.raises(ValueError):
            sweep_grid(*bad)


class FakeRun:
    """A RunStats-like record: the fake model 'computes' the steps the policy would."""

    def __init__(self, schedule, settings):
        self.num_steps = schedule.num_steps
        self.settings = settings
        self.branches = schedule.decisions
        self.computed = schedule.computed


def fake_generate(log):
    p = get_preset("flux")
    base = np.linspace(0, 1, 16 * 16 * 3).reshape(16, 16, 3)

    def generate(point):
        log.append(point)
        if point is None:
            return base, 1.0, None
        settings = p.settings(**point.settings())
        schedule = P.simulate(p.curves, 28, settings, p.rules)
        skipped = 28 - schedule.computed_count()
        noise = np.random.default_rng(skipped).normal(0, 0.002 * skipped, base.shape)
        return np.clip(base + noise, 0, 1), schedule.computed_count() / 28, FakeRun(schedule, settings)

    return generate


def test_run_sweep_rows_progress_pareto_and_table():
    log, progress = [], []
    grid = sweep_grid([0.06, 0.12, 0.24], [2, 4], [0.1])
    p = get_preset("flux")
    result = run_sweep(fake_generate(log), grid, predict=lambda runs: [P.simulate(p.curves, r.num_steps, r.settings, p.rules) for r in runs],
                       progress=lambda done, total, msg: progress.append((done, total, msg)))
    assert log[:2] == [None, None] and log[2:] == grid  # warm-up and baseline, then the grid in order
    assert not result.cancelled and len(result.rows) == 6 and result.baseline_seconds == 1.0
    assert [d for d, _, _ in progress] == sorted(d for d, _, _ in progress) and progress[-1][:2] == (8, 8)
    for row in result.rows:
        assert row.matches_prediction
        assert row.measured_speedup == pytest.approx(28 / row.computed_steps)
        assert row.predicted_speedup == pytest.approx(28 / row.computed_steps)
    # Pareto front against a brute-force dominance check
    pts = [(r.measured_speedup, r.psnr) for r in result.rows]
    for i, r in enumerate(result.rows):
        dominated = any(a >= pts[i][0] and b >= pts[i][1] and (a, b) != pts[i] for a, b in pts)
        assert r.pareto == (not dominated)
    assert result.front() and result.front()[0].measured_speedup == max(p[0] for p in pts)
    headers, rows = result.table()
    assert len(headers) == len(rows[0]) == 10 and len(rows) == 6
    assert result.to_csv().count("\n") == 7
    assert result.settings_at(5) == grid[5].settings()
    fig = pareto_figure(result)
    assert fig.axes[0].get_xlabel().startswith("speed-up") and len(fig.axes[0].collections) == 1
    assert pareto_figure(result, quality="ssim").axes[0].get_ylabel() == "SSIM to baseline"


def test_run_sweep_cancels_between_points():
    log = []
    grid = sweep_grid([0.06, 0.12, 0.24], [2, 4], [0.1])
    stop = threading.Event()
    generate = fake_generate(log)

    def generate_then_cancel(point):
        out = generate(point)
        if len(log) == 4:  # warm-up, baseline and two points done
            stop.set()
        return out

    result = run_sweep(generate_then_cancel, grid, cancel=stop)
    assert result.cancelled and len(result.rows) == 2 and len(log) == 4
    assert sum(r.pareto for r in result.rows) >= 1
    calls = []
    result = run_sweep(fake_generate(calls), grid, cancel=lambda: len(calls) >= 1, warmup=False)
    assert result.cancelled and result.rows == [] and calls == [None]
    assert "cancelled" in pareto_figure(result).axes[0].get_title()


def test_pareto_front_handles_ties():
    def row(speed, quality):
        point = sweep_grid([0.1], [2], [0.2])[0]
        return SweepRow(point, 1.0, speed, {"cond": 1}, 2, quality, 1.0)

    rows = [row(2.0, 30.0), row(2.0, 30.0), row(1.5, 35.0), row(1.5, 34.0), row(3.0, 20.0), row(1.0, 35.0)]
    assert pareto_front(rows) == [0, 1, 2, 4]


# --------------------------------------------------------------------------------------------------
# End to end on a tiny pipeline
# --------------------------------------------------------------------------------------------------
def test_sweep_a_tiny_pipeline_3x2_with_cancel():
    pipe = build_tiny_pipeline("flux")
    steps = 5
    kwargs = tiny_call_kwargs("flux", steps)
    handle = magcache.apply(pipe, preset="flux", thresh=0.24, retention_ratio=0.2, K=5)
    grid = sweep_grid([0.0, 0.3, 1.0], [1, 3], [0.0])
    result = PipelineSweep(pipe, kwargs, seed=0).run(grid, warmup=False)
    assert len(result.rows) == 6 and not result.cancelled and result.baseline_seconds > 0
    for row in result.rows:
        assert row.matches_prediction, row.point  # the run computed the steps the preview predicted
        assert row.total_steps == steps and math.isfinite(row.psnr) and 0 < row.ssim <= 1
        if row.computed_steps == steps:
            assert row.psnr == 100.0  # nothing skipped: identical to the baseline
    assert any(r.computed_steps < steps and r.psnr < 100.0 for r in result.rows)
    assert result.rows[0].computed_steps == steps  # thresh 0 switches the cache off
    assert any(r.pareto for r in result.rows)
    # the handle is back to what it was
    assert magcache.get_handle(pipe) is handle and handle.enabled
    assert (handle.settings.thresh, handle.settings.retention_ratio, handle.settings.K) == (0.24, 0.2, 5)

    stop = threading.Event()
    result = PipelineSweep(pipe, kwargs, seed=0).run(
        grid, warmup=False, cancel=stop, progress=lambda done, total, msg: stop.set() if done >= 2 else None)
    assert result.cancelled and len(result.rows) == 1
    handle.remove()
