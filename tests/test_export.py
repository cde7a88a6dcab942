"""Exports: ComfyUI node values, magcache / diffusers snippets that really run, JSON that restores the schedule."""

import json
import math

import pytest

import magcache
from magcache import policy as P
from magcache.jsonfile import MAX_FILE_BYTES
from magcache.export import (
    SettingsSnapshot,
    comfyui_values,
    diffusers_caveats,
    diffusers_snippet,
    export_all,
    load_settings_json,
    python_snippet,
    settings_json,
)
from magcache.presets import get_preset
from magcache.studio.tiny import build_tiny_pipeline


CALIBRATED = ((1.0, 0.99, 0.985, 0.97, 0.96, 0.95, 0.93, 0.9), (1.0, 0.995, 0.98, 0.975, 0.95, 0.94, 0.92, 0.91))


def snapshots():
    flux = get_preset("flux")
    wan = get_preset("wan2.1_t2v_1.3B")
    return {
        "flux defaults": SettingsSnapshot("flux", flux.settings(), 28),
        "flux 20 steps options": SettingsSnapshot("flux", flux.settings(thresh=0.3, K=3, protect_last_steps=1,
                                                                        end_step=-2, zero_thresh_disables=False), 20),
        "wan cfg sqrt": SettingsSnapshot("wan2.1_t2v_1.3B", wan.settings(sqrt_ratios=True), 30),
        "wan without cfg": SettingsSnapshot("wan2.1_t2v_1.3B", wan.settings(), 50, num_branches=1),
        "chroma calibrated": SettingsSnapshot("chroma", get_preset("chroma").settings(thresh=0.05), 12, CALIBRATED,
                                              P.Rules(compare="<", guarded_steps=(3,), guard_reference_steps=12),
                                              model="lodestones/Chroma", curve_source="calibration abc"),
        "framepack": SettingsSnapshot("framepack", get_preset("framepack").settings(), 25),
        "kontext comfy rules": SettingsSnapshot("flux_kontext_comfyui", get_preset("flux_kontext_comfyui").settings(), 24),
    }


@pytest.mark.parametrize("name", list(snapshots()))
def test_json_export_then_import_restores_the_same_schedule(name):
    snap = snapshots()[name]
    text = settings_json(snap)
    restored = load_settings_json(text)
    assert restored.schedule().computed == snap.schedule().computed
    assert [d.acc_err for d in restored.schedule().decisions["cond"]] == [d.acc_err for d in snap.schedule().decisions["cond"]]
    assert restored.settings == snap.settings and restored.effective_rules == snap.effective_rules
    assert restored.effective_curves == snap.effective_curves and restored.branches == snap.branches
    assert restored.preset == snap.preset and restored.num_steps == snap.num_steps
    data = json.loads(text)
    assert data["curves"]["cond"] == list(snap.effective_curves[0])  # the file carries the ratio curve
    assert settings_json(restored).split('"created_at"')[0] == text.split('"created_at"')[0]


def test_the_exported_schedule_is_the_one_a_real_run_takes():
    """export -> import -> apply to a tiny pipeline -> the run computes the exported schedule."""
    from magcache.studio.tiny import tiny_call_kwargs

    pipe = build_tiny_pipeline("flux")
    curve = (1.0, 1.02, 0.99, 1.01, 0.97, 1.0)
    snap = SettingsSnapshot("flux", get_preset("flux").settings(thresh=0.05, retention_ratio=0.0, K=2), 6, (curve,),
                            P.Rules(compare="<=", retention_rounding="half_up"))
    assert snap.schedule().skipped["cond"]
    restored = load_settings_json(settings_json(snap))
    handle = restored.apply(pipe)
    try:
        pipe(**tiny_call_kwargs("flux", 6))
        assert handle.last_run.computed == snap.schedule().computed
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["flux defaults", "flux 20 steps options", "chroma calibrated", "wan cfg sqrt"])
def test_python_snippet_runs_and_sets_the_same_schedule(name):
    snap = snapshots()[name]
    code = python_snippet(snap)
    family = snap.preset_record.family
    kind = {"flux": "flux", "chroma": "chroma", "wan": "wan_t2v"}[family]
    pipe = build_tiny_pipeline(kind)
    scope = {"pipe": pipe}
    exec(compile(code, "<snippet>", "exec"), scope)
    handle = scope["handle"]
    try:
        assert handle.settings == snap.settings and handle.rules == snap.effective_rules
        assert handle.curves == snap.effective_curves
        assert handle.predict(snap.num_steps, snap.branches).computed == snap.schedule().computed
    finally:
        handle.remove()


@pytest.mark.parametrize("name, kind", [("flux defaults", "flux"), ("chroma calibrated", "chroma"),
                                        ("wan cfg sqrt", "wan_t2v")])
def test_diffusers_snippet_enables_the_builtin_cache(name, kind):
    snap = snapshots()[name]
    export = diffusers_snippet(snap)
    pipe = build_tiny_pipeline(kind)
    scope = {"pipe": pipe}
    exec(compile(export.code, "<diffusers snippet>", "exec"), scope)
    config = scope["config"]
    try:
        assert pipe.transformer.is_cache_enabled
        assert (config.threshold, config.max_skip_steps, config.retention_ratio) == (
            snap.settings.thresh, snap.settings.K, snap.settings.retention_ratio)
        assert config.num_inference_steps == snap.num_steps and len(config.mag_ratios) == snap.num_steps
        expected = P.nearest_interp(snap.effective_curves[0], snap.num_steps)
        if snap.settings.sqrt_ratios:
            expected = [math.sqrt(v) for v in expected]
        assert [float(v) for v in config.mag_ratios] == pytest.approx(expected, rel=1e-6)  # float32 in diffusers
    finally:
        pipe.transformer.disable_cache()


def test_diffusers_caveats_per_model():
    snaps = snapshots()

    def has(name, words):
        return any(words in c for c in diffusers_caveats(snaps[name]))

    assert has("chroma calibrated", "does not register") and has("chroma calibrated", "share one")
    assert has("framepack", "true CFG shares one state") and has("framepack", "ratio-jump guard")
    assert has("flux defaults", "no step guard") and not has("flux defaults", "CFG:")
    assert has("wan cfg sqrt", "CFG: diffusers keeps one state") and has("wan cfg sqrt", "already hold the square roots")
    assert has("flux 20 steps options", "protect_last_steps") and has("flux 20 steps options", "build a new config")
    assert has("kontext comfy rules", "true CFG") and has("kontext comfy rules", "floor map")
    vace = SettingsSnapshot("wan2.1_vace_1.3B", get_preset("wan2.1_vace_1.3B").settings(), 50)
    assert any("hints are added again" in c for c in diffusers_caveats(vace))
    hunyuan = SettingsSnapshot("hunyuan_video", get_preset("hunyuan_video").settings(), 50)
    assert not any(w in c for c in diffusers_caveats(hunyuan) for w in ("share", "guard", "register", "hints"))


def test_comfyui_node_values():
    snaps = snapshots()
    v = comfyui_values(snaps["flux defaults"])
    assert v.values == {"model_type": "flux", "magcache_thresh": 0.24, "retention_ratio": 0.1, "magcache_K": 5,
                        "start_step": 0, "end_step": -1}
    assert not any("widget range" in n or "calibrated curve" in n for n in v.notes)
    v = comfyui_values(snaps["flux 20 steps options"])
    assert v.values["end_step"] == -2  # end_step -2 already protects the last step
    v = comfyui_values(snaps["framepack"])
    assert v.values["model_type"] is None and "no model_type" in v.notes[0]
    v = comfyui_values(snaps["chroma calibrated"])
    assert v.values["model_type"] == "chroma" and any("calibrated curve cannot be set" in n for n in v.notes)
    low = SettingsSnapshot("flux", get_preset("flux").settings(retention_ratio=0.05, thresh=0.2237, protect_last_steps=2), 28)
    v = comfyui_values(low)
    assert v.values["end_step"] == -3 and v.values["retention_ratio"] == 0.05
    assert any("retention_ratio=0.05 is outside" in n for n in v.notes) and any("steps of 0.01" in n for n in v.notes)
    assert "model_type: flux" in v.text()


def test_export_all_and_from_handle():
    pipe = build_tiny_pipeline("wan_t2v")
    handle = magcache.apply(pipe, thresh=0.1, K=3, curves=[list(c) for c in CALIBRATED], protect_last_steps=1)
    try:
        snap = SettingsSnapshot.from_handle(handle, 8, curve_source="calibration xyz")
        assert snap.preset == "wan2.1_t2v_1.3B" and snap.custom_curves and not snap.custom_rules
        texts = export_all(snap)
        assert set(texts) == {"comfyui", "python", "diffusers", "json"}
        assert load_settings_json(texts["json"]).schedule().computed == handle.predict(8, 2).computed
        assert "calibration xyz" in texts["python"] and "curves=[" in texts["python"]
    finally:
        handle.remove()


def _bad(change):
    data = json.loads(settings_json(snapshots()["flux defaults"]))
    change(data)
    return json.dumps(data)


BAD_SETTINGS = {
    "not json": "{",
    "other format": json.dumps({"format": "magcache-studio calibration", "version": 1}),
    "NaN thresh": _bad(lambda d: d["settings"].update(thresh=float("nan"))),
    "string K": _bad(lambda d: d["settings"].update(K="3")),
    "bool K": _bad(lambda d: d["settings"].update(K=True)),
    "negative thresh": _bad(lambda d: d["settings"].update(thresh=-1)),
    "retention above 1": _bad(lambda d: d["settings"].update(retention_ratio=2)),
    "unknown setting": _bad(lambda d: d["settings"].update(evil=1)),
    "missing K": _bad(lambda d: d["settings"].pop("K")),
    "bad compare": _bad(lambda d: d["rules"].update(compare="!=")),
    "bad guard list": _bad(lambda d: d["rules"].update(guarded_steps=["11"])),
    "unknown preset": _bad(lambda d: d.update(preset="../../x")),
    "traversal model": _bad(lambda d: d.update(model="../../x")),
    "negative ratio": _bad(lambda d: d["curves"].update(cond=[1.0, -0.5, 1.0])),
    "zero ratio": _bad(lambda d: d["curves"].update(cond=[1.0, 0.0, 1.0])),
    "one-point curve": _bad(lambda d: d["curves"].update(cond=[1.0])),
    "three branches": _bad(lambda d: d["curves"].update(other=[1.0, 1.0])),
    "num_branches 3": _bad(lambda d: d.update(num_branches=3)),
    "zero steps": _bad(lambda d: d.update(num_steps=0)),
    "unknown field": _bad(lambda d: d.update(__class__="x")),
    "too large": json.dumps({"format": "magcache-studio settings", "pad": "x" * MAX_FILE_BYTES}),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_settings_files_are_rejected(name):
    with pytest.raises(ValueError) as err:
        load_settings_json(BAD_SETTINGS[name])
    assert str(err.value)
