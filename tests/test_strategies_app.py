"""The app's Strategies run kind and view, and the optimal schedule beside the threshold solution, on the tiny demo
tab: a strategy's row equals a direct run of the same cache on the job's pipeline, Stop leaves the model fresh, the
run cap refuses before anything loads."""

import math

import numpy as np
import pytest

import magcache
from magcache import optimal as O
from magcache.metrics import psnr
from magcache.studio import strategies as S
from magcache.studio import tuning as backend
from magcache.studio.defaults import tab_defaults
from magcache.studio.jobs import device_job, session_token
from magcache.studio.manager import ModelManager
from magcache.studio.request import InvalidRequest
from magcache.studio.tiny import build_tiny_pipeline

from ui import handlers
from ui import strategies as view
from ui import tuning

TAB, STEPS = "demo", 6
FBC = {"first_block_cache": [0.3]}


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    return ModelManager(tiny=True, demo_dir=tmp_path_factory.mktemp("no_demo_model") / "demo_model")


@pytest.fixture(autouse=True)
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGCACHE_HOME", str(tmp_path / "home"))


def _values(manager, **extra):
    d = tab_defaults(manager, TAB, None)
    values = {"prompt": "red background, small blue circle at left", "steps": STEPS, "seed": 1, "compare": False,
              "thresh": d["thresh"], "retention_ratio": d["retention_ratio"], "K": d["K"], "guidance": 4.0,
              "width": 16, "height": 16, "curve": backend.CURVE_PRESET, "curve_file": None}
    values.update(extra)
    return values


def _plain(pipe, job):
    return pipe(**job.call, generator=job.generator()).images


def _has_cache_hooks(transformer) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook._hook_order
               for m in transformer.modules())


def test_rows_equal_direct_runs_on_the_same_pipeline(manager):
    req = handlers.request_from_values(TAB, _values(manager))
    run = S.run_tab_strategies(manager, req, [2.0], ["magcache", "uniform", "first_block_cache"], knobs=FBC)
    rows = {r.strategy: r for r in run.results.rows}
    assert set(rows) == {"magcache", "uniform", "first_block_cache"} and not run.results.cancelled
    assert run.planned_runs == 4
    with device_job(manager, req) as job:
        pipe = job.pipe
        assert magcache.get_handle(pipe) is None and not _has_cache_hooks(pipe.transformer)
        reference = _plain(pipe, job)
        handle = magcache.apply(pipe, preset=job.loaded.preset, retention_ratio=req.retention_ratio, K=req.K)
        settings, _ = S.reference_at(handle, STEPS, 2, 2.0)
        handle.configure(thresh=settings.thresh)
        cached = _plain(pipe, job)
        assert handle.last_run.computed == rows["magcache"].computed
        assert psnr(cached, reference) == pytest.approx(rows["magcache"].psnr, abs=1e-3)
        budget = S.equal_compute_budget(handle, STEPS, 2, 2.0)
        handle.configure(computed_steps={"cond": S.uniform_steps(STEPS, budget)})
        assert psnr(_plain(pipe, job), reference) == pytest.approx(rows["uniform"].psnr, abs=1e-3)
        config = S._hook_config("first_block_cache", 0.3, pipe, handle, STEPS)
        handle.remove()
        pipe.transformer.enable_cache(config)
        try:
            assert psnr(_plain(pipe, job), reference) == pytest.approx(rows["first_block_cache"].psnr, abs=1e-3)
        finally:
            pipe.transformer.disable_cache()


def test_stop_drops_the_interrupted_run_and_leaves_the_model_fresh(manager):
    req = handlers.request_from_values(TAB, _values(manager))
    with device_job(manager, req) as job:
        before = _plain(job.pipe, job)
    session = "strategies-stop"

    def stop_at_the_third_run(phase, done, total):
        if phase.startswith("Strategies: run 3 of"):
            manager.cancel(session)

    with session_token(manager, session) as token:
        run = S.run_tab_strategies(manager, req, [2.0], ["uniform", "first_block_cache"], token,
                                   stop_at_the_third_run, knobs={"first_block_cache": [0.3, 0.5]})
    # run 3 (FirstBlockCache, its hooks on the transformer) was interrupted: dropped, and its hooks removed
    assert run.results.cancelled and [r.strategy for r in run.results.rows] == ["uniform"]
    with device_job(manager, req) as job:
        assert magcache.get_handle(job.pipe) is None and not _has_cache_hooks(job.pipe.transformer)
        assert not getattr(job.pipe, "_interrupt", False)
        assert np.array_equal(np.asarray(_plain(job.pipe, job)[0]), np.asarray(before[0]))


def test_the_run_cap_refuses_before_anything_loads(tmp_path):
    fresh = ModelManager(tiny=True, demo_dir=tmp_path / "demo_model")
    req = handlers.request_from_values(TAB, _values(fresh))
    with pytest.raises(InvalidRequest, match=r"the limit is 40\. Give fewer speed-up levels"):
        S.run_tab_strategies(fresh, req, [1.5 + i / 4 for i in range(12)])
    with pytest.raises(InvalidRequest, match="between 1 and 50"):
        S.run_tab_strategies(fresh, req, [0.5], ["uniform"])
    with pytest.raises(InvalidRequest, match="at least one strategy"):
        S.run_tab_strategies(fresh, req, [2.0], [])
    assert not fresh.loaded()


def test_solve_target_returns_the_optimal_schedule_the_runtime_takes(manager):
    values = _values(manager, steps=12, retention_ratio=0.1, K=4)
    solution, curve = backend.solve_target(manager, TAB, values, 2.5)
    o = solution.optimal
    assert o.budget == math.ceil(12 / 2.5) and o.error_model == O.DEFAULT_ERROR_MODEL
    assert all(len(steps) == o.budget for steps in o.schedule.computed.values())
    # what a run with schedule="optimal" at this target computes, with the K and retention the solve chose
    handle = magcache.apply(build_tiny_pipeline("flux"), preset="flux",
                            schedule="optimal", target_speedup=2.5, K=solution.settings.K,
                            retention_ratio=solution.settings.retention_ratio, curves=curve.curves, rules=curve.rules)
    try:
        assert handle.predict(12, 2).computed == o.schedule.computed
    finally:
        handle.remove()
    s = solution.settings
    assert o.threshold_error == pytest.approx(sum(O.modelled_error(solution.schedule, curve.curves, s, curve.rules).values()))
    assert o.modelled_error == pytest.approx(sum(O.modelled_error(o.schedule, curve.curves, s, curve.rules).values()))
    text = tuning.solve_target(manager, TAB, values, 2.5)["text"]
    assert f"**{o.modelled_error:.3g}** optimal vs **{o.threshold_error:.3g}** threshold rule" in text
    # a budget below what retention needs: said, not raised
    blocked = backend.solve_target(manager, TAB, _values(manager, steps=12, retention_ratio=0.5, K=4), 5.0)[0].optimal
    assert blocked.schedule is None and "needs at least" in blocked.problem
    assert "not possible here" in tuning.optimal_text(blocked)


def test_the_view_formats_table_plot_and_status(manager):
    out = view.strategies_tab(manager, TAB, _values(manager), "2", ["magcache", "random"])
    assert "Strategies done" in out["status"] and out["figure"] is not None
    assert list(out["table"].columns) == view.TABLE_HEADERS and list(out["table"]["strategy"]) == ["magcache", "random"]
    with pytest.raises(InvalidRequest, match="Strategies: speed-up levels must be numbers"):
        view.strategies_tab(manager, TAB, _values(manager), "2, fast")


def test_every_tab_gets_the_strategies_view(manager):
    import gradio as gr

    from ui.layout import build_tab

    with gr.Blocks() as blocks:
        build_tab(manager.catalog.tab(TAB), manager)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {f"strategies-{TAB}", f"strategies-run-{TAB}", f"strategies-stop-{TAB}"} <= ids
