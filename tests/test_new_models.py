"""Newer models: Wan2.2 (T2V-A14B, I2V-A14B, TI2V-5B), Qwen-Image (+Edit, + the ComfyUI curve), HunyuanVideo-1.5,
and the calibrate-first families FLUX.2 and Z-Image.

The schedule tests compare our pure policy with straight transcriptions of the reference implementations'
per-call loops (written here independently of ``magcache.policy``: call counters, slots, float32 where ComfyUI uses
it), over a grid of step counts and settings, and with the schedules the research notes list at the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magcache import policy as P
from magcache.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]

# Computed steps at the reference defaults and native step counts: (cond, uncond); None = same as cond.
_T2V = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 18, 21, 24, 26, 27, 28, 29, 30, 31, 33, 35, 37, 38, 39]
_TI2V = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 38, 40, 42, 44, 46, 48]
EXPECTED_AT_DEFAULTS = {
    "wan2.2_t2v_14B": (40, (0.06, 0.4, 2), _T2V, None),
    "wan2.2_i2v_14B": (40, (0.06, 0.1, 2),
                       list(range(18)) + [20, 23, 26, 28, 30, 32, 34, 35, 36, 37, 38, 39],
                       list(range(17)) + [19, 22, 25, 28, 30, 32, 34, 35, 36, 37, 38, 39]),
    "wan2.2_ti2v_5B": (50, (0.06, 0.2, 2), _TI2V, None),
    "wan2.2_ti2v_5B_i2v": (50, (0.06, 0.2, 2), sorted(_TI2V + [47]), None),
    "qwen_image": (50, (0.06, 0.2, 2),
                   list(range(16)) + [17, 18, 19, 21, 23, 25, 27, 29, 31, 34, 37, 39, 41, 42, 43, 44, 45, 46, 47, 48, 49],
                   None),
    "qwen_image_edit": (50, (0.06, 0.2, 2),
                        list(range(13)) + [14, 16, 18, 20, 22, 24, 26, 29, 32, 35, 37, 39] + list(range(40, 50)), None),
    "qwen_image_comfyui": (40, (0.1, 0.2, 2),
                           list(range(10)) + [11, 13, 14, 16, 18, 20, 22, 24, 26, 28, 31, 34, 35, 36, 37, 38, 39],
                           list(range(11)) + [12, 14, 15, 17, 19, 21, 23, 25, 27, 29, 32, 35, 36, 37, 38, 39]),
    "hunyuan_video1.5": (20, (0.03, 0.25, 2), [0, 1, 2, 3, 4, 7, 10, 13, 15, 17, 18, 19], None),
    "hunyuan_video1.5_40steps": (40, (0.06, 0.2, 2),
                                 [0, 1, 2, 3, 4, 5, 6, 7, 10, 13, 16, 19, 22, 25, 28, 31, 33, 35, 37, 38, 39], None),
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magcache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _policy_schedule(pid: str, n: int, thresh: float, R: float, K: int, split: int | None = None) -> P.Schedule:
    p = get_preset(pid)
    split = p.split_step(n) if split is None else split
    return P.simulate(p.curves_for(n), n, p.settings(thresh=thresh, retention_ratio=R, K=K), p.rules, 2, split)


# --------------------------------------------------------------------------------------------------
# Straight transcriptions of the reference loops (one call at a time), independent of magcache.policy
# --------------------------------------------------------------------------------------------------
class Crash(Exception):
    """Where the reference implementation raises (a skip without a residual, an index past the curve)."""


def _interleaved(pid: str, n: int | None = None) -> list[float]:
    p = get_preset(pid)
    curves = p.curves_for(n) if n is not None else p.curves
    return [v for pair in zip(*curves) for v in pair]


def _research_resample(curve: list[float], n: int, single: str) -> list[float]:
    """Per-branch nearest resampling of the research code: halves resampled separately, re-interleaved."""
    out = []
    halves = [curve[0::2], curve[1::2]]
    for half in halves:
        if n == 1:
            out.append([half[-1] if single == "last" else half[0]])
        else:
            idx = np.round(np.linspace(0, len(half) - 1, n)).astype(int)
            out.append([half[i] for i in idx])
    return [v for pair in zip(*out) for v in pair]


def research_loop(pid: str, n: int, thresh: float, R: float, K: int, mode: str, split_steps: int = 0) -> dict:
    """The research Wan2.2 / Qwen-Image forward: one call counter over 2N calls (cond, uncond), slot = call % 2."""
    ratios = _research_resample(_interleaved(pid), n, "first" if mode == "qwen" else "last")
    total, split = 2 * n, 2 * split_steps
    acc_ratio, acc_steps, acc_err, residual = [1.0, 1.0], [0, 0], [0.0, 0.0], [None, None]
    computed = {"cond": [], "uncond": []}
    for call in range(total):
        b, step = call % 2, call // 2
        if mode == "t2v":
            protected = call < int(split * R) or split <= call <= (total - split) * R + split
        elif mode == "i2v":
            protected = call < int(split + (total - split) * R)
        else:
            protected = call < int(total * R)
        skip = False
        if not protected:
            acc_ratio[b] *= ratios[call]
            acc_steps[b] += 1
            acc_err[b] += abs(1 - acc_ratio[b])
            if acc_err[b] < thresh and acc_steps[b] <= K:
                if residual[b] is None:
                    raise Crash(f"skip without residual at call {call}")
                skip = True
            else:
                acc_ratio[b], acc_steps[b], acc_err[b] = 1.0, 0, 0.0
        if not skip:
            residual[b] = call
            computed[("cond", "uncond")[b]].append(step)
    return computed


def comfyui_loop(pid: str, n: int, thresh: float, R: float, K: int, end_step: int) -> dict:
    """ComfyUI-MagCache with separate calls, uncond first: the step-0 reset on every call, one call counter, two
    slots by counter parity, float32 accumulation. Qwen-Image indexes its curve by the raw counter; HunyuanVideo-1.5
    by 2 * floor-mapped step + parity, and switches to the 40-step curve above 20 steps."""
    qwen = pid.startswith("qwen")
    curve = np.asarray(_interleaved(pid, n), dtype=np.float32)
    length = len(curve) // 2
    f32 = np.float32
    thresh32 = f32(thresh)
    end = end_step if end_step >= 0 else n + end_step
    computed = {"cond": [], "uncond": []}
    cnt = 0
    for step in range(n):
        for branch in ("uncond", "cond"):
            if step == 0:
                cnt = 0
                acc_ratio, acc_steps, acc_err = [f32(1.0)] * 2, [0, 0], [f32(0.0)] * 2
                residual = [None, None]
            slot = cnt % 2
            eligible = step >= int(n * R) and 0 <= step <= end
            skip = False
            if eligible:
                if qwen:
                    index = cnt
                else:
                    cur = step if n == length else int(step * ((length - 1) / (n - 1)))
                    index = 2 * cur + slot
                if index >= len(curve):
                    raise Crash("index past the curve")
                acc_ratio[slot] = f32(acc_ratio[slot] * curve[index])
                acc_steps[slot] += 1
                acc_err[slot] = f32(acc_err[slot] + f32(abs(f32(1.0) - acc_ratio[slot])))
                if acc_err[slot] < thresh32 and acc_steps[slot] <= K:
                    if residual[slot] is None:
                        raise Crash(f"skip without residual at step {step} ({branch})")
                    skip = True
                else:
                    acc_ratio[slot], acc_steps[slot], acc_err[slot] = f32(1.0), 0, f32(0.0)
            if not skip:
                residual[slot] = (step, branch)
                computed[branch].append(step)
            cnt += 1
    return computed


RESEARCH_MODES = {"wan2.2_t2v_14B": "t2v", "wan2.2_i2v_14B": "i2v", "wan2.2_ti2v_5B": "plain",
                  "wan2.2_ti2v_5B_i2v": "plain", "qwen_image": "qwen", "qwen_image_edit": "qwen"}
COMFYUI_PRESETS = ("qwen_image_comfyui", "hunyuan_video1.5", "hunyuan_video1.5_40steps")
GRID = [(thresh, R, K) for thresh in (0.03, 0.06, 0.12, 0.3) for R in (0.0, 0.1, 0.2, 0.25, 0.4) for K in (1, 2, 4)]


def _assert_matches_or_falls_back(schedule: P.Schedule, reference) -> str:
    try:
        expected = reference()
    except Crash:
        reasons = [d.reason for ds in schedule.decisions.values() for d in ds]
        assert P.NO_RESIDUAL in reasons, "where the reference crashes we compute, and say so"
        return "crash"
    assert schedule.computed == expected
    return "same"


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pid", sorted(EXPECTED_AT_DEFAULTS))
def test_cli_reproduces_the_reference_schedules_at_the_defaults(pid):
    n, defaults, cond, uncond = EXPECTED_AT_DEFAULTS[pid]
    proc = _cli("schedule", "--preset", pid, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["steps"], (out["thresh"], out["retention_ratio"], out["K"])) == (n, defaults)
    assert out["computed"] == {"cond": cond, "uncond": cond if uncond is None else uncond}
    p = get_preset(pid)
    assert out["computed"] == _policy_schedule(pid, n, *defaults).computed
    assert out["notes"] == [] or pid.startswith("wan2.2_") and out["notes"][0].startswith("expert switch")


@pytest.mark.parametrize("pid", sorted(RESEARCH_MODES))
def test_research_code_presets_follow_the_reference_loop_at_any_step_count(pid):
    outcomes = set()
    for n in (1, 2, 7, 20, 25, 30, 40, 50, 63):
        split = get_preset(pid).split_step(n) or 0
        for thresh, R, K in GRID:
            schedule = _policy_schedule(pid, n, thresh, R, K)
            outcomes.add(_assert_matches_or_falls_back(
                schedule, lambda: research_loop(pid, n, thresh, R, K, RESEARCH_MODES[pid], split)))
    assert "same" in outcomes


@pytest.mark.parametrize("pid", COMFYUI_PRESETS)
def test_comfyui_presets_follow_the_reference_loop_at_any_step_count(pid):
    outcomes = set()
    end_step = get_preset(pid).settings().end_step
    for n in (1, 2, 7, 16, 20, 21, 30, 40):
        for thresh, R, K in GRID:
            schedule = _policy_schedule(pid, n, thresh, R, K)
            outcomes.add(_assert_matches_or_falls_back(schedule, lambda: comfyui_loop(pid, n, thresh, R, K, end_step)))
    assert "same" in outcomes and "crash" in outcomes


def test_comfyui_presets_match_on_a_fine_threshold_grid():
    """Float32 accumulation and comparison, as ComfyUI-MagCache does, decision for decision."""
    for pid in COMFYUI_PRESETS:
        n = get_preset(pid).calibrated_steps
        end_step = get_preset(pid).settings().end_step
        for thresh in np.round(np.arange(0.005, 0.3, 0.0025), 6):
            ours = _policy_schedule(pid, n, float(thresh), 0.2, 3).computed
            assert ours == comfyui_loop(pid, n, float(thresh), 0.2, 3, end_step), (pid, thresh)


def test_comfyui_qwen_past_its_curve_is_refused_with_the_reason():
    proc = _cli("schedule", "--preset", "qwen_image_comfyui", "--steps", "41", "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "IndexError" in proc.stderr and "refused" in proc.stderr
    with pytest.raises(Crash):
        comfyui_loop("qwen_image_comfyui", 41, 0.1, 0.2, 2, -1)
    # shorter runs read the first entries of the curve, unresampled
    p = get_preset("qwen_image_comfyui")
    d = _policy_schedule("qwen_image_comfyui", 10, 0.1, 0.2, 2).decisions
    assert [x.ratio for x in d["cond"]] == [float(np.float32(v)) for v in p.curves[0][:10]]
    assert [x.ratio for x in d["uncond"]] == [float(np.float32(v)) for v in [p.curves[0][0]] + list(p.curves[1][:9])]


def test_skips_before_a_residual_are_computed_and_reported():
    proc = _cli("schedule", "--preset", "qwen_image", "--steps", "10", "--retention", "0", "--json")
    out = json.loads(proc.stdout)
    assert out["reasons"]["cond"][0] == P.NO_RESIDUAL and 0 in out["computed"]["cond"]
    assert any("fails there" in note for note in out["notes"])
    with pytest.raises(Crash):
        research_loop("qwen_image", 10, 0.06, 0.0, 2, "qwen")
    # ComfyUI wipes the uncond residual of step 0: a skip due at step 1 is computed
    sched = _policy_schedule("hunyuan_video1.5", 20, 0.1, 0.05, 2)
    assert sched.decisions["uncond"][1].reason == P.NO_RESIDUAL and sched.decisions["cond"][1].skip
    one = json.loads(_cli("schedule", "--preset", "hunyuan_video1.5", "--steps", "1", "--json").stdout)
    assert any("divides by zero" in note for note in one["notes"])


def test_hunyuan_video15_switches_to_the_40_step_curve_above_20_steps():
    p = get_preset("hunyuan_video1.5")
    assert p.curves_for(20) == p.curves and p.curves_for(21) == get_preset("hunyuan_video1.5_40steps").curves
    out = json.loads(_cli("schedule", "--preset", "hunyuan_video1.5", "--steps", "30", "--json").stdout)
    assert any("40-step curve" in note for note in out["notes"])
    assert p.settings().end_step == -2 and get_preset("qwen_image_comfyui").settings().end_step == -1


# --------------------------------------------------------------------------------------------------
# Wan2.2 A14B: the expert split
# --------------------------------------------------------------------------------------------------
def _research_grid_split(n: int, shift: float, boundary: float) -> int:
    """How the research script counts high-noise steps: its own grid linspace(1.0, 0.01, N + 1)[:-1]."""
    sigmas = np.linspace(1.0, 0.01, n + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return int(np.sum((sigmas * 1000).astype(np.int64) >= 1000 * boundary))


def test_reference_sampler_timesteps_equal_diffusers_unipc():
    from diffusers import UniPCMultistepScheduler

    for shift in (12.0, 5.0, 3.0):
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        for n in range(1, 80):
            sched.set_timesteps(n)
            assert P.flow_unipc_timesteps(n, shift) == sched.timesteps.tolist()


def test_expert_split_follows_the_sampler_not_the_research_grid():
    t2v, i2v = get_preset("wan2.2_t2v_14B"), get_preset("wan2.2_i2v_14B")
    assert (t2v.split_step(40), i2v.split_step(40), t2v.split_step(20), i2v.split_step(20)) == (26, 15, 13, 8)
    # the research script's grid agrees at 20 and 40 steps, and is one step off at 30 (T2V) and 50 (I2V)
    assert _research_grid_split(30, 12.0, 0.875) == 20 and t2v.split_step(30) == 19
    assert _research_grid_split(50, 5.0, 0.900) == 19 and i2v.split_step(50) == 18
    out = json.loads(_cli("schedule", "--preset", "wan2.2_t2v_14B", "--steps", "30", "--split-step", "20",
                          "--json").stdout)
    assert out["split_step"] == 20
    assert out["computed"] == research_loop("wan2.2_t2v_14B", 30, 0.06, 0.4, 2, "t2v", 20)


def test_wan22_t2v_protects_the_start_of_each_expert_phase():
    sched = _policy_schedule("wan2.2_t2v_14B", 40, 100.0, 0.4, 100)  # large thresh/K: only retention computes
    assert sched.computed["cond"] == list(range(10)) + list(range(26, 32))
    assert sched.computed["uncond"] == list(range(10)) + list(range(26, 32))
    # without a pipeline the switch is the reference sampler's; rules without one need it spelled out
    p = get_preset("wan2.2_t2v_14B")
    assert P.simulate(p.curves, 40, p.settings(), p.rules, 2).computed == {"cond": _T2V, "uncond": _T2V}
    with pytest.raises(ValueError, match="split_step"):
        P.simulate(p.curves, 40, p.settings(), dataclasses.replace(p.rules, expert_boundary=None), 2)


def test_calibrate_first_presets_refuse_a_schedule_with_a_clear_message():
    for pid in ("flux2", "flux2_klein", "z_image"):
        proc = _cli("schedule", "--preset", pid, "--json")
        assert proc.returncode == 2 and "no published ratio curve" in proc.stderr and "calibrate" in proc.stderr
        assert get_preset(pid).calibrate_first
