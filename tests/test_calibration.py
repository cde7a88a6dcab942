"""Calibration store: calibrate -> save -> a new run picks it (exact / nearest + resampled), hostile files, CLI."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import magcache
from magcache import policy as P
from magcache.calibration import Calibration, CalibrationStore, Resolution, default_store_dir, read_calibration_file
from magcache.curves import apply_best, choose_curves, rules_for_calibration, run_key
from magcache.jsonfile import MAX_FILE_BYTES
from magcache.measure import calibrate
from magcache.presets import get_preset
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny:flux"
STEPS = 6


@pytest.fixture(scope="module")
def flux_pipe():
    return build_tiny_pipeline("flux")


@pytest.fixture(scope="module")
def flux_cal(flux_pipe):
    """One real calibration of the tiny FLUX pipeline (6 steps, 32x32), shared by the tests of this module."""
    return calibrate(flux_pipe, tiny_call_kwargs("flux", STEPS), model=MODEL)


def synthetic(num_steps, *, model=MODEL, scheduler="FlowMatchEulerDiscreteScheduler shift=1", res=(32, 32), cfg=False,
              base=0.97, created="2026-01-01T00:00:00Z"):
    curve = [1.0] + [base + 0.001 * i for i in range(num_steps - 1)]
    branches = {"cond": {"mag_ratios": curve, "mag_std": [0.0] * num_steps, "cos_dis": [0.0] * num_steps}}
    if cfg:
        branches["uncond"] = {"mag_ratios": [v * 0.99 for v in curve], "mag_std": [0.0] * num_steps,
                              "cos_dis": [0.0] * num_steps}
    return Calibration(model, "flux", num_steps, Resolution(*res), scheduler, branches, created, "synthetic")


def test_calibrate_records_per_branch_curves_and_leaves_the_pipeline_clean(flux_pipe, flux_cal):
    c = flux_cal
    assert (c.model, c.preset, c.num_steps, c.cfg) == (MODEL, "flux", STEPS, False)
    assert c.resolution == Resolution(32, 32, 1)
    assert c.scheduler == "FlowMatchEulerDiscreteScheduler shift=1"
    curves = c.branches["cond"]
    assert all(len(curves[k]) == STEPS for k in ("mag_ratios", "mag_std", "cos_dis"))
    assert curves["mag_ratios"][0] == 1.0 and all(v > 0 for v in curves["mag_ratios"])
    assert len(set(curves["mag_ratios"][1:])) > 1  # measured, not padding
    assert magcache.get_handle(flux_pipe) is None  # the handle applied for the run was removed


def test_round_trip_calibrate_save_then_a_new_run_uses_the_stored_curve(flux_pipe, flux_cal, tmp_path):
    store = CalibrationStore(tmp_path)
    saved = store.save(flux_cal)
    assert (tmp_path / f"{saved.id}.json").is_file()
    on_disk = store.load(saved.id)
    assert on_disk.curves == flux_cal.curves

    # a threshold at which the stored curve skips something and the preset curve gives another schedule, so the
    # test can tell which curve the runtime used
    preset = get_preset("flux")
    cal_rules = rules_for_calibration(preset.rules)

    def schedule(curves, rules, t):
        return P.simulate(curves, STEPS, preset.settings(thresh=t, retention_ratio=0.0, K=3), rules)

    thresh = next(t for t in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.5)
                  if schedule(on_disk.curves, cal_rules, t).skipped["cond"]
                  and schedule(on_disk.curves, cal_rules, t).computed != schedule(preset.curves, preset.rules, t).computed)

    kwargs = tiny_call_kwargs("flux", STEPS)
    handle, choice = apply_best(flux_pipe, kwargs, store=store, model=MODEL, thresh=thresh, retention_ratio=0.0, K=3)
    try:
        assert choice.how == "exact" and choice.calibration.id == saved.id
        assert saved.id in choice.label
        assert handle.curves == on_disk.curves and handle.rules == cal_rules
        flux_pipe(**kwargs)
        expected = P.simulate(on_disk.curves, STEPS, handle.settings, cal_rules)
        assert handle.last_run.computed == expected.computed
        assert handle.last_run.skipped["cond"], "these settings should skip something"

        # calibrating again through the attached handle: same curve (same seed), handle left as it was
        again = calibrate(flux_pipe, tiny_call_kwargs("flux", STEPS), model=MODEL)
        assert magcache.get_handle(flux_pipe) is handle
        assert handle.enabled and not handle.calibrate and handle.settings.thresh == thresh
        assert again.curves == flux_cal.curves
    finally:
        handle.remove()


def test_changed_step_count_picks_the_nearest_calibration_and_resamples(flux_pipe, flux_cal, tmp_path):
    store = CalibrationStore(tmp_path)
    near = store.save(flux_cal)  # 6 steps, same scheduler
    store.save(synthetic(20))  # same scheduler, farther in steps
    store.save(synthetic(9, scheduler="UniPCMultistepScheduler flow_shift=3"))  # closer steps, other scheduler
    store.save(synthetic(8, model="another-model"))  # exact steps, wrong model

    steps = 9
    cal, how = store.best_match(MODEL, steps, (32, 32), flux_cal.scheduler, cfg=False)
    assert cal.id == near.id
    assert how == "nearest (resampled from 6 steps)"

    kwargs = tiny_call_kwargs("flux", steps)
    handle, choice = apply_best(flux_pipe, kwargs, store=store, model=MODEL, thresh=0.3, retention_ratio=0.0, K=2)
    try:
        assert choice.calibration.id == near.id and choice.how.startswith("nearest (resampled from 6 steps")
        flux_pipe(**kwargs)
        resampled = P.nearest_interp(flux_cal.curves[0], steps)
        assert flux_cal.resampled(steps) == [resampled]
        expected = P.simulate([resampled], steps, handle.settings, choice.rules)
        assert handle.last_run.computed == expected.computed
    finally:
        handle.remove()


def test_best_match_ranking_and_fallback_to_the_preset(tmp_path):
    store = CalibrationStore(tmp_path)
    assert tuple(store.best_match(MODEL, 28, (1024, 1024))) == (None, None)
    choice = choose_curves("flux", MODEL, 28, (1024, 1024), store=store)
    assert choice.calibration is None and choice.curves == [list(get_preset("flux").curves[0])]
    assert "preset 'flux'" in choice.label

    old = store.save(synthetic(28, res=(1024, 1024), created="2025-01-01T00:00:00Z"))
    new = store.save(synthetic(28, res=(1024, 1024), created="2026-06-01T00:00:00Z", base=0.96))
    store.save(synthetic(28, res=(512, 512)))
    store.save(synthetic(28, res=(1024, 1024), cfg=True))
    cal, how = store.best_match(MODEL, 28, (1000, 1030), "FlowMatchEulerDiscreteScheduler shift=1", cfg=False)
    assert (cal.id, how) == (new.id, "exact")  # same 64-px bucket; newest of two exact matches
    assert old.id != new.id
    cal, how = store.best_match(MODEL, 28, (768, 768), "FlowMatchEulerDiscreteScheduler shift=1", cfg=False)
    assert cal.resolution == Resolution(512, 512) or cal.resolution == Resolution(1024, 1024)
    assert how.startswith("nearest (calibrated at")
    cal, how = store.best_match(MODEL, 28, (1024, 1024), "FlowMatchEulerDiscreteScheduler shift=1", cfg=True)
    assert cal.cfg and how == "exact"
    # a CFG calibration used without CFG gives its cond curve only
    choice = choose_curves("flux", MODEL, 28, (1024, 1024), "FlowMatchEulerDiscreteScheduler shift=1", False, store)
    assert len(choice.curves) == 1


def test_run_key_describes_a_call(flux_pipe):
    key = run_key(flux_pipe, tiny_call_kwargs("flux", 7), model=MODEL)
    assert (key.num_steps, key.resolution, key.cfg) == (7, Resolution(32, 32, 1), False)
    wan = build_tiny_pipeline("wan_t2v")
    key = run_key(wan, tiny_call_kwargs("wan_t2v", 5))
    assert key.cfg and key.resolution == Resolution(16, 16, 9) and key.scheduler.startswith("UniPCMultistepScheduler")
    assert run_key(wan, {**tiny_call_kwargs("wan_t2v", 5), "guidance_scale": 1.0}).cfg is False


# --------------------------------------------------------------------------------------------------
# Hostile and corrupt files
# --------------------------------------------------------------------------------------------------
def _valid_dict():
    d = synthetic(4).to_dict()
    d["id"] = ""
    return d


def _mutated(change):
    d = _valid_dict()
    change(d)
    return json.dumps(d)


BAD_FILES = {
    "not json": "{ this is not json",
    "not an object": "[1, 2, 3]",
    "wrong format tag": _mutated(lambda d: d.update(format="something else")),
    "NaN ratio": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, float("nan"), 1.0, 1.0])),
    "Infinity ratio": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, float("inf"), 1.0, 1.0])),
    "negative ratio": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, -0.9, 1.0, 1.0])),
    "zero ratio": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, 0.0, 1.0, 1.0])),
    "string ratio": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, "0.9", 1.0, 1.0])),
    "wrong length": _mutated(lambda d: d["branches"]["cond"].update(mag_ratios=[1.0, 0.9, 1.0])),
    "std length": _mutated(lambda d: d["branches"]["cond"].update(mag_std=[0.0])),
    "cfg without uncond": _mutated(lambda d: d.update(cfg=True)),
    "traversal id": _mutated(lambda d: d.update(id="../../x")),
    "absolute id": _mutated(lambda d: d.update(id="/tmp/evil")),
    "traversal model": _mutated(lambda d: d.update(model="../../x")),
    "control chars": _mutated(lambda d: d.update(model="flux\n\x1b[31m")),
    "unknown preset": _mutated(lambda d: d.update(preset="no-such-preset")),
    "unknown field": _mutated(lambda d: d.update(exec="rm -rf /")),
    "unknown branch": _mutated(lambda d: d["branches"].update(other=d["branches"]["cond"])),
    "bool steps": _mutated(lambda d: d.update(num_steps=True)),
    "huge steps": _mutated(lambda d: d.update(num_steps=10**9)),
    "bad scheduler": _mutated(lambda d: d.update(scheduler="../../etc/passwd")),
    "bad date": _mutated(lambda d: d.update(created_at="yesterday")),
    "deep nesting": "[" * 100000 + "]" * 100000,
    "too large": json.dumps({**_valid_dict(), "source": "x" * (MAX_FILE_BYTES + 10)}),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_calibration_files_are_rejected_without_side_effects(tmp_path, name):
    store_dir = tmp_path / "store"
    store = CalibrationStore(store_dir)
    good = store.save(synthetic(4))
    before = sorted(os.listdir(store_dir))
    src = tmp_path / "upload.json"
    src.write_text(BAD_FILES[name], encoding="utf-8")
    with pytest.raises(ValueError) as err:
        store.import_file(src)
    assert str(err.value)  # a message the UI can show
    with pytest.raises(ValueError):
        store.import_text(BAD_FILES[name])
    assert sorted(os.listdir(store_dir)) == before
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x").exists()
    assert [c.id for c in store.list()] == [good.id]


def test_a_valid_file_imports_under_a_new_generated_id(tmp_path):
    store = CalibrationStore(tmp_path / "store")
    d = _valid_dict()
    d["id"] = "my-calibration"
    src = tmp_path / "upload.json"
    src.write_text(json.dumps(d), encoding="utf-8")
    imported = store.import_file(src)
    assert imported.id != "my-calibration" and imported.id.startswith("tiny-flux-4s-")
    assert "imported from upload.json" in imported.source
    assert store.load(imported.id).curves == synthetic(4).curves
    exported = store.export(imported.id, tmp_path / "out.json")
    assert read_calibration_file(tmp_path / "out.json").curves == imported.curves
    again = store.import_text(exported)
    assert again.id != imported.id and len(store.list()) == 2


def test_a_ratio_spike_is_kept_not_rejected(tmp_path):
    """A random-weight FLUX in bf16 on an H200 measured a ratio of 466.67 at one step: a real measurement (it only
    forces a compute there), so the store keeps it; only non-finite, non-positive or absurd values are refused."""
    d = _valid_dict()
    d["branches"]["cond"]["mag_ratios"] = [1.0, 466.66595, 1.0, 1.0]
    cal = CalibrationStore(tmp_path).import_text(json.dumps(d))
    assert cal.curves[0][1] == 466.66595
    d["branches"]["cond"]["mag_ratios"] = [1.0, 1e7, 1.0, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        CalibrationStore(tmp_path).import_text(json.dumps(d))


def test_store_ids_are_never_paths(tmp_path):
    store = CalibrationStore(tmp_path / "store")
    for bad in ("../../x", "/etc/passwd", "a/b", "..", ".hidden", ""):
        with pytest.raises(ValueError):
            store.load(bad)
        with pytest.raises(ValueError):
            store.delete(bad)
    with pytest.raises(ValueError):
        store.save(replace(synthetic(4), id="../escape"))
    assert not (tmp_path / "escape.json").exists()


def test_list_skips_broken_files_and_names_them(tmp_path):
    store = CalibrationStore(tmp_path)
    good = store.save(synthetic(4))
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    assert [c.id for c in store.list()] == [good.id]
    assert len(store.problems) == 1 and store.problems[0].startswith("broken.json")
    store.delete(good.id)
    assert store.list() == []


def test_files_are_human_readable(tmp_path):
    cal = CalibrationStore(tmp_path).save(synthetic(5))
    text = (tmp_path / f"{cal.id}.json").read_text(encoding="utf-8")
    assert '"mag_ratios": [1.0, 0.97, 0.971, 0.972, 0.973]' in text
    assert '"scheduler": "FlowMatchEulerDiscreteScheduler shift=1"' in text


def test_default_store_dir_follows_magcache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MAGCACHE_HOME", str(tmp_path))
    assert default_store_dir() == tmp_path / "calibrations"
    assert CalibrationStore().root == tmp_path / "calibrations"
    monkeypatch.delenv("MAGCACHE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_store_dir() == tmp_path / "xdg" / "magcache-studio" / "calibrations"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _cli(*args, env_home):
    env = {**os.environ, "MAGCACHE_HOME": str(env_home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "magcache", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=300)


def test_calibrate_cli_with_a_tiny_pipeline(tmp_path):
    out = tmp_path / "cal.json"
    r = _cli("calibrate", "--tiny", "wan_t2v", "--steps", "4", "--out", str(out), "--save", env_home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibration of tiny:wan_t2v" in r.stdout and "uncond mag_ratios" in r.stdout
    cal = read_calibration_file(out)
    assert (cal.num_steps, cal.cfg, cal.model, cal.preset) == (4, True, "tiny:wan_t2v", "wan2.1_t2v_1.3B")
    assert cal.resolution == Resolution(16, 16, 9)
    stored = CalibrationStore(tmp_path / "calibrations").list()
    assert len(stored) == 1 and stored[0].curves == cal.curves
    assert all(math.isfinite(v) and v > 0 for c in cal.curves for v in c)


def test_calibrate_cli_rejects_bad_arguments(tmp_path):
    r = _cli("calibrate", "--tiny", "flux", "--steps", "1", env_home=tmp_path)
    assert r.returncode == 2 and "error: --steps must be at least 2" in r.stderr
    assert not (tmp_path / "calibrations").exists()


def test_calibration_figure_draws_curves_over_the_reference(flux_cal):
    from ui.plots import calibration_figure

    fig = calibration_figure(flux_cal, "flux")
    ratio_ax, cos_ax = fig.axes
    labels = [line.get_label() for line in ratio_ax.get_lines()]
    assert "cond (calibrated)" in labels and "cond (preset flux)" in labels
    calibrated = next(line for line in ratio_ax.get_lines() if line.get_label() == "cond (calibrated)")
    assert list(calibrated.get_ydata()) == flux_cal.branches["cond"]["mag_ratios"]
    assert list(cos_ax.get_lines()[0].get_ydata()) == flux_cal.branches["cond"]["cos_dis"]
