"""The tuning panel (the backend magcache/studio/tuning.py and its display functions in ui/tuning.py) on tiny offline pipelines: the preview equals the schedule a real run
takes, the speed-up target, calibration round trip (calibrate -> store -> a new run uses it), nearest calibration
for another step count, rejected uploads, export -> load, a 3x2 sweep, Stop. No browser (tests/test_browser.py)."""

import json
import os
from pathlib import Path

import pytest

import magcache
from magcache import policy as P
from magcache.calibration import CalibrationStore
from magcache.curves import rules_for_calibration
from magcache.presets import get_preset
from magcache.studio import tuning as backend
from magcache.studio.defaults import tab_defaults
from magcache.studio.request import InvalidRequest
from magcache.studio.manager import ModelManager
from magcache.studio.sweep import TABLE_HEADERS
from magcache.studio.tiny import tiny_call_kwargs

from ui import handlers, tuning

STEPS = 8


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    os.environ["MAGCACHE_OUTPUT_DIR"] = str(tmp_path_factory.mktemp("outputs"))
    return ModelManager(tiny=True, demo_dir=tmp_path_factory.mktemp("no_demo_model") / "demo_model")


@pytest.fixture(autouse=True)
def store_dir(tmp_path, monkeypatch):
    """Every test gets an empty user calibration store."""
    monkeypatch.setenv("MAGCACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "calibrations"


def _values(tab_id, **extra):
    """What the tab's inputs deliver: the tab's defaults (tiny sizes), a prompt, the curve choice."""
    d = tab_defaults(manager_for_defaults, tab_id, None)
    values = {"prompt": "red background, small blue circle at left", "steps": STEPS, "seed": 1, "compare": False,
              "thresh": d["thresh"], "retention_ratio": d["retention_ratio"], "K": d["K"],
              "guidance": d["guidance_scale"], "curve": tuning.CURVE_AUTO, "curve_file": None}
    for key in ("width", "height", "num_frames"):
        if key in d:
            values[key] = d[key]
    if tab_id in ("flux_kontext", "wan_i2v", "framepack"):
        values["image"] = tiny_call_kwargs("flux_kontext")["image"]
    if tab_id == "framepack":
        values["num_frames"] = 13  # two sections
    values.update(extra)
    return values


manager_for_defaults = ModelManager(tiny=True, demo_dir=Path("/nonexistent/demo_model"))


def _run(manager, tab_id, values):
    """A real run through the comparison runner, with the tab's curve choice (as the Generate button does)."""
    return handlers.generate(manager, tab_id, values)["result"]


def _preview_schedule(manager, tab_id, values):
    curve = backend.current_curve(manager, tab_id, values)
    tab = manager.catalog.tab(tab_id)
    preset = get_preset(tab_defaults(manager, tab_id, values.get("variant"))["preset"])
    settings = preset.settings(thresh=values["thresh"], retention_ratio=values["retention_ratio"], K=values["K"])
    return curve, P.simulate(curve.curves, values["steps"], settings, curve.rules, tab.num_branches(values["guidance"]))


def _computed_in_text(text):
    return text.split(" transformer passes computed")[0].rsplit(": ", 1)[1].strip()


def _calibrate(manager, tab_id, values):
    out = tuning.calibrate_tab(manager, tab_id, values)
    assert out["calibration"] is not None, out["status"]
    return out


# --------------------------------------------------------------------------------------------------
# Preview == the real run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tab_id,settings", [
    ("demo", dict(thresh=0.24, retention_ratio=0.1, K=5)),   # true CFG: cond and uncond
    ("demo", dict(thresh=0.05, retention_ratio=0.2, K=2, steps=10)),
    ("wan_t2v", dict(thresh=0.12, retention_ratio=0.2, K=4)),
    ("flux_kontext", dict(thresh=0.3, retention_ratio=0.1, K=3)),  # no size input: size from the tiny defaults
    ("framepack", dict(thresh=0.1, retention_ratio=0.2, K=3)),  # one schedule per section
])
def test_preview_equals_the_schedule_a_real_run_takes(manager, tab_id, settings):
    values = _values(tab_id, **settings)
    curve, schedule = _preview_schedule(manager, tab_id, values)
    figure, text = handlers.live_preview(manager, tab_id, values)
    assert figure is not None and f"ratio curve: {curve.label}" in text
    total = values["steps"] * len(schedule.decisions)
    assert _computed_in_text(text) == f"{schedule.computed_count()}/{total}"

    result = _run(manager, tab_id, values)
    assert result.curve.label == curve.label and result.curve.how is None  # empty store: the preset curve
    assert len(result.cached.stats) == (2 if tab_id == "framepack" else 1)
    assert all(run.computed == schedule.computed for run in result.cached.stats)
    assert result.predicted.computed == schedule.computed


def test_preview_says_which_curve_and_preset_choice(manager):
    values = _values("wan_t2v", steps=50)
    _, text = handlers.live_preview(manager, "wan_t2v", values)
    assert "preset 'wan2.1_t2v_1.3B' curve" in text
    _, text = handlers.live_preview(manager, "wan_t2v", dict(values, curve="calibration:does-not-exist"))
    assert text.startswith("⚠️ Ratio curve") and "does-not-exist" in text
    _, text = handlers.live_preview(manager, "wan_t2v", dict(values, curve=tuning.CURVE_FILE))
    assert "no settings file is loaded" in text


def test_the_preview_reads_nothing_from_disk_until_a_calibration_is_saved(manager, monkeypatch):
    """A slider move redraws from memory: no model plan (paths, folder sizes, demo settings) and no store read;
    saving a calibration renews the store's records, so the next preview uses it."""
    values = _values("demo")
    handlers.live_preview(manager, "demo", values)  # the first draw fills what the preview keeps
    store_reads, plans = [], []
    real_read, real_plan = CalibrationStore._read_all, manager.plan
    monkeypatch.setattr(CalibrationStore, "_read_all", lambda self: store_reads.append(1) or real_read(self))
    monkeypatch.setattr(manager, "plan", lambda *args, **kwargs: plans.append(args) or real_plan(*args, **kwargs))
    for thresh in (0.05, 0.1, 0.2):
        figure, _ = handlers.live_preview(manager, "demo", dict(values, thresh=thresh))
        assert figure is not None
    assert store_reads == [] and plans == []
    cal = _calibrate(manager, "demo", values)["calibration"]
    _, text = handlers.live_preview(manager, "demo", values)
    assert f"calibration {cal.id} (exact)" in text


# --------------------------------------------------------------------------------------------------
# Speed-up target
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tab_id,steps,target", [("wan_t2v", 50, 2.0), ("flux", 28, 2.5), ("demo", 20, 1.8)])
def test_target_solve_sets_a_thresh_that_reaches_the_target(manager, tab_id, steps, target):
    values = _values(tab_id, steps=steps, thresh=0.01, K=1)
    out = tuning.solve_target(manager, tab_id, values, target)
    assert out["solution"].reached and out["text"].startswith("✅")
    solved = dict(values, thresh=out["thresh"], K=out["K"])
    _, schedule = _preview_schedule(manager, tab_id, solved)
    assert schedule.predicted_speedup() >= target
    # the gentlest such schedule: one computed step more would fall below the target
    total = steps * len(schedule.decisions)
    assert total / (schedule.computed_count() + 1) < target
    _, text = handlers.live_preview(manager, tab_id, solved)  # what the sliders show after Solve
    assert f"**{schedule.predicted_speedup():.2f}×**" in text


def test_unreachable_target_says_so(manager):
    out = tuning.solve_target(manager, "flux", _values("flux", steps=8, retention_ratio=0.5), 4.9)
    assert not out["solution"].reached and "out of reach" in out["text"] and out["text"].startswith("⚠️")
    with pytest.raises(InvalidRequest, match="target speed-up must be a number >= 1"):
        tuning.solve_target(manager, "flux", _values("flux"), 0.5)


# --------------------------------------------------------------------------------------------------
# Calibration round trip
# --------------------------------------------------------------------------------------------------
def test_calibrate_then_a_new_run_uses_it(manager, store_dir):
    settings = dict(thresh=0.1, retention_ratio=0.1, K=4)
    values = _values("demo", **settings)
    preset_curve, preset_schedule = _preview_schedule(manager, "demo", values)
    assert preset_curve.calibration is None

    progress = []
    out = tuning.calibrate_tab(manager, "demo", values, on_progress=lambda text, done, total: progress.append((done, total)))
    cal = out["calibration"]
    assert cal is not None and out["figure"] is not None and "Calibrated" in out["status"] and cal.id in out["status"]
    assert (STEPS, STEPS) in progress
    assert [p.stem for p in store_dir.glob("*.json")] == [cal.id]  # saved in the user store
    assert cal.model == "tiny:flux" and cal.num_steps == STEPS and cal.cfg  # keyed by model, steps, CFG on
    assert magcache.get_handle(manager.get("demo").pipe) is None

    curve, schedule = _preview_schedule(manager, "demo", values)  # the preview now uses it
    assert curve.calibration.id == cal.id and curve.how == "exact"
    _, text = handlers.live_preview(manager, "demo", values)
    assert f"calibration {cal.id} (exact)" in text

    result = _run(manager, "demo", values)  # and so does a new run
    assert result.curve.calibration.id == cal.id and result.curve.how == "exact"
    details = handlers.details_markdown(result)
    assert f"**Ratio curve:** calibration {cal.id} (exact)" in details
    p = get_preset("flux")
    expected = P.simulate(cal.curves, STEPS, p.settings(**settings), rules_for_calibration(p.rules), 2)
    assert result.cached.stats[0].computed == expected.computed == schedule.computed
    assert expected.computed != preset_schedule.computed  # the calibration changed the schedule

    # the preset curve on request; and the dropdown lists the calibration
    preset_run = _run(manager, "demo", dict(values, curve=tuning.CURVE_PRESET))
    assert preset_run.cached.stats[0].computed == preset_schedule.computed
    assert (backend.CALIBRATION_PREFIX + cal.id) in [v for _, v in tuning.curve_options(manager, "demo")]


@pytest.mark.parametrize("tab_id", ["flux2", "z_image"])
def test_calibrate_first_tab_is_off_until_calibrated_then_uses_its_calibration(manager, store_dir, tab_id):
    """FLUX.2 and Z-Image have no published curve: the preview asks for a calibration and a run computes every step;
    one click on Calibrate, and with Auto the preview and the next run use the new curve without anything else."""
    settings = dict(thresh=0.5, retention_ratio=0.2, K=2)  # generous, so the tiny model's curve skips something
    values = _values(tab_id, **settings)
    tab = manager.catalog.tab(tab_id)
    branches = tab.num_branches(values["guidance"])
    figure, text = handlers.live_preview(manager, tab_id, values)
    assert figure is None and "MagCache is off until you calibrate it" in text and "Calibrate first" in text
    before = _run(manager, tab_id, values)
    assert before.curve.calibration is None and before.curve.curves == []
    assert all(run.computed == {b: list(range(STEPS)) for b in run.computed} for run in before.cached.stats)
    with pytest.raises(InvalidRequest, match="Calibrate first"):  # nothing to solve for, export or sweep yet
        tuning.solve_target(manager, tab_id, values, 2.0)
    with pytest.raises(InvalidRequest, match="Calibrate first"):
        tuning.export_settings(manager, tab_id, values, "json")
    with pytest.raises(InvalidRequest, match="Calibrate first"):
        tuning.sweep_tab(manager, tab_id, values, "0.1, 0.2", "2")

    out = tuning.calibrate_tab(manager, tab_id, values)
    cal = out["calibration"]
    assert cal is not None and out["figure"] is not None and "Calibrated" in out["status"], out["status"]
    assert [p.stem for p in store_dir.glob("*.json")] == [cal.id] and cal.num_steps == STEPS

    curve, schedule = _preview_schedule(manager, tab_id, values)
    assert curve.calibration.id == cal.id and curve.how == "exact"
    figure, text = handlers.live_preview(manager, tab_id, values)
    assert figure is not None and f"calibration {cal.id} (exact)" in text, text
    result = _run(manager, tab_id, values)
    assert result.curve.calibration.id == cal.id and result.curve.how == "exact"
    p = get_preset(tab_defaults(manager, tab_id, None)["preset"])
    expected = P.simulate(cal.curves_for(branches > 1), STEPS, p.settings(**settings), rules_for_calibration(p.rules),
                          branches)
    assert result.cached.stats[0].computed == expected.computed == schedule.computed
    assert expected.computed_count() < STEPS * branches  # caching is on now
    assert tuning.solve_target(manager, tab_id, values, 1.5)["solution"].reached


def test_changed_step_count_picks_the_nearest_and_resamples(manager):
    base = dict(thresh=0.1, retention_ratio=0.1, K=4)
    cal8 = _calibrate(manager, "demo", _values("demo", steps=8, **base))["calibration"]
    cal16 = _calibrate(manager, "demo", _values("demo", steps=16, **base))["calibration"]
    p = get_preset("flux")
    for steps, cal in ((11, cal8), (14, cal16), (30, cal16)):
        values = _values("demo", steps=steps, **base)
        curve, schedule = _preview_schedule(manager, "demo", values)
        assert curve.calibration.id == cal.id and curve.how == f"nearest (resampled from {cal.num_steps} steps)"
        expected = P.simulate([P.nearest_interp(c, steps) for c in cal.curves], steps, p.settings(**base),
                              rules_for_calibration(p.rules), 2)
        assert schedule.computed == expected.computed
        if steps == 11:
            result = _run(manager, "demo", values)
            assert result.curve.how == curve.how and result.cached.stats[0].computed == expected.computed
            assert "resampled from 8 steps" in handlers.details_markdown(result)


def test_calibration_of_another_size_is_the_nearest_one(manager):
    cal = _calibrate(manager, "flux", _values("flux", width=32, height=32))["calibration"]
    curve = backend.current_curve(manager, "flux", _values("flux", width=128, height=128))
    assert curve.calibration.id == cal.id and curve.how == "nearest (calibrated at 32x32, run at 128x128)"


def test_stop_during_calibration_saves_nothing(manager, store_dir):
    session = "calibration-stop"

    def stop_at_step_three(text, done, total):
        if done == 3:
            manager.cancel(session)

    out = tuning.calibrate_tab(manager, "wan_t2v", _values("wan_t2v"), session, stop_at_step_three)
    assert out["calibration"] is None and "Calibration stopped" in out["status"] and "step 3" in out["status"]
    assert not store_dir.exists() or not list(store_dir.iterdir())
    pipe = manager.get("wan_t2v").pipe
    assert magcache.get_handle(pipe) is None
    assert _calibrate(manager, "wan_t2v", _values("wan_t2v"))["calibration"].num_steps == STEPS  # works again


# --------------------------------------------------------------------------------------------------
# Imports
# --------------------------------------------------------------------------------------------------
def _good_calibration_text(preset="flux", model="someone/flux-finetune", steps=4):
    return json.dumps({
        "format": "magcache-studio calibration", "version": 1, "model": model, "preset": preset, "num_steps": steps,
        "resolution": {"height": 64, "width": 64, "frames": 1}, "scheduler": "FlowMatchEulerDiscreteScheduler shift=3",
        "cfg": False, "branches": {"cond": {"mag_ratios": [1.0, 1.02, 0.98, 0.95][:steps] + [0.9] * (steps - 4)}}})


@pytest.mark.parametrize("content,message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"format": "magcache-studio calibration", "version": 1, "model": "m", "preset": "flux", "num_steps": 3, '
     b'"resolution": {"height": 64, "width": 64}, "scheduler": "X", "branches": {"cond": {"mag_ratios": [1.0, NaN, 1.0]}}}',
     "NaN is not allowed"),
    (_good_calibration_text().replace("0.98", "-0.98").encode(), "out of range"),
    (_good_calibration_text().replace('[1.0, 1.02, 0.98, 0.95]', '[1.0, 1.02]').encode(), "has 2 values but num_steps is 4"),
    (_good_calibration_text().replace('"someone/flux-finetune"', '"../../etc/passwd"').encode(), "path traversal"),
    (_good_calibration_text().replace('"version": 1', '"version": 1, "id": "../escape"').encode(), "invalid calibration id"),
    (_good_calibration_text(preset="wan2.1_t2v_1.3B").encode(), "this tab runs 'flux'"),
    (b" " * (600 * 1024), "too large"),
])
def test_a_bad_calibration_upload_is_rejected_without_side_effects(manager, tmp_path, store_dir, content, message):
    upload = tmp_path / "upload.json"
    upload.write_bytes(content)
    with pytest.raises(InvalidRequest, match="Calibration not imported") as e:
        tuning.import_calibration(manager, "demo", _values("demo"), str(upload))
    assert message in str(e.value)
    assert not store_dir.exists() or not list(store_dir.iterdir())  # nothing written


def test_importing_a_calibration_of_another_model_selects_it(manager, tmp_path):
    upload = tmp_path / "upload.json"
    upload.write_text(_good_calibration_text(steps=6))
    out = tuning.import_calibration(manager, "flux", _values("flux"), str(upload))
    saved = out["calibration"]
    assert out["curve"] == backend.CALIBRATION_PREFIX + saved.id and "someone/flux-finetune" in out["status"]
    assert CalibrationStore().load(saved.id).model == "someone/flux-finetune"
    values = _values("flux", curve=out["curve"], thresh=0.05, K=3)
    curve, schedule = _preview_schedule(manager, "flux", values)
    assert curve.calibration.id == saved.id and "chosen by hand, resampled from 6 steps" in curve.label
    result = _run(manager, "flux", values)
    assert result.curve.label == curve.label and result.cached.stats[0].computed == schedule.computed

    own = tmp_path / "own.json"  # a file of this tab's own model: Auto picks it
    own.write_text(_good_calibration_text(model="tiny:flux", steps=6))
    assert tuning.import_calibration(manager, "flux", _values("flux"), str(own))["curve"] == tuning.CURVE_AUTO


# --------------------------------------------------------------------------------------------------
# Export -> load
# --------------------------------------------------------------------------------------------------
def test_export_then_load_restores_the_same_schedule(manager, tmp_path, store_dir):
    settings = dict(thresh=0.1, retention_ratio=0.1, K=4)
    values = _values("demo", **settings)
    cal = _calibrate(manager, "demo", values)["calibration"]
    original = _run(manager, "demo", values)
    assert original.curve.calibration.id == cal.id

    out = tuning.export_settings(manager, "demo", values, "json")
    path = Path(out["path"])
    assert path.is_file() and path.is_relative_to(handlers.output_dir()) and path.read_text() == out["text"]
    texts = out["texts"]
    assert "magcache_thresh: 0.1" in texts["comfyui"] and "calibrated curve cannot be" in texts["comfyui"]
    assert "magcache.apply(" in texts["python"] and "curves=[" in texts["python"]
    assert "MagCacheConfig(" in texts["diffusers"] and "# CAVEAT: FLUX Kontext" not in texts["diffusers"]
    assert "# CAVEAT: CFG" in texts["diffusers"]
    assert tuning.export_settings(manager, "demo", values, "python")["language"] == "python"

    # the user moves everything and the calibration disappears; loading the file brings the schedule back
    for f in store_dir.glob("*.json"):
        f.unlink()
    moved = _values("demo", thresh=0.5, retention_ratio=0.3, K=1, steps=12)
    assert _preview_schedule(manager, "demo", moved)[1].computed != original.predicted.computed
    loaded = tuning.load_settings(manager, "demo", moved, str(path))
    assert (loaded["thresh"], loaded["retention_ratio"], loaded["K"], loaded["steps"]) == (0.1, 0.1, 4, STEPS)
    assert loaded["curve"] == tuning.CURVE_FILE and "Loaded" in loaded["status"]
    restored = dict(moved, **{k: loaded[k] for k in ("thresh", "retention_ratio", "K", "steps", "curve", "curve_file")})
    curve, schedule = _preview_schedule(manager, "demo", restored)
    assert curve.curves == cal.curves and curve.label.startswith("settings file (calibration")
    assert schedule.computed == original.predicted.computed
    again = _run(manager, "demo", restored)
    assert again.cached.stats[0].computed == original.cached.stats[0].computed
    assert again.curve.how == "settings file"


def test_export_of_the_preset_curve_loads_back_as_the_preset(manager, tmp_path):
    values = _values("wan_t2v", steps=50, thresh=0.12, retention_ratio=0.2, K=4)
    path = tuning.export_settings(manager, "wan_t2v", values, "comfyui")["path"]
    loaded = tuning.load_settings(manager, "wan_t2v", _values("wan_t2v"), path)
    assert loaded["curve"] == tuning.CURVE_PRESET and loaded["curve_file"] is None and loaded["steps"] == 50


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format="something else"), "not a MagCache Studio settings file"),
    (lambda d: d["settings"].update(thresh=float("nan")), "not valid JSON"),  # NaN is refused by the reader
    (lambda d: d["settings"].update(K="4; rm -rf /"), "settings.K must be int"),
    (lambda d: d["curves"].update(cond=[1.0, -2.0]), "is not a finite ratio"),
    (lambda d: d.update(preset="wan2.1_t2v_1.3B"), "this tab runs 'flux'"),
    (lambda d: d.update(extra="field"), "unknown fields"),
])
def test_a_bad_settings_file_is_rejected(manager, tmp_path, mutate, message):
    path = tuning.export_settings(manager, "flux", _values("flux"), "json")["path"]
    data = json.loads(Path(path).read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InvalidRequest, match="Settings not loaded") as e:
        tuning.load_settings(manager, "flux", _values("flux"), str(bad))
    assert message in str(e.value)


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------
def test_sweep_3x2_with_table_pareto_and_apply(manager):
    messages = []
    out = tuning.sweep_tab(manager, "demo", _values("demo"), "0.05, 0.1, 0.2", "2 4", "",
                       on_progress=lambda text, done, total: messages.append((text, done, total)))
    result = out["result"]
    assert len(result.rows) == 6 and not result.cancelled and "Sweep done" in out["status"]
    assert {(r.point.thresh, r.point.K, r.point.retention_ratio) for r in result.rows} == {
        (t, k, 0.1) for t in (0.05, 0.1, 0.2) for k in (2, 4)}  # retention: the slider's
    assert all(r.matches_prediction for r in result.rows)  # every run took the predicted steps
    table = out["table"]
    assert list(table.columns) == ["#"] + TABLE_HEADERS and len(table) == 6
    assert any(r.pareto for r in result.rows) and out["figure"] is not None and len(out["choices"]) == 6
    assert messages[-1][0] == "Sweep done" and messages[-1][1] == messages[-1][2] == 8  # warm-up + baseline + 6
    assert magcache.get_handle(manager.get("demo").pipe) is None
    assert tuning.apply_point(result, 3) == result.rows[3].point.settings()
    view = tuning.sweep_view(result, "predicted", "ssim")
    front = {i for i, r in enumerate(result.rows) if r.pareto}
    assert front and all("Pareto" in view["choices"][i][0] for i in front)
    with pytest.raises(InvalidRequest, match="choose one of its points"):
        tuning.apply_point(result, 17)


def test_sweep_uses_the_chosen_curve_and_validates_the_grid(manager):
    cal = _calibrate(manager, "demo", _values("demo"))["calibration"]
    out = tuning.sweep_tab(manager, "demo", _values("demo"), "0.1", "4", "0.1, 0.2")
    assert f"calibration {cal.id} (exact)" in out["status"] and len(out["result"].rows) == 2
    p = get_preset("flux")
    for row in out["result"].rows:
        expected = P.simulate(cal.curves, STEPS, p.settings(**row.point.settings()), rules_for_calibration(p.rules), 2)
        assert row.computed == {b: len(v) for b, v in expected.computed.items()}
    with pytest.raises(InvalidRequest, match="K values must be whole numbers"):
        tuning.sweep_tab(manager, "demo", _values("demo"), "0.1", "2.5", "")
    with pytest.raises(InvalidRequest, match="the limit is"):
        tuning.sweep_tab(manager, "demo", _values("demo"), " ".join(str(i / 100) for i in range(1, 20)), "1 2", "")
    with pytest.raises(InvalidRequest, match="thresh must be >= 0"):
        tuning.sweep_tab(manager, "demo", _values("demo"), "-0.1", "2", "")


def test_stop_ends_a_sweep_and_drops_the_interrupted_run(manager):
    session = "sweep-stop"

    def stop_during_second_point(text, done, total):
        if text.startswith("Sweep 2/6"):
            manager.cancel(session)

    out = tuning.sweep_tab(manager, "demo", _values("demo"), "0.05, 0.1, 0.2", "2, 4", "", session,
                       stop_during_second_point)
    result = out["result"]
    assert result.cancelled and "Sweep stopped" in out["status"] and len(result.rows) == 1
    assert magcache.get_handle(manager.get("demo").pipe) is None


# --------------------------------------------------------------------------------------------------
# The accordion in every tab
# --------------------------------------------------------------------------------------------------
def test_every_tab_gets_the_tuning_accordion(manager):
    import gradio as gr

    from ui.layout import build_tab

    with gr.Blocks():
        contexts = [build_tab(tab, manager) for tab in manager.catalog.tabs]
    for ctx in contexts:
        assert {"curve", "curve_file"} <= set(ctx.inputs) and ctx.inputs["curve"].value == tuning.CURVE_AUTO
        assert ctx.preview is not None
        assert handlers.request_from_values(ctx.tab.id, {"curve": tuning.CURVE_PRESET}).curve == tuning.CURVE_PRESET
        d = tab_defaults(manager, ctx.tab.id, None)
        figure, text = ctx.preview({"steps": d["num_inference_steps"], "thresh": d["thresh"],
                                    "retention_ratio": d["retention_ratio"], "K": d["K"], "curve": tuning.CURVE_AUTO})
        if get_preset(d["preset"]).calibrate_first:  # FLUX.2, Z-Image: no curve until a calibration exists
            assert figure is None and "Calibrate first" in text
        else:
            assert figure is not None and "ratio curve: preset" in text
