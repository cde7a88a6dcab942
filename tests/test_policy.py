"""The pure MagCache policy: resampling, every reference rule variant, schedule counts and exact step lists.

The ``_research_*`` / ``_comfyui_*`` functions below are literal transcriptions of the reference loops (numpy,
class-counter style, as in the MagCache research code, Zehong-Ma/MagCache, and ComfyUI-MagCache),
written independently of ``magcache.policy`` so that the parity tests compare two implementations.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from magcache import policy as P
from magcache.policy import BranchPolicy, Rules, Settings, nearest_interp, simulate, solve_thresh_for_speedup, split_branches
from magcache.presets import COMFYUI, MC_FLUX, MC_FRAMEPACK, MC_HUNYUAN, MC_WAN, get_preset

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Literal transcriptions of the reference loops
# --------------------------------------------------------------------------------------------------
def _np_nearest_interp(src_array, target_length):
    """The research code's / diffusers' ``nearest_interp``, verbatim."""
    src_array = np.asarray(src_array)
    src_length = len(src_array)
    if target_length == 1:
        return np.array([src_array[-1]])
    scale = (src_length - 1) / (target_length - 1)
    mapped_indices = np.round(np.arange(target_length) * scale).astype(int)
    return src_array[mapped_indices]


def _research_single_branch(mag_ratios, num_steps, thresh, retention, K, *, flux_guard=False, half_up=False,
                      framepack=False):
    """MagCache4FLUX / FLUX_Kontext (``half_up``, ``flux_guard``), MagCache4HunyuanVideo, MagCache4FramePack
    (``framepack``): one call per step, ``cnt`` = step, ``<=``."""
    mag = _np_nearest_interp(mag_ratios, num_steps) if len(mag_ratios) != num_steps else np.asarray(mag_ratios)
    acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
    computed = []
    for cnt in range(num_steps):
        boundary = int(retention * num_steps + 0.5) if half_up else int(retention * num_steps)
        eligible = cnt >= boundary and (cnt >= 1 if framepack else True)
        skip = False
        if eligible:
            cur = mag[cnt]
            acc_ratio = acc_ratio * cur
            acc_steps += 1
            acc_err += np.abs(1 - acc_ratio)
            ok = acc_err <= thresh and acc_steps <= K
            if flux_guard:
                ok = ok and np.round(cnt * ((28 - 1) / (num_steps - 1))).astype(int) != 11
            if framepack:
                ok = ok and np.abs(1 - cur) <= 0.06
            if ok:
                skip = True
            else:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0
        if not skip:
            computed.append(cnt)
    return computed


def _research_wan(mag_ratios, steps, thresh, retention, K):
    """MagCache4Wan2.1 ``magcache_forward``: one counter over 2N calls (cond, uncond), interleaved curve, ``<``."""
    mag = np.asarray(mag_ratios)
    if len(mag) != steps * 2:
        con = _np_nearest_interp(mag[0::2], steps)
        ucon = _np_nearest_interp(mag[1::2], steps)
        mag = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    num_steps = steps * 2
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    computed = {"cond": [], "uncond": []}
    for cnt in range(num_steps):
        b = cnt % 2
        skip = False
        if cnt >= int(num_steps * retention):
            acc_ratio[b] = acc_ratio[b] * mag[cnt]
            acc_steps[b] += 1
            acc_err[b] += np.abs(1 - acc_ratio[b])
            if acc_err[b] < thresh and acc_steps[b] <= K:
                skip = True
            else:
                acc_err[b], acc_steps[b], acc_ratio[b] = 0, 0, 1.0
        if not skip:
            computed["cond" if b == 0 else "uncond"].append(cnt // 2)
    return computed


def _comfyui_chroma(mag_ratios, total_steps, thresh, retention, K):
    """ComfyUI-MagCache ``magcache_chroma_forward`` with cond and uncond as separate calls: the curve is indexed by
    the call counter (so only the calibrated step count is meaningful), retention ``int(total*R)`` on steps, ``<``."""
    acc_err, acc_ratio, acc_steps = [0.0, 0.0], [1.0, 1.0], [0, 0]
    computed = {"cond": [], "uncond": []}
    cnt = 0
    for step in range(total_steps):
        enable = step >= int(total_steps * retention)
        for b in (0, 1):
            skip = False
            if enable:
                acc_ratio[cnt % 2] = acc_ratio[cnt % 2] * mag_ratios[cnt]
                acc_steps[cnt % 2] += 1
                acc_err[cnt % 2] += np.abs(1 - acc_ratio[cnt % 2])
                if acc_err[cnt % 2] < thresh and acc_steps[cnt % 2] <= K:
                    skip = True
                else:
                    acc_err[cnt % 2], acc_steps[cnt % 2], acc_ratio[cnt % 2] = 0, 0, 1.0
            if not skip:
                computed["cond" if b == 0 else "uncond"].append(step)
            cnt += 1
    return computed


def _raw(preset_id):
    """The published array (interleaved for CFG presets), as the reference code holds it."""
    p = get_preset(preset_id)
    if len(p.curves) == 1:
        return list(p.curves[0])
    return [v for pair in zip(*p.curves) for v in pair]


def _computed(preset_id, steps, **overrides):
    p = get_preset(preset_id)
    return simulate(p.curves, steps, p.settings(**overrides), p.rules, len(p.curves)).computed


# --------------------------------------------------------------------------------------------------
# nearest_interp and branch splitting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2, 3, 6, 20, 26, 28, 40, 50])
def test_nearest_interp_equals_reference_definition(length):
    src = [1.0 + i / 1000 for i in range(length)]
    for n in list(range(1, 80)) + [97, 100, 128]:
        assert nearest_interp(src, n) == list(_np_nearest_interp(src, n)), (length, n)


def test_nearest_interp_rounds_half_to_even_and_n_equal_one():
    # scale 2.5: index 1 maps to 2.5 -> 2 (banker's), not 3 (half-up); index 2 maps to 5
    assert nearest_interp([0, 1, 2, 3, 4, 5], 3) == [0.0, 2.0, 5.0]
    # scale 1.5: 1.5 -> 2, 3.0 -> 3
    assert nearest_interp([0, 1, 2, 3], 3) == [0.0, 2.0, 3.0]
    assert nearest_interp([7, 8, 9], 1) == [9.0]  # n == 1 returns the last value
    assert nearest_interp([7, 8, 9], 3) == [7.0, 8.0, 9.0]
    assert nearest_interp([7, 8], 4) == [7.0, 7.0, 8.0, 8.0]  # 1/3 -> 0, 2/3 -> 1
    with pytest.raises(ValueError):
        nearest_interp([1.0, 2.0], 0)
    with pytest.raises(ValueError):
        nearest_interp([], 3)


def test_split_branches_interleaved_and_plain():
    cond, uncond = split_branches([1.0, 1.1, 2.0, 2.1, 3.0, 3.1], interleaved=True)
    assert cond == [1.0, 2.0, 3.0] and uncond == [1.1, 2.1, 3.1]
    assert split_branches([1.0, 2.0, 3.0], interleaved=False) == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="even length"):
        split_branches([1.0, 1.0, 2.0], interleaved=True)


def test_interleaved_curves_are_resampled_per_branch_like_the_research_code_for_wan():
    raw = _raw("wan2.1_t2v_1.3B")
    for steps in (10, 25, 30, 50, 77):
        prepared = P.prepare_curves(get_preset("wan2.1_t2v_1.3B").curves, steps)
        expected_cond = list(_np_nearest_interp(np.asarray(raw)[0::2], steps))
        expected_uncond = list(_np_nearest_interp(np.asarray(raw)[1::2], steps))
        assert prepared == [expected_cond, expected_uncond]


def test_uncond_without_its_own_curve_uses_the_cond_curve():
    assert P.branch_curve([[1.0, 2.0]], 1) == [1.0, 2.0]
    assert P.branch_curve([[1.0, 2.0], [1.0, 3.0]], 1) == [1.0, 3.0]


# --------------------------------------------------------------------------------------------------
# Rule variants
# --------------------------------------------------------------------------------------------------
def _decisions(curve, steps, settings, rules, num_branches=1):
    return simulate([curve] if isinstance(curve[0], float) else curve, steps, settings, rules, num_branches).decisions


def test_compare_le_vs_lt_at_the_exact_boundary():
    # step 1: acc_ratio = 1.5, acc_err = 0.5 exactly == thresh
    settings = Settings(thresh=0.5, retention_ratio=0.5, K=1)
    le = _decisions([1.0, 1.5], 2, settings, Rules(compare="<="))["cond"]
    lt = _decisions([1.0, 1.5], 2, settings, Rules(compare="<"))["cond"]
    assert [d.skip for d in le] == [False, True]
    assert [d.skip for d in lt] == [False, False] and lt[1].reason == "error over thresh"
    assert le[1].acc_err == lt[1].acc_err == 0.5


@pytest.mark.parametrize(
    "steps, R, floor_boundary, half_up_boundary",
    [(28, 0.1, 2, 3), (25, 0.1, 2, 3), (20, 0.2, 4, 4), (26, 0.25, 6, 7), (50, 0.2, 10, 10), (100, 0.29, 28, 29),
     (10, 0.05, 0, 1)],
)
def test_retention_floor_vs_half_up(steps, R, floor_boundary, half_up_boundary):
    # flat curve, huge thresh and K: the first step that may be skipped is the retention boundary (or step 1 when
    # the boundary is 0, since step 0 has no residual to reuse)
    settings = Settings(thresh=10.0, retention_ratio=R, K=1000)
    for rounding, boundary in (("floor", floor_boundary), ("half_up", half_up_boundary)):
        ds = _decisions([1.0] * steps, steps, settings, Rules(retention_rounding=rounding))["cond"]
        first_skip = next(d.step for d in ds if d.skip)
        assert first_skip == max(boundary, 1), (rounding, steps, R)
        assert all(d.reason == "retention" for d in ds[:boundary])
    # 0.29 * 100 = 28.999999999999996 in float64: int() gives 28, exactly as the reference code
    assert P.retention_boundary(100, 0.29, "floor") == int(0.29 * 100) == 28


def test_wan_retention_counts_calls_over_interleaved_cfg():
    # the research code for Wan: call c = 2*step + branch is eligible once c >= int(2*N*R). N=26, R=0.25 -> 13 calls: cond from step 7
    # (call 14), uncond from step 6 (call 13). Per-step floor would give step 6 for both.
    settings = Settings(thresh=10.0, retention_ratio=0.25, K=1000)
    per_call = _decisions([[1.0] * 26, [1.0] * 26], 26, settings, MC_WAN, num_branches=2)
    assert next(d.step for d in per_call["cond"] if d.skip) == 7
    assert next(d.step for d in per_call["uncond"] if d.skip) == 6
    per_step = _decisions([[1.0] * 26, [1.0] * 26], 26, settings, COMFYUI, num_branches=2)
    assert next(d.step for d in per_step["cond"] if d.skip) == 6
    assert next(d.step for d in per_step["uncond"] if d.skip) == 6
    # without CFG (one branch) the per-call count is the per-step count
    single = _decisions([1.0] * 26, 26, settings, MC_WAN)["cond"]
    assert next(d.step for d in single if d.skip) == 6


def _guarded_steps(steps, rules=MC_FLUX):
    # flat curve, no retention, no thresh/K limit: only guarded steps (and step 0, no residual) are computed
    ds = _decisions([1.0] * steps, steps, Settings(thresh=10.0, retention_ratio=0.0, K=10_000), rules)["cond"]
    return [d.step for d in ds if d.reason == "guarded step"]


@pytest.mark.parametrize("steps, guarded", [(28, [11]), (20, [8]), (10, []), (46, [18, 19]), (55, [22]), (50, [20]),
                                            (12, []), (37, [15]), (30, [12]), (4, [])])
def test_flux_step_11_guard_maps_to_the_run_length(steps, guarded):
    expected = [i for i in range(steps) if np.round(i * ((28 - 1) / (steps - 1))).astype(int) == 11]
    # hand-checked; 37 steps: step 14 maps to 10.5, which rounds half-to-even to 10, so only 15 (11.25) is guarded
    assert expected == guarded
    assert _guarded_steps(steps) == guarded


def test_flux_guard_accumulates_then_resets_like_the_research_code():
    curve = [1.0] + [1.01] * 27
    ds = _decisions(curve, 28, Settings(thresh=10.0, retention_ratio=0.0, K=100), MC_FLUX)["cond"]
    d11 = ds[11]
    assert not d11.skip and d11.reason == "guarded step" and d11.acc_err > 0  # accumulated first
    assert ds[12].skip and math.isclose(ds[12].acc_err, 0.01, rel_tol=1e-9)  # reset after the guarded step


def test_comfyui_guard_leaves_the_accumulators_alone():
    rules = get_preset("flux_kontext_comfyui").rules
    assert rules.guard_accumulates is False and rules.compare == "<" and rules.step_mapping == "floor"
    curve = [1.0] + [1.01] * 19
    ds = _decisions(curve, 20, Settings(thresh=10.0, retention_ratio=0.0, K=100), rules)["cond"]
    assert not ds[11].skip and ds[11].reason == "guarded step"
    assert ds[12].skip and ds[12].acc_err > ds[10].acc_err  # accumulation carried over step 11


def test_framepack_first_step_and_ratio_jump_guards():
    # retention 0: the first step is still computed ("first step" guard), not just for lack of a residual
    ds = _decisions([1.0] * 10, 10, Settings(thresh=10.0, retention_ratio=0.0, K=100), MC_FRAMEPACK)["cond"]
    assert ds[0].reason == "first step" and all(d.skip for d in ds[1:])
    # |1 - ratio| > 0.06 forces a compute even under a huge threshold; 0.05 does not
    curve = [1.0, 1.0, 1.05, 1.0, 1.07, 1.0, 0.93, 1.0]
    ds = _decisions(curve, 8, Settings(thresh=10.0, retention_ratio=0.0, K=100), MC_FRAMEPACK)["cond"]
    assert [d.step for d in ds if not d.skip] == [0, 4, 6]
    assert ds[4].reason == ds[6].reason == "ratio jump"
    # other rule sets have no such guard
    ds = _decisions(curve, 8, Settings(thresh=10.0, retention_ratio=0.0, K=100), MC_HUNYUAN)["cond"]
    assert [d.step for d in ds if not d.skip] == [0]


@pytest.mark.parametrize("K, pattern", [(0, "##########"), (1, "#.#.#.#.#."), (2, "#..#..#..#"), (3, "#...#...#.")])
def test_K_limits_consecutive_skips(K, pattern):
    ds = _decisions([1.0] * 10, 10, Settings(thresh=10.0, retention_ratio=0.0, K=K), MC_HUNYUAN)["cond"]
    assert "".join("." if d.skip else "#" for d in ds) == pattern


def test_thresh_zero_turns_caching_off_by_default_only():
    curve = [1.0] * 10  # every step has zero error: even thresh 0 would skip with "<="
    off = _decisions(curve, 10, Settings(thresh=0.0, retention_ratio=0.0, K=5), MC_FLUX)["cond"]
    assert not any(d.skip for d in off) and {d.reason for d in off} == {"cache off"}
    raw_le = _decisions(curve, 10, Settings(thresh=0.0, retention_ratio=0.0, K=5, zero_thresh_disables=False), MC_FLUX)
    assert sum(d.skip for d in raw_le["cond"]) > 0  # the research code's "<=" at thresh 0
    raw_lt = _decisions(curve, 10, Settings(thresh=0.0, retention_ratio=0.0, K=5, zero_thresh_disables=False), COMFYUI)
    assert not any(d.skip for d in raw_lt["cond"])


def test_step_zero_is_never_skipped_without_a_residual():
    ds = _decisions([1.0] * 6, 6, Settings(thresh=1.0, retention_ratio=0.0, K=5), MC_HUNYUAN)["cond"]
    assert not ds[0].skip and ds[0].reason == "no residual yet"
    policy = BranchPolicy([1.0] * 6, Settings(thresh=1.0, retention_ratio=0.0, K=5), MC_HUNYUAN, 6)
    assert not policy.decide(0, has_residual=False).skip
    assert policy.decide(1, has_residual=True).skip


def test_our_options_protect_last_steps_window_and_sqrt():
    base = Settings(thresh=10.0, retention_ratio=0.0, K=100)
    ds = _decisions([1.0] * 10, 10, replace(base, protect_last_steps=2), MC_HUNYUAN)["cond"]
    assert [d.step for d in ds if not d.skip] == [0, 8, 9] and ds[9].reason == "last steps"
    ds = _decisions([1.0] * 10, 10, replace(base, start_step=3, end_step=-3), MC_HUNYUAN)["cond"]
    assert [d.step for d in ds if not d.skip] == [0, 1, 2, 8, 9]  # end_step -3 -> index 7 is the last eligible
    ds = _decisions([1.0] * 10, 10, replace(base, start_step=2, end_step=5), MC_HUNYUAN)["cond"]
    assert [d.step for d in ds if not d.skip] == [0, 1, 6, 7, 8, 9]
    # sqrt smoothing halves log-ratios: 1.21 -> 1.1
    ds = _decisions([1.0, 1.21], 2, replace(base, retention_ratio=0.5, sqrt_ratios=True), MC_HUNYUAN)["cond"]
    assert math.isclose(ds[1].ratio, 1.1) and math.isclose(ds[1].acc_err, 0.1)


def test_defaults_change_no_reference_schedule():
    s = Settings(thresh=0.1, retention_ratio=0.2, K=2)
    assert (s.protect_last_steps, s.sqrt_ratios, s.start_step, s.end_step) == (0, False, 0, -1)
    assert s.zero_thresh_disables  # only matters at thresh 0


# --------------------------------------------------------------------------------------------------
# Parity with the reference loops over many settings
# --------------------------------------------------------------------------------------------------
THRESHES = (0.01, 0.03, 0.06, 0.12, 0.24, 0.5)
KS = (1, 2, 4, 6)


@pytest.mark.parametrize("preset_id, step_counts, kw", [
    ("flux", (10, 20, 28, 30, 50), dict(flux_guard=True, half_up=True)),
    ("flux_kontext", (10, 20, 28, 40), dict(flux_guard=True, half_up=True)),
    ("hunyuan_video", (20, 30, 50, 60), {}),
    ("hunyuan_video_544p", (25, 50), {}),
    ("framepack", (10, 25, 30, 50), dict(framepack=True)),
    ("framepack_f1", (25, 40), dict(framepack=True)),
])
def test_single_branch_presets_match_the_research_loop(preset_id, step_counts, kw):
    p = get_preset(preset_id)
    for steps in step_counts:
        for thresh in THRESHES:
            for K in KS:
                for R in (0.1, 0.2, 0.3):
                    ours = simulate(p.curves, steps, Settings(thresh, R, K), p.rules).computed["cond"]
                    assert ours == _research_single_branch(_raw(preset_id), steps, thresh, R, K, **kw), (steps, thresh, K, R)


@pytest.mark.parametrize("preset_id", ["wan2.1_t2v_1.3B", "wan2.1_t2v_14B", "wan2.1_i2v_480p_14B",
                                       "wan2.1_i2v_720p_14B", "wan2.1_vace_1.3B", "wan2.1_vace_14B"])
def test_wan_presets_match_the_research_code_call_counter(preset_id):
    p = get_preset(preset_id)
    for steps in (10, 25, 26, 30, 40, 50):
        for thresh in THRESHES:
            for K in KS:
                for R in (0.1, 0.2, 0.25):
                    ours = simulate(p.curves, steps, Settings(thresh, R, K), p.rules, 2).computed
                    assert ours == _research_wan(_raw(preset_id), steps, thresh, R, K), (steps, thresh, K, R)


def test_chroma_matches_comfyui_at_its_calibrated_step_count():
    p = get_preset("chroma")
    for thresh in THRESHES:
        for K in KS:
            for R in (0.1, 0.2, 0.25, 0.3):
                ours = simulate(p.curves, 26, Settings(thresh, R, K), p.rules, 2).computed
                assert ours == _comfyui_chroma(_raw("chroma"), 26, thresh, R, K), (thresh, K, R)


# --------------------------------------------------------------------------------------------------
# Published defaults: the published step counts and hand-checked schedules
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset_id, steps, per_branch", [
    ("flux", 28, 9),
    ("flux_kontext", 28, 14),
    ("chroma", 26, 13),
    ("hunyuan_video", 50, 19),
    ("hunyuan_video_544p", 50, 18),
    ("wan2.1_t2v_1.3B", 50, 21),
    ("wan2.1_t2v_14B", 50, 18),
    ("wan2.1_i2v_480p_14B", 40, 15),
    ("wan2.1_i2v_720p_14B", 40, 14),
    ("wan2.1_vace_1.3B", 50, 29),
    ("framepack", 25, 12),
    ("framepack_f1", 25, 12),
])
def test_reference_default_counts(preset_id, steps, per_branch):
    p = get_preset(preset_id)
    computed = _computed(preset_id, steps)
    assert set(computed) == ({"cond", "uncond"} if len(p.curves) == 2 else {"cond"})
    assert all(len(v) == per_branch for v in computed.values()), computed


def test_wan_1_3B_at_the_community_setting():
    computed = _computed("wan2.1_t2v_1.3B", 50, thresh=0.02, K=3)
    assert len(computed["cond"]) == len(computed["uncond"]) == 33


def test_flux_28_steps_exact_schedule_and_errors():
    # Hand-checked (thresh 0.24, R 0.1 -> 3 retained steps, K 5, step 11 guarded):
    # step 3: ratio 1.07812 -> err 0.07812 skip; step 4: acc 1.07812*1.0625 = 1.14550, err 0.22362 skip;
    # step 5: acc 1.19025, err 0.41387 > 0.24 compute; ... step 11 is the guarded step; step 17 is the 6th
    # consecutive candidate (K=5) and is computed; step 26 ratio 0.93359 pushes err to 0.24972 > 0.24.
    p = get_preset("flux")
    sched = simulate(p.curves, 28, p.settings(), p.rules)
    assert sched.computed == {"cond": [0, 1, 2, 5, 9, 11, 17, 23, 26]}
    ds = sched.decisions["cond"]
    assert [round(ds[i].acc_err, 5) for i in (3, 4, 5)] == [0.07812, 0.22362, 0.41387]
    assert [ds[i].reason for i in (5, 11, 17, 26)] == ["error over thresh", "guarded step", "K reached",
                                                      "error over thresh"]
    assert ds[27].skip  # no reference protects the last step
    assert round(sched.predicted_speedup(), 4) == round(28 / 9, 4)


def test_chroma_26_steps_exact_schedule():
    # Hand-checked (thresh 0.10 with "<", R 0.25 -> int(6.5) = 6 retained steps, K 2): step 7: acc 1.03906^2 =
    # 1.07965, err 0.03906 + 0.07965 = 0.11871 >= 0.10 compute; step 10: err 0.15376 compute; 13/16/19 hit K=2;
    # 22 and 24 exceed thresh. Both branches take the same steps (their curves differ only at step 1).
    sched = simulate(get_preset("chroma").curves, 26, get_preset("chroma").settings(), get_preset("chroma").rules, 2)
    expected = [0, 1, 2, 3, 4, 5, 7, 10, 13, 16, 19, 22, 24]
    assert sched.computed == {"cond": expected, "uncond": expected}
    assert round(sched.decisions["cond"][7].acc_err, 5) == 0.11871


def test_preset_rule_sets_follow_their_reference():
    assert get_preset("flux").rules == MC_FLUX and get_preset("flux_kontext").rules == MC_FLUX
    assert get_preset("chroma").rules == COMFYUI
    assert get_preset("hunyuan_video").rules == MC_HUNYUAN
    assert get_preset("wan2.1_t2v_1.3B").rules == MC_WAN and get_preset("wan2.1_vace_1.3B").rules == MC_WAN
    assert get_preset("framepack").rules == MC_FRAMEPACK
    assert MC_FLUX.compare == "<=" and MC_FLUX.retention_rounding == "half_up" and MC_FLUX.guarded_steps == (11,)
    assert MC_WAN.compare == "<" and MC_WAN.retention_per_call
    assert MC_FRAMEPACK.first_step_computed and MC_FRAMEPACK.max_ratio_jump == 0.06
    assert COMFYUI.compare == "<" and COMFYUI.retention_rounding == "floor"


# --------------------------------------------------------------------------------------------------
# Threshold search
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset_id", ["flux", "flux_kontext", "chroma", "hunyuan_video", "wan2.1_t2v_1.3B",
                                       "framepack"])
@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_solve_thresh_hits_the_target_within_one_step(preset_id, target):
    p = get_preset(preset_id)
    steps, branches = p.calibrated_steps, len(p.curves)
    settings, sched, _ = solve_thresh_for_speedup(p.curves, steps, target, p.settings(), p.rules, branches)
    assert sched.computed == simulate(p.curves, steps, settings, p.rules, branches).computed
    fastest = simulate(p.curves, steps, replace(settings, thresh=1e6), p.rules, branches).predicted_speedup()
    if fastest < target:  # unreachable with this K and retention: the fastest schedule is returned
        assert sched.predicted_speedup() == fastest
        return
    assert sched.predicted_speedup() >= target
    per_branch = len(sched.computed["cond"])
    assert per_branch >= math.floor(steps / target) - 1  # not more than one step faster than needed
    below = simulate(p.curves, steps, replace(settings, thresh=max(0.0, settings.thresh - 2e-4)), p.rules, branches)
    assert below.predicted_speedup() < target  # the smallest threshold (to 4 decimals) that reaches the target


def test_solve_thresh_can_search_K():
    p = get_preset("chroma")  # K=2 cannot reach 2.5x at 26 steps
    settings, sched, _ = solve_thresh_for_speedup(p.curves, 26, 2.5, p.settings(), p.rules, 2, K_candidates=[2, 3, 4])
    assert settings.K in (3, 4) and sched.predicted_speedup() >= 2.5
    with pytest.raises(ValueError, match="speed-up"):
        solve_thresh_for_speedup(p.curves, 26, float("nan"), p.settings(), p.rules)


# --------------------------------------------------------------------------------------------------
# Validation and purity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(thresh=float("nan"), retention_ratio=0.2, K=2), "thresh must be a finite number"),
    (dict(thresh=float("inf"), retention_ratio=0.2, K=2), "thresh must be a finite number"),
    (dict(thresh=-0.1, retention_ratio=0.2, K=2), "thresh must be >= 0"),
    (dict(thresh="0.1", retention_ratio=0.2, K=2), "thresh must be a finite number"),
    (dict(thresh=True, retention_ratio=0.2, K=2), "thresh must be a finite number"),
    (dict(thresh=0.1, retention_ratio=float("nan"), K=2), "retention_ratio must be a finite number"),
    (dict(thresh=0.1, retention_ratio=1.5, K=2), "retention_ratio must be between 0 and 1"),
    (dict(thresh=0.1, retention_ratio=-0.1, K=2), "retention_ratio must be between 0 and 1"),
    (dict(thresh=0.1, retention_ratio=0.2, K=2.0), "K must be an integer"),
    (dict(thresh=0.1, retention_ratio=0.2, K=-1), "K must be an integer >= 0"),
    (dict(thresh=0.1, retention_ratio=0.2, K=True), "K must be an integer"),
    (dict(thresh=0.1, retention_ratio=0.2, K=2, protect_last_steps=-1), "protect_last_steps"),
    (dict(thresh=0.1, retention_ratio=0.2, K=2, start_step=-2), "start_step"),
])
def test_invalid_settings_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_invalid_rules_and_curves_give_clear_errors():
    with pytest.raises(ValueError, match="compare"):
        Rules(compare="<<")
    with pytest.raises(ValueError, match="retention_rounding"):
        Rules(retention_rounding="ceil")
    with pytest.raises(ValueError, match="step_mapping"):
        Rules(step_mapping="linear")
    with pytest.raises(ValueError, match="entries for"):
        BranchPolicy([1.0, 1.0], Settings(0.1, 0.2, 2), MC_FLUX, num_steps=3)
    with pytest.raises(IndexError):
        BranchPolicy([1.0, 1.0], Settings(0.1, 0.2, 2), MC_FLUX, num_steps=2).decide(2, True)
    with pytest.raises(ValueError, match="non-negative"):
        P.prepare_curves([[1.0, -1.0]], 2, sqrt=True)
    with pytest.raises(ValueError, match="num_branches"):
        simulate([[1.0, 1.0]], 2, Settings(0.1, 0.2, 2), MC_FLUX, num_branches=0)


def test_policy_module_is_pure_python():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('policy_alone', {str(ROOT / 'magcache' / 'policy.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['policy_alone'] = m; spec.loader.exec_module(m)\n"
        "assert m.simulate([[1.0, 1.1]], 4, m.Settings(0.1, 0.2, 2), m.Rules()).num_steps == 4\n"
        "bad = [n for n in ('torch', 'numpy', 'diffusers', 'gradio') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_solve_thresh_is_exact_where_rounding_or_bisection_would_miss():
    # Chroma K=3 at 2x: the accumulated error sits exactly on a 4-decimal value and Chroma compares with "<";
    # a bisection that rounds to 4 digits returned 0.0625, which gives only 1.86x.
    p = get_preset("chroma")
    settings, sched, _ = solve_thresh_for_speedup(p.curves, 26, 2.0, p.settings(K=3), p.rules, 2)
    assert sched.predicted_speedup() >= 2.0
    assert simulate(p.curves, 26, settings, p.rules, 2).computed == sched.computed
