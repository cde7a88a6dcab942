"""Every tab's Generate handler end to end on tiny offline pipelines (MAGCACHE_TINY), plus stop, validation,
compile, the live preview, the tab builder and app flags. No browser: the handlers are plain functions."""

import importlib.machinery
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import magcache
from magcache import policy as P
from magcache.adapters import adapter_for
from magcache.presets import get_preset
from magcache.studio.comparison import WARMUP_STEPS
from magcache.studio.defaults import tab_defaults
from magcache.studio.request import InvalidRequest, build_call_kwargs
from magcache.studio.manager import ModelManager, WeightsNotFound
from magcache.studio.tiny import tiny_call_kwargs

from ui import handlers

TABS = ["demo", "flux", "flux_kontext", "chroma", "hunyuan_video", "wan_t2v", "wan_i2v", "wan_vace", "framepack",
        "wan22_t2v", "wan22_i2v", "wan22_ti2v", "wan22_ti2v_i2v", "qwen_image", "qwen_image_edit", "hunyuan_video15",
        "flux2", "z_image"]
STEPS = 8


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    os.environ["MAGCACHE_OUTPUT_DIR"] = str(tmp_path_factory.mktemp("outputs"))
    return ModelManager(tiny=True, demo_dir=tmp_path_factory.mktemp("no_demo_model") / "demo_model")


def _values(tab_id, **extra):
    # one timed pair: every block run below is one of the two runs whose outputs are compared
    values = {"prompt": "a red circle on a blue background", "steps": STEPS, "seed": 1, "compare": True,
              "timing_repeats": 1}
    if tab_id in ("flux_kontext", "wan_i2v", "framepack", "wan22_i2v", "wan22_ti2v_i2v", "qwen_image_edit"):
        values["image"] = tiny_call_kwargs("flux_kontext")["image"]
    if tab_id == "framepack":
        values["num_frames"] = 13  # two sections: two MagCache runs in one request
    values.update(extra)
    return values


def _parse_passes(cell):
    """"12/16 (cond 6/8, uncond 6/8)" -> {"all": (12, 16), "cond": (6, 8), "uncond": (6, 8)}."""
    first, _, rest = cell.partition(" (")
    out = {"all": tuple(int(n) for n in first.split("/"))}
    for part in filter(None, rest.rstrip(")").split(", ")):
        name, counts = part.split(" ")
        out[name] = tuple(int(n) for n in counts.split("/"))
    return out


# Qwen-Image-Edit's pipeline resizes the input image to a 1024x1024-pixel area whatever the output size, so even its
# tiny model takes minutes for the three runs of a comparison on a CPU; its adapter is the Qwen-Image one.
@pytest.mark.parametrize("tab_id", [t for t in TABS if t != "qwen_image_edit"])
def test_every_tab_end_to_end(manager, tab_id):
    tab = manager.catalog.tab(tab_id)
    pipe = manager.get(tab_id).pipe  # the handler reuses this loaded pipeline
    adapter = adapter_for(pipe.transformer)
    experts = adapter.experts(pipe)  # Wan2.2 A14B: both experts' blocks count
    block_runs = []
    hooks = [getattr(t, adapter.block_lists[0])[0].register_forward_pre_hook(lambda module, args: block_runs.append(1))
             for t in experts]
    try:
        out = handlers.generate(manager, tab_id, _values(tab_id))
    finally:
        for hook in hooks:
            hook.remove()
    result = out["result"]
    base, cached = result.baseline, result.cached
    # the schedule figure marks where a two-expert pipeline switched experts, and only there
    assert _expert_switch_lines(out["schedule"]) == ([result.expert_switch - 0.5] if len(experts) > 1 else [])
    assert (result.expert_switch is not None) == (len(experts) > 1)

    # outputs present, same shape on both sides
    if tab.is_video:
        for key in ("baseline_video", "magcache_video", "split_video"):
            assert Path(out[key]).is_file() and Path(out[key]).stat().st_size > 0
        assert base.output.shape == cached.output.shape and base.output.ndim == 4
    else:
        assert isinstance(out["baseline_image"], Image.Image) and isinstance(out["magcache_image"], Image.Image)
        assert out["slider"] == (out["baseline_image"], out["magcache_image"])
    assert out["heatmap"] is not None and out["schedule"] is not None

    # timings: speed-up = baseline s / MagCache s (one pair), in the result and in the table
    assert result.timing.pairs == 1 and result.speedup == pytest.approx(base.seconds / cached.seconds)
    table = out["timing"].set_index("Run")
    assert table.loc["MagCache", "Speed-up"] == f"{base.seconds / cached.seconds:.2f}×"
    assert float(table.loc["Baseline (no cache)", "Time (s)"]) == pytest.approx(base.seconds, abs=5e-4)
    assert float(table.loc["MagCache", "Time (s)"]) == pytest.approx(cached.seconds, abs=5e-4)

    # computed counts: table == the library's RunStats == the policy's prediction == block executions counted
    sections = 2 if tab_id == "framepack" else 1
    assert len(cached.stats) == sections and all(run.completed for run in cached.stats)
    branches = list(cached.stats[0].branches)
    assert len(branches) == tab.num_branches(result.variant.defaults["guidance_scale"])
    computed_total = 0
    passes, base_passes = _parse_passes(table.loc["MagCache", "Passes computed"]), _parse_passes(
        table.loc["Baseline (no cache)", "Passes computed"])
    for b in branches:
        library = sum(len(run.computed[b]) for run in cached.stats)
        key = b if len(branches) > 1 else "all"
        assert passes[key] == (library, STEPS * sections)
        assert base_passes[key] == (STEPS * sections, STEPS * sections)
        computed_total += library
    assert passes["all"] == (computed_total, STEPS * sections * len(branches))
    preset = get_preset(result.preset)
    if preset.calibrate_first:  # FLUX.2, Z-Image: no curve before a calibration, so nothing is skipped
        assert computed_total == base.transformer_calls
    else:
        split = None
        if len(experts) > 1:  # where this pipeline switches experts at STEPS steps
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            scheduler.set_timesteps(STEPS)
            split = adapter.expert_split(pipe, scheduler.timesteps)
        expected = P.simulate(preset.curves_for(STEPS), STEPS, result.settings, preset.rules, len(branches), split)
        assert all(run.computed == expected.computed for run in cached.stats)
        assert computed_total < base.transformer_calls  # the tiny defaults skip something on every tab
    assert base.transformer_calls == cached.transformer_calls == STEPS * sections * len(branches)
    warm_up = WARMUP_STEPS * sections * len(branches) if result.warmup_seconds is not None else 0
    assert len(block_runs) == warm_up + base.transformer_calls + computed_total

    # quality numbers vs the baseline
    assert 0 < result.psnr <= 100 and -1 <= result.ssim <= 1 and math.isfinite(result.ssim)
    assert "PSNR" in out["metrics"] and "SSIM" in out["metrics"]
    assert magcache.get_handle(pipe) is None  # the cache lives for the cached run only


def test_demo_falls_back_to_a_tiny_flux_until_the_demo_model_exists(manager):
    out = handlers.generate(manager, "demo", _values("demo", steps=4, compare=False))
    assert "demo model is not at" in out["details"] and "`flux`" in out["details"]
    assert out["baseline_image"] is None and out["slider"] is None and out["magcache_image"] is not None
    assert out["heatmap"] is None and out["metrics"] == ""
    assert "Compare with baseline" in out["headline"] and "transformer passes" in out["headline"]
    assert list(out["timing"]["Run"])[:2] == ["MagCache", "Predicted (policy)"]


def test_stop_cancels_cleanly_and_the_next_run_works(manager):
    session = "test-session"

    def stop_at_step_two(phase, done, total):
        if phase == "baseline" and done == 2:
            assert handlers.stop(manager, session).startswith("⏹ **Stopping**")

    out = handlers.generate(manager, "wan_t2v", _values("wan_t2v"), session, stop_at_step_two)
    assert out["status"].startswith("⏹ **Stopped**") and "after step 2 of 8" in out["status"]
    pipe = manager.get("wan_t2v").pipe
    assert magcache.get_handle(pipe) is None  # no handle left behind
    assert handlers.stop(manager, session) == "Nothing is running in this tab."
    again = handlers.generate(manager, "wan_t2v", _values("wan_t2v", steps=4), session)
    assert again["result"].cached.stats[0].completed


def test_invalid_inputs_have_clear_messages(manager):
    with pytest.raises(InvalidRequest, match="needs an input image"):
        handlers.generate(manager, "wan_i2v", _values("wan_t2v"))
    with pytest.raises(InvalidRequest, match="4k\\+1 frames"):
        handlers.generate(manager, "wan_t2v", _values("wan_t2v", num_frames=10))
    with pytest.raises(InvalidRequest, match="multiple of 16"):
        handlers.generate(manager, "flux", _values("flux", width=40))
    with pytest.raises(InvalidRequest, match="thresh must be >= 0"):
        handlers.generate(manager, "flux", _values("flux", thresh=-0.1))
    with pytest.raises(InvalidRequest, match="Write a prompt"):
        handlers.generate(manager, "chroma", _values("chroma", prompt="  "))


def test_missing_weights_reach_the_handler(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound, match="hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        handlers.generate(ModelManager(tiny=False), "wan_t2v", _values("wan_t2v"))


def test_compile_runs_the_blocks_compiled_and_reports_the_warm_up(tiny):
    m = ModelManager(tiny=True)
    out = handlers.generate(m, "flux", _values("flux", steps=4, compile=True, compile_backend="eager"))
    result = out["result"]
    assert result.compiled and result.warmup_seconds is not None and "compiled blocks" in out["status"]
    pipe = m.get("flux").pipe
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in pipe.transformer.transformer_blocks)
    assert "Warm-up (not timed)" in list(out["timing"]["Run"])
    plain = handlers.generate(m, "flux", _values("flux", steps=4))  # compile off: eager again, same outputs
    assert not plain["result"].compiled
    assert np.array_equal(np.asarray(plain["magcache_image"]), np.asarray(out["magcache_image"]))


def test_live_preview_matches_the_policy(manager):
    from magcache.studio.tuning import preview_schedule

    values = {"variant": "1.3B (480p)", "steps": 50, "thresh": 0.12, "retention_ratio": 0.2, "K": 4, "guidance": 5.0,
              "num_frames": 81}
    preview = preview_schedule(manager, "wan_t2v", values)
    preset = get_preset("wan2.1_t2v_1.3B")
    expected = P.simulate(preset.curves, 50, preset.settings(), preset.rules, 2)
    assert preview.preset.id == preset.id and preview.curve is None and preview.schedule.computed == expected.computed
    figure, text = handlers.live_preview(manager, "wan_t2v", values)
    assert f"{expected.computed_count()}/100" in text and f"{expected.predicted_speedup():.2f}×" in text
    assert figure is not None
    framepack = {"steps": 25, "thresh": 0.1, "retention_ratio": 0.2, "K": 3, "guidance": 10.0, "num_frames": 13}
    assert preview_schedule(manager, "framepack", framepack).sections == 2
    figure, text = handlers.live_preview(manager, "flux", {"steps": 28, "thresh": -1, "retention_ratio": 0.1, "K": 5})
    assert figure is None and "thresh" in text


def _expert_switch_lines(figure):
    """Where the schedule figure draws its "expert switch" label (x in steps), one per labelled line."""
    return [t.xy[0] for ax in figure.axes for t in ax.texts if t.get_text() == "expert switch"]


def test_the_wan22_a14b_schedule_figure_marks_the_expert_switch(manager):
    from magcache.studio.tuning import preview_schedule

    values = {"steps": 40, "thresh": 0.1, "retention_ratio": 0.2, "K": 3, "guidance": 4.0, "num_frames": 81}
    preview = preview_schedule(manager, "wan22_t2v", values)
    split = P.reference_split_step(preview.preset.rules, 40)
    assert preview.expert_switch == split and 0 < split < 40
    figure, text = handlers.live_preview(manager, "wan22_t2v", values)
    assert _expert_switch_lines(figure) == [split - 0.5]  # between the last high-noise and the first low-noise step
    lines = [line.get_xdata()[0] for ax in figure.axes for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert lines == [split - 0.5, split - 0.5]  # in both panels
    assert f"Expert switch after step {split - 1}" in text
    figure, _ = handlers.live_preview(manager, "wan_t2v", dict(values, num_frames=81))  # one model: no switch
    assert _expert_switch_lines(figure) == []


def test_tabs_are_generated_from_presets_json_with_an_extension_hook(manager, monkeypatch):
    import gradio as gr

    import ui

    calls = []
    fake = types.ModuleType("ui.tuning")
    fake.__spec__ = importlib.machinery.ModuleSpec("ui.tuning", None)
    fake.build_tuning = lambda ctx: calls.append(ctx)
    monkeypatch.setitem(sys.modules, "ui.tuning", fake)
    app = ui.build_app(manager)
    assert isinstance(app, gr.Blocks)
    assert [c.tab.id for c in calls] == TABS
    for ctx in calls:
        d = tab_defaults(manager, ctx.tab.id, None)
        assert (ctx.inputs["thresh"].value, ctx.inputs["retention_ratio"].value, ctx.inputs["K"].value) == (
            d["thresh"], d["retention_ratio"], d["K"])
        assert ("image" in ctx.inputs) == (ctx.tab.id in ("flux_kontext", "wan_i2v", "framepack", "wan22_i2v",
                                                           "wan22_ti2v_i2v", "qwen_image_edit"))
        assert ("split_video" in ctx.outputs) == ctx.tab.is_video
    vace = next(c for c in calls if c.tab.id == "wan_vace")
    assert {"control_video", "mask_video", "reference_images", "variant"} <= set(vace.inputs)


def test_app_flags_and_environment(monkeypatch):
    import app

    monkeypatch.delenv("MAGCACHE_HOST", raising=False)
    monkeypatch.delenv("MAGCACHE_PORT", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    monkeypatch.setenv("MAGCACHE_HOST", "0.0.0.0")
    monkeypatch.setenv("MAGCACHE_PORT", "8080")
    args = app.parse_args(["--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 8080, True)
    assert app.parse_args(["--port", "7000"]).port == 7000


def test_demo_tab_uses_the_trained_model_and_its_settings_when_present(tiny, tmp_path):
    import json

    folder = tmp_path / "demo_model"
    tiny("flux").save_pretrained(folder)
    (folder / "demo_settings.json").write_text(json.dumps({
        "height": 32, "width": 32, "num_inference_steps": 6, "true_cfg_scale": 3.0, "negative_prompt": "",
        "max_sequence_length": 16, "seed": 3, "example_prompts": ["red background, small blue circle at left"]}))
    m = ModelManager(tiny=True, demo_dir=folder)  # the trained demo model is used even with MAGCACHE_TINY
    d = tab_defaults(m, "demo", None)
    assert (d["height"], d["num_inference_steps"], d["guidance_scale"], d["seed"]) == (32, 6, 3.0, 3)
    assert d["prompt"] == d["examples"][0] == "red background, small blue circle at left"
    out = handlers.generate(m, "demo", {"prompt": d["prompt"], "steps": 6, "width": 32, "height": 32, "guidance": 3.0})
    result = out["result"]
    assert result.model == str(folder) and result.branches == ["cond", "uncond"]  # true CFG from the settings
    tab = m.catalog.tab("demo")
    call = build_call_kwargs(tab, tab.variant(), m.get("demo"), handlers.request_from_values("demo", {
        "prompt": "x", "steps": 6, "width": 32, "height": 32, "guidance": 3.0}))
    assert (call["true_cfg_scale"], call["negative_prompt"], call["max_sequence_length"]) == (3.0, "", 16)


def test_vace_controls_from_uploaded_files(manager, tmp_path):
    from magcache.studio.media import write_mp4

    rng = np.random.default_rng(0)
    control = write_mp4(rng.random((12, 32, 32, 3)), tmp_path / "control.mp4", fps=8)
    mask = write_mp4(np.ones((12, 32, 32, 3)), tmp_path / "mask.mp4", fps=8)
    ref = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(ref)
    req = handlers.request_from_values("wan_vace", _values("wan_vace", control_video=control, mask_video=mask,
                                                           reference_images=[str(ref)], steps=4))
    tab = manager.catalog.tab("wan_vace")
    call = build_call_kwargs(tab, tab.variant(), manager.get("wan_vace"), handlers.request_from_values(
        "wan_vace", _values("wan_vace", control_video=control, mask_video=mask, reference_images=[str(ref)],
                            width=16, height=16, num_frames=9, guidance=5.0)))
    assert len(call["video"]) == len(call["mask"]) == 9 and call["video"][0].size == (16, 16)
    assert call["mask"][0].mode == "L" and len(call["reference_images"]) == 1
    out = handlers.generate(manager, "wan_vace", _values("wan_vace", control_video=control, mask_video=mask,
                                                         reference_images=[str(ref)], steps=4))
    assert out["result"].cached.stats[0].completed and Path(out["split_video"]).is_file()
    assert req.reference_images == [str(ref)]


def test_demo_reads_plain_english_into_its_grammar_and_says_so(manager):
    out = handlers.generate(manager, "demo", _values("demo", prompt="a big red circle in the middle of a blue backdrop",
                                                       steps=4, compare=False))
    result = out["result"]
    assert result.request_notes[0].startswith("The demo model knows only its training grammar; your prompt ran as "
                                      "\"blue background, large red circle at center\"")
    assert "ran as" in out["status"]
    grammar = handlers.generate(manager, "demo", _values("demo", prompt="blue background, large red circle at center",
                                                         steps=4, compare=False))
    assert grammar["result"].request_notes == []  # a caption of the grammar runs as typed
    with pytest.raises(InvalidRequest, match="names no such shape. It does not know: cat, sofa"):
        handlers.generate(manager, "demo", _values("demo", prompt="a cat sitting on a sofa"))


def test_the_trained_demo_model_runs_known_words_as_typed(tmp_path_factory):
    # the shipped demo model reads plain English over its training words (its demo_settings.json lists them): such
    # a prompt runs as typed; one with words it never learned runs as the reader's caption, the note names them
    from pathlib import Path

    demo_dir = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
    trained = ModelManager(tiny=True, demo_dir=demo_dir)
    out = handlers.generate(trained, "demo", _values("demo", prompt="a big red circle in the middle of a blue backdrop",
                                                       steps=4, compare=False))
    assert "trained" in out["result"].model.lower() or "demo_model" in out["result"].model
    assert out["result"].request_notes == []  # no note: it ran as typed
    out = handlers.generate(trained, "demo", _values("demo", prompt="a giant red circle in the middle of a blue canvas",
                                                       steps=4, compare=False))
    assert out["result"].request_notes[0].startswith("The demo model never learned the words giant, canvas; your "
                                                     "prompt ran as \"blue background, large red circle at center\"")
    assert "ran as" in out["status"]


def test_timing_interleaves_pairs_and_keeps_the_first_pairs_outputs(manager):
    """Baseline and MagCache runs alternate (the handle is on for every second pipeline call), the speed-up is
    the median of the pairs, and the images are those of a single pair with the same seed."""
    from magcache.studio.comparison import Timing

    pipe = manager.get("flux").pipe
    cached_calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args: cached_calls.append(magcache.get_handle(pipe) is not None))
    try:
        out = handlers.generate(manager, "flux", _values("flux", timing_repeats=3))
    finally:
        hook.remove()
    runs = [on for i, on in enumerate(cached_calls) if i == 0 or on != cached_calls[i - 1]]
    assert runs == [False, True] * 3  # a warm-up, if any, merges with the first baseline
    result = out["result"]
    timing = result.timing
    assert timing.pairs == 3 and timing.baseline[0] == result.baseline.seconds
    assert timing.cached[0] == result.cached.seconds
    assert result.speedup == pytest.approx(float(np.median(np.array(timing.baseline) / np.array(timing.cached))))
    single = handlers.generate(manager, "flux", _values("flux"))
    assert np.array_equal(np.asarray(single["magcache_image"]), np.asarray(out["magcache_image"]))
    assert np.array_equal(np.asarray(single["baseline_image"]), np.asarray(out["baseline_image"]))
    assert out["timing"].set_index("Run").loc["MagCache", "Speed-up"].startswith(f"{timing.speedup:.2f}× ± ")
    assert f"Median of 3 baseline / MagCache pairs" in out["headline"]
    assert Timing([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]).speedup_spread == pytest.approx(0.75)


def test_a_speed_up_beyond_the_prediction_or_a_large_spread_is_flagged_as_a_busy_machine(manager):
    from magcache.studio import comparison
    from magcache.studio.comparison import Timing

    result = handlers.generate(manager, "flux", _values("flux"))["result"]
    assert result.timing.pairs == 1
    predicted = result.predicted_speedup
    result.timing = Timing([predicted * 1.5] * 3, [1.0] * 3)  # above what skipping blocks can give
    assert result.timing_is_noisy
    assert any("busy machine" in w for w in comparison._warnings(result))
    assert "Timing uncertain: the machine is busy" in handlers.headline_markdown(result)
    result.timing = Timing([1.0, 1.0, 1.5, 2.0], [1.0] * 4)  # pairs disagree by more than 10%
    assert result.timing_is_noisy and any("machine is busy" in w for w in comparison._warnings(result))
    result.timing = Timing([1.0, 1.01, 0.99], [1.0] * 3)
    assert not result.timing_is_noisy and "Timing uncertain" not in handlers.headline_markdown(result)


def test_timing_repeats_are_checked(manager):
    for bad in (0, 21, 2.5):
        with pytest.raises(InvalidRequest, match="Timing repeats"):
            handlers.generate(manager, "flux", _values("flux", timing_repeats=bad))
    assert handlers.request_from_values("flux", {"timing_repeats": "auto"}).timing_repeats is None


def test_typed_slider_values_out_of_range_are_refused_with_the_range():
    assert handlers.out_of_range("Steps", 1000, 2, 100) == "Steps takes 2 to 100; 1000 was not taken."
    assert "K takes 0 to 10" in handlers.out_of_range("K", -2, 0, 10)
    assert handlers.out_of_range("thresh", float("nan"), 0, 1) is not None
    assert handlers.out_of_range("Steps", 28, 2, 100) is None


def test_a_waiting_request_says_which_tab_holds_the_device():
    m = ModelManager(tiny=True)
    assert handlers.queue_text(m, 0) == "Waiting for the device (0 ahead)"
    with m.device_slot(who="FLUX.1"):
        text = handlers.queue_text(m, 1)
    assert text.startswith("Waiting for the device: the FLUX.1 tab has held it for ") and text.endswith(" s")
    assert m.device_holder() is None


def test_tiny_mode_shrinks_an_upload_to_the_tabs_size(manager):
    tab = manager.catalog.tab("flux_kontext")
    loaded = manager.get("flux_kontext")
    d = tab_defaults(manager, "flux_kontext")
    req = handlers.request_from_values("flux_kontext", _values("flux_kontext", image=Image.new("RGB", (512, 384))))
    from magcache.studio.request import validate

    kw = build_call_kwargs(tab, tab.variants[0], loaded, validate(tab, req, d))
    assert kw["image"].size == (d["width"], d["height"])


def test_a_typed_demo_weights_path_that_does_not_exist_is_an_error(manager):
    with pytest.raises(WeightsNotFound, match="'/nonexistent/model' is not a demo model folder"):
        handlers.generate(manager, "demo", _values("demo", weights="/nonexistent/model"))
