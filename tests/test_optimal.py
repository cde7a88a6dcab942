"""The budget-optimal schedule: exact against brute force, constraints, the planned policy, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

import magcache.optimal as O
import magcache.policy as P
from magcache.__main__ import main as cli
from magcache.presets import get_preset


def brute_force(cost, budget, forced, max_skips):
    n = len(cost)
    best = (math.inf, None)
    for rest in itertools.combinations(range(1, n), budget - 1):
        steps = [0, *rest]
        if not set(forced) <= set(steps):
            continue
        gaps = [b - a - 1 for a, b in zip(steps, steps[1:] + [n])]
        if max_skips is not None and max(gaps) > max_skips:
            continue
        c = O.schedule_cost(steps, cost)
        if c < best[0] - 1e-12:
            best = (c, steps)
    return best


def random_curve(rng, n):
    return [1.0] + [rng.uniform(0.8, 1.25) for _ in range(n - 1)]


@pytest.mark.parametrize("model", O.ERROR_MODELS)
def test_dynamic_programming_equals_brute_force(model):
    rng = random.Random(3)
    checked = 0
    for trial in range(40):
        n = rng.randint(2, 11)
        ratios = random_curve(rng, n)
        cos = [0.0] + [rng.uniform(0, 0.05) for _ in range(n - 1)] if model == "residual" else None
        cost = O.run_costs(O.step_errors(ratios, model, cos), model)
        forced = {0} | {s for s in range(n) if rng.random() < 0.15}
        max_skips = rng.choice([None, 1, 2, 3])
        budget = rng.randint(1, n)
        expected_cost, expected_steps = brute_force(cost, budget, forced, max_skips)
        if expected_steps is None:
            with pytest.raises(ValueError):
                O.optimal_computed_steps(cost, budget, forced, max_skips)
            continue
        steps, total = O.optimal_computed_steps(cost, budget, forced, max_skips)
        assert total == pytest.approx(expected_cost, abs=1e-12)
        assert O.schedule_cost(steps, cost) == pytest.approx(total, abs=1e-12)
        assert len(steps) == budget and steps[0] == 0 and set(forced) <= set(steps)
        gaps = [b - a - 1 for a, b in zip(steps, steps[1:] + [n])]
        assert max_skips is None or max(gaps) <= max_skips
        checked += 1
    assert checked > 20


def test_minimal_budget_is_the_feasibility_boundary():
    rng = random.Random(5)
    for _ in range(60):
        n = rng.randint(2, 10)
        forced = {0} | {s for s in range(n) if rng.random() < 0.2}
        max_skips = rng.choice([None, 0, 1, 2, 4])
        cost = O.run_costs(O.step_errors(random_curve(rng, n)))
        least = O.minimal_budget(n, forced, max_skips)
        assert brute_force(cost, least, forced, max_skips)[1] is not None
        if least > 1:
            assert brute_force(cost, least - 1, forced, max_skips)[1] is None


def test_magcache_step_error_is_the_accumulated_ratio():
    errors = O.step_errors([1.0, 0.9, 0.8, 1.1], "magcache")
    assert errors[0][1] == pytest.approx(0.1)
    assert errors[0][2] == pytest.approx(1 - 0.72)
    assert errors[1][3] == pytest.approx(1 - 0.88)
    cost = O.run_costs(errors, "magcache")
    assert cost[0][2] == pytest.approx(0.1 + 0.28)
    assert O.run_costs(errors, "run_squared")[0][2] == pytest.approx(0.38 ** 2)


def test_residual_step_error_is_the_size_of_the_residual_change():
    # norms relative to r_0: 1, 0.9, 0.72; angles between consecutive residuals from cos_dis = 1 - cos
    ratios, cos_dis = [1.0, 0.9, 0.8], [0.0, 0.02, 0.08]
    errors = O.step_errors(ratios, "residual", cos_dis)
    t1, t2 = math.acos(0.98), math.acos(0.92)
    assert errors[0][1] == pytest.approx(math.sqrt(1 + 0.81 - 2 * 0.9 * math.cos(t1)))
    assert errors[0][2] == pytest.approx(math.sqrt(1 + 0.72 ** 2 - 2 * 0.72 * math.cos(t1 + t2)))
    assert errors[1][2] == pytest.approx(math.sqrt(0.81 + 0.72 ** 2 - 2 * 0.9 * 0.72 * math.cos(t2)))
    # without a calibrated cosine distance only the norms change
    assert O.step_errors(ratios, "residual")[0][2] == pytest.approx(1 - 0.72)


def test_budget_for_speedup():
    assert O.budget_for_speedup(28, 3) == 10
    assert O.budget_for_speedup(28, 4) == 7
    assert O.budget_for_speedup(28, 1) == 28
    with pytest.raises(ValueError):
        O.budget_for_speedup(28, 0.5)


def test_plan_honours_retention_K_and_budget():
    preset = get_preset("demo")
    settings = preset.settings()  # retention 0.1 -> steps 0-2 computed (half-up rounding), K 6
    for budget in range(7, 29):
        sched = O.simulate_plan(preset.curves, 28, settings, preset.rules, O.Plan(budget=budget), 2)
        for steps in sched.computed.values():
            assert len(steps) == budget
            assert {0, 1, 2} <= set(steps)
            gaps = [b - a - 1 for a, b in zip(steps, steps[1:] + [28])]
            assert max(gaps) <= settings.K
    with pytest.raises(ValueError, match="at least"):
        O.simulate_plan(preset.curves, 28, settings, preset.rules, O.Plan(budget=4), 2)


def test_planned_policy_never_skips_before_a_residual_exists():
    policy = O.PlannedBranchPolicy([1.0, 0.9, 0.9], P.Settings(1.0, 0.0, 2), P.Rules(), 3, O.Plan(budget=1))
    assert policy.computed == {0}
    d = policy.decide(1, has_residual=False)
    assert not d.skip and d.reason == "no residual yet"
    assert policy.decide(2, has_residual=True).skip


def test_forced_steps_follow_the_rules():
    flux = get_preset("flux")
    forced = O.forced_steps(P.resample(flux.curves[0], 28), flux.settings(), flux.rules)
    assert 11 in forced  # FLUX's guarded step
    assert set(range(int(flux.retention_ratio * 28 + 0.5))) <= forced
    wan = get_preset("wan2.1_t2v_1.3B")
    ratios = P.resample(wan.curves[0], 10)
    s = wan.settings(retention_ratio=0.25)
    # Wan counts calls over both branches: call 2*step + branch is forced below int(2 * 10 * 0.25) = 5
    assert O.forced_steps(ratios, s, wan.rules, 0, 2) == {0, 1, 2}
    assert O.forced_steps(ratios, s, wan.rules, 1, 2) == {0, 1}


# --------------------------------------------------------------------------------------------------
# The runtime follows the plan
# --------------------------------------------------------------------------------------------------
def _tiny_flux_true_cfg():
    from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("flux")
    kw = tiny_call_kwargs("flux", 10)
    kw.update(prompt="a red circle", height=16, width=16, max_sequence_length=16, output_type="latent",
              true_cfg_scale=2.0, negative_prompt="blurry")
    return pipe, kw


def _blocks_ran_per_call(pipe, kw):
    """Run the pipeline and return, per transformer call, whether the blocks ran (our own hooks)."""
    t = pipe.transformer
    calls, count = [], [0]
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    hooks = [b.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1)) for b in blocks]

    def on_norm_out(m, a):
        calls.append(count[0])
        count[0] = 0

    hooks.append(t.norm_out.register_forward_pre_hook(on_norm_out))
    try:
        out = pipe(**kw).images
    finally:
        for h in hooks:
            h.remove()
    assert set(calls) <= {0, len(blocks)}
    return out, [c > 0 for c in calls]


def test_runtime_runs_the_planned_schedule_and_predict_equals_it():
    import magcache

    pipe, kw = _tiny_flux_true_cfg()
    handle = magcache.apply(pipe, schedule="optimal", budget=4, retention_ratio=0.2, K=3, thresh=0.0)
    assert handle.cos_curves is None  # the published FLUX curve has no cosine distances
    _, ran = _blocks_ran_per_call(pipe, kw)
    predicted = handle.predict(10, 2).computed
    p = handle.preset
    expected = O.simulate_plan(p.curves, 10, p.settings(retention_ratio=0.2, K=3, thresh=0.0), p.rules,
                               O.Plan(budget=4), 2).computed
    assert predicted == expected == handle.last_run.computed
    actual = {b: [c // 2 for c in range(20) if c % 2 == i and ran[c]] for i, b in enumerate(("cond", "uncond"))}
    assert actual == predicted
    assert all(len(v) == 4 and {0, 1} <= set(v) for v in predicted.values())
    # a target speed-up: ceil(10 / 3) = 4 computed steps per branch, the same plan
    handle.configure(budget=None, target_speedup=3.0)
    assert handle.plan == O.Plan(target_speedup=3.0)
    _, ran = _blocks_ran_per_call(pipe, kw)
    assert handle.last_run.computed == predicted
    # back to the threshold rule
    handle.configure(schedule="threshold", thresh=1.0)
    assert handle.plan is None
    _blocks_ran_per_call(pipe, kw)
    assert handle.last_run.computed == P.simulate(p.curves, 10, handle.settings, p.rules, 2).computed


def test_runtime_plans_with_the_presets_cosine_distances():
    import magcache

    pipe, _ = _tiny_flux_true_cfg()
    p = get_preset("demo")
    handle = magcache.apply(pipe, preset="demo", schedule="optimal", budget=9)
    assert handle.cos_curves == [list(c) for c in p.cos_curves]
    with_cos = O.simulate_plan(p.curves, 28, p.settings(), p.rules, O.Plan(budget=9), 2, p.cos_curves).computed
    without = O.simulate_plan(p.curves, 28, p.settings(), p.rules, O.Plan(budget=9), 2).computed
    assert handle.predict(28, 2).computed == with_cos != without
    handle.configure(curves=[list(c) for c in p.curves])  # a replaced curve drops the preset's cosine distances
    assert handle.cos_curves is None and handle.predict(28, 2).computed == without


def test_optimal_schedule_arguments_are_validated():
    import magcache

    pipe, _ = _tiny_flux_true_cfg()
    with pytest.raises(ValueError, match="exactly one"):
        magcache.apply(pipe, schedule="optimal")
    with pytest.raises(ValueError, match="optimal"):
        magcache.apply(pipe, budget=4)
    with pytest.raises(ValueError, match="schedule must be"):
        magcache.apply(pipe, schedule="fastest", budget=4)
    with pytest.raises(ValueError, match="error model"):
        magcache.apply(pipe, schedule="optimal", budget=4, error_model="psychic")


# --------------------------------------------------------------------------------------------------
# CLI (run as a user would)
# --------------------------------------------------------------------------------------------------
def _cli(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "magcache", "schedule", *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)


def _cli_json(*args: str) -> dict:
    proc = _cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


SCHEDULE_KEYS = {"preset", "steps", "thresh", "retention_ratio", "K", "computed", "skipped", "computed_per_branch",
                 "predicted_speedup"}


def test_cli_optimal_budget_and_target_speedup():
    p = get_preset("demo")
    out = _cli_json("--preset", "demo", "--optimal", "--budget", "7")
    assert SCHEDULE_KEYS <= set(out) and out["schedule"] == "optimal" and out["budget"] == 7
    expected = O.simulate_plan(p.curves, 28, p.settings(), p.rules, O.Plan(budget=7), 2)
    assert out["computed"] == expected.computed
    assert out["computed_per_branch"] == {"cond": 7, "uncond": 7} and out["predicted_speedup"] == 4.0
    # --target-speedup X with --optimal: C = ceil(N / X)
    out = _cli_json("--preset", "demo", "--steps", "20", "--optimal", "--target-speedup", "3")
    assert out["computed_per_branch"] == {"cond": 7, "uncond": 7} and out["steps"] == 20
    out = _cli_json("--preset", "flux", "--optimal", "--budget", "9", "--error-model", "run_squared")
    assert 11 in out["computed"]["cond"] and out["error_model"] == "run_squared"  # FLUX's guarded step kept


def test_cli_target_speedup_without_optimal_is_the_threshold_solver():
    p = get_preset("demo")
    out = _cli_json("--preset", "demo", "--target-speedup", "4")
    settings, sched, _ = P.solve_thresh_for_speedup(p.curves, 28, 4, p.settings(), p.rules, 2)
    assert out["schedule"] == "threshold" and out["reached"] is True
    assert out["thresh"] == settings.thresh and out["computed"] == sched.computed
    assert out["predicted_speedup"] >= 4
    # the optimal schedule at the same computed steps has no larger modelled error (magcache model)
    optimal = _cli_json("--preset", "demo", "--optimal", "--budget", str(len(sched.computed["cond"])))
    for b in ("cond", "uncond"):
        assert optimal["modelled_error"][b] <= out["modelled_error"][b] + 1e-9


@pytest.mark.parametrize("args, message", [
    (("--optimal",), "exactly one"),
    (("--budget", "7"), "needs --optimal"),
    (("--optimal", "--budget", "3"), "at least 6"),
    (("--optimal", "--target-speedup", "0.5"), ">= 1"),
])
def test_cli_bad_optimal_input_exits_2(args, message):
    proc = _cli("--preset", "demo", *args)
    assert proc.returncode == 2 and message in proc.stderr
