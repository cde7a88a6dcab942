"""Reliability on tiny offline pipelines, through the app's backend (``ui.handlers``, which the Gradio
events call): every bad input gets a clear message and nothing breaks; Stop, a client that goes away, an exception
at step k or an out-of-memory error leave no stale state and the next run equals a fresh run bit for bit;
concurrent requests give the outputs of sequential ones; a load for one request never pulls a model out from under
another."""

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import magcache
from magcache.calibration import CalibrationStore
from magcache.studio import manager as manager_module
from magcache.studio.request import InvalidRequest
from magcache.studio.manager import (GB, LoadedModel, ModelLoadError, ModelManager, OutOfMemory, WeightsNotFound)
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

from ui import handlers

STEPS = 6
IMAGE_TABS = ("flux_kontext", "wan_i2v", "framepack")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAGCACHE_OUTPUT_DIR", str(folder))
        yield folder


def new_manager(tmp_path_factory, **kwargs):
    return ModelManager(tiny=True, demo_dir=tmp_path_factory.mktemp("no_demo") / "demo_model", **kwargs)


@pytest.fixture(scope="module")
def manager(tmp_path_factory, outputs):
    return new_manager(tmp_path_factory)


def values(tab_id, **extra):
    v = {"prompt": "a red circle on a blue background", "steps": STEPS, "seed": 3, "compare": True}
    if tab_id in IMAGE_TABS:
        v["image"] = tiny_call_kwargs("flux_kontext")["image"]
    if tab_id == "framepack":
        v["num_frames"] = 13  # two sections
    v.update(extra)
    return v


def outputs_of(out):
    """The two runs' outputs as arrays (images or videos)."""
    r = out["result"]
    return [np.asarray(x.output, dtype=np.float32) if x is not None else None for x in (r.baseline, r.cached)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and np.array_equal(x, y)


def assert_clean(m, tab_id):
    """No stale state after a run ended in any way."""
    pipe = m.get(tab_id).pipe
    assert magcache.get_handle(pipe) is None and "_magcache_handle" not in pipe.transformer.__dict__
    assert getattr(pipe, "_interrupt", False) is False
    assert all(x.users == 0 for x in m.loaded())
    assert not m.device_busy


_fresh_cache = {}


def fresh(tmp_path_factory, tab_id, **extra):
    """The outputs of the same request on a brand-new manager (so nothing any earlier run did can leak in)."""
    key = (tab_id, json.dumps(extra, sort_keys=True))
    if key not in _fresh_cache:
        out = handlers.generate(new_manager(tmp_path_factory), tab_id, values(tab_id, **extra))
        _fresh_cache[key] = outputs_of(out)
    return _fresh_cache[key]


# --------------------------------------------------------------------------------------------------
# Bad input: a clear message, raised before the device or a model is touched
# --------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    ("flux", {"thresh": float("nan")}, "thresh must be a finite number"),
    ("flux", {"thresh": -0.1}, "thresh must be >= 0"),
    ("flux", {"thresh": 11}, "thresh must be at most 10"),
    ("flux", {"thresh": "a lot"}, "thresh must be a number"),
    ("flux", {"retention_ratio": 1.5}, "retention_ratio must be between 0 and 1"),
    ("flux", {"retention_ratio": float("inf")}, "retention_ratio must be a finite number"),
    ("flux", {"K": -1}, "K must be an integer >= 0"),
    ("flux", {"K": 2.5}, "K must be a whole number"),
    ("flux", {"K": 10_000}, "K must be at most 200"),
    ("flux", {"steps": 0}, "Steps must be a whole number from 2 to 200"),
    ("flux", {"steps": 1}, "from 2 to 200"),
    ("flux", {"steps": 10**9}, "from 2 to 200"),
    ("flux", {"steps": 8.5}, "Steps must be a whole number"),
    ("flux", {"steps": float("nan")}, "Steps must be a whole number"),
    ("flux", {"steps": "eight"}, "Steps must be a number"),
    ("flux", {"width": 40}, "Width must be a positive multiple of 16"),
    ("flux", {"height": 0}, "Height must be a positive multiple of 16"),
    ("flux", {"width": 4096}, "Width must be at most 2048"),
    ("chroma", {"height": -16}, "Height must be a positive multiple of 16"),
    ("hunyuan_video", {"width": 24}, "multiple of 16"),
    ("wan_t2v", {"num_frames": 10}, "4k\\+1 frames \\(e.g. 9 or 13\\)"),
    ("hunyuan_video", {"num_frames": 8}, "4k\\+1 frames"),
    ("wan_t2v", {"num_frames": 0}, "Frames must be a whole number from 1 to 257"),
    ("framepack", {"num_frames": 10_000}, "from 1 to 257"),
    ("flux", {"guidance": float("nan")}, "Guidance must be a number from 0 to 50"),
    ("flux", {"guidance": -1}, "Guidance must be a number"),
    ("flux", {"seed": 1.5}, "Seed must be a whole number"),
    ("flux", {"seed": 2**70}, "Seed must be a whole number"),
    ("flux", {"prompt": ""}, "Write a prompt first"),
    ("chroma", {"prompt": " \n "}, "Write a prompt first"),
    ("flux", {"prompt": "x" * 5000}, "Prompt is too long"),
    ("wan_i2v", {"image": None}, "needs an input image: upload one first"),
    ("flux_kontext", {"image": None}, "needs an input image"),
    ("framepack", {"image": None}, "needs an input image"),
]


@pytest.mark.parametrize("tab_id,bad,message", BAD_INPUTS, ids=[f"{t}-{list(b)[0]}={b[list(b)[0]]!r}"[:60]
                                                                  for t, b, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_message(manager, tab_id, bad, message):
    loaded_before = [m.key for m in manager.loaded()]
    with pytest.raises(InvalidRequest, match=message):
        handlers.generate(manager, tab_id, values(tab_id, **bad))
    assert [m.key for m in manager.loaded()] == loaded_before  # rejected before any model was loaded
    assert not manager.device_busy


def test_bad_uploads_get_clear_messages(manager, tmp_path):
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("certainly not a PNG")
    with pytest.raises(InvalidRequest, match="The input image: cannot read the image"):
        handlers.generate(manager, "wan_i2v", values("wan_i2v", image=str(not_an_image)))
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InvalidRequest, match="cannot read the image"):
        handlers.generate(manager, "flux_kontext", values("flux_kontext", image=str(truncated)))
    # 100 megapixels in a few KB: refused from the header, before a full decode
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InvalidRequest, match="too large \\(10000x10000 pixels"):
        handlers.generate(manager, "framepack", values("framepack", image=str(bomb)))
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: 60 MB on paper, nothing on disk
        f.truncate(60 * 1024**2)
    with pytest.raises(InvalidRequest, match="too large \\(60 MiB"):
        handlers.generate(manager, "wan_i2v", values("wan_i2v", image=str(huge)))
    with pytest.raises(InvalidRequest, match="cannot read the image"):
        handlers.generate(manager, "wan_i2v", values("wan_i2v", image=str(tmp_path / "gone.png")))
    broken_video = tmp_path / "control.mp4"
    broken_video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 2000)
    with pytest.raises(InvalidRequest, match="The control video: cannot read the video"):
        handlers.generate(manager, "wan_vace", values("wan_vace", control_video=str(broken_video)))
    refs = [tiny_call_kwargs("flux_kontext")["image"]] * 9
    with pytest.raises(InvalidRequest, match="At most 8 reference images"):
        handlers.generate(manager, "wan_vace", values("wan_vace", reference_images=refs))
    with pytest.raises(InvalidRequest, match="reference image 1: cannot read the image"):
        handlers.generate(manager, "wan_vace", values("wan_vace", reference_images=[str(not_an_image)]))
    assert not manager.device_busy


def test_calibration_curves_of_the_wrong_length_are_refused(manager, tmp_path, monkeypatch):
    store = CalibrationStore(tmp_path / "store")
    record = {"format": "magcache-studio calibration", "version": 1, "model": "tiny", "preset": "flux", "num_steps": 10,
              "resolution": {"height": 32, "width": 32, "frames": 1}, "scheduler": "FlowMatchEulerDiscreteScheduler",
              "cfg": False, "branches": {"cond": {"mag_ratios": [1.0] + [0.95] * 7}}}
    with pytest.raises(ValueError, match="branches.cond.mag_ratios has 8 values but num_steps is 10"):
        store.import_text(json.dumps(record))
    assert store.list() == []  # nothing written
    # a curve chosen for a run that MagCache cannot use (files are validated, so one is put in): a message, a clean pipe
    from magcache.studio import comparison

    bad_curve = SimpleNamespace(curves=[[1.0]], rules=None, options={}, label="bad file")
    monkeypatch.setattr(comparison, "curve_for_job", lambda job: bad_curve)
    with pytest.raises(InvalidRequest, match="ratio curve: each ratio curve needs at least 2"):
        handlers.generate(manager, "flux", values("flux", curve="file"))
    assert_clean(manager, "flux")


def test_missing_and_wrong_model_paths(tmp_path):
    m = ModelManager(tiny=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    answers = {}
    for name in ("no-such-model", "empty", "notes.txt", "no-such.txt"):
        with pytest.raises(WeightsNotFound, match="is not a diffusers pipeline folder") as err:
            handlers.generate(m, "flux", values("flux", weights=str(tmp_path / name)))
        answers[name] = str(err.value).replace(str(tmp_path / name), "<path>")
    # A missing path, a folder of something else and a file of another kind get the same answer: the message
    # tells nothing about the server's files beyond what was typed.
    assert len(set(answers.values())) == 1, answers
    (tmp_path / "broken.safetensors").write_bytes(b"\x80\x04" + b"\x00" * 64)
    checkpoints = set()
    for name in ("missing.safetensors", "broken.safetensors"):
        with pytest.raises(WeightsNotFound, match="not a valid .safetensors checkpoint") as err:
            m.plan("flux", weights=str(tmp_path / name))
        checkpoints.add(str(err.value).replace(name, "<name>"))
    assert len(checkpoints) == 1, checkpoints
    assert m.loaded() == [] and not m.device_busy


def test_a_checkpoint_of_the_wrong_architecture_gets_a_clear_message(tmp_path, outputs):
    from safetensors.torch import save_file

    base = tmp_path / "flux_base"
    build_tiny_pipeline("flux").save_pretrained(base)
    wan = tmp_path / "wan_transformer.safetensors"  # a Wan transformer offered to the FLUX tab
    save_file({k: v.contiguous() for k, v in build_tiny_pipeline("wan_t2v").transformer.state_dict().items()}, wan)
    m = ModelManager(tiny=False)
    with pytest.raises(ModelLoadError) as err:
        handlers.generate(m, "flux", values("flux", weights=str(wan), base=str(base), width=32, height=32))
    message = str(err.value)
    assert "wan_transformer.safetensors could not be loaded as a FluxTransformer2DModel checkpoint" in message
    assert "another model architecture" in message and "Loader error:" in message
    assert m.loaded() == [] and not m.device_busy
    wan_folder = tmp_path / "wan_pipeline"  # a whole pipeline folder of another model
    build_tiny_pipeline("wan_t2v").save_pretrained(wan_folder)
    with pytest.raises(ModelLoadError, match="wan_pipeline could not be loaded as a FluxPipeline. Check that the "
                                             "Weights field .* points at a FLUX model"):
        handlers.generate(m, "flux", values("flux", weights=str(wan_folder), width=32, height=32))
    assert m.loaded() == [] and not m.device_busy
    # the same app keeps serving: the base folder itself loads and runs
    out = handlers.generate(m, "flux", values("flux", weights=str(base), width=32, height=32))
    assert out["result"].cached.stats[0].completed


# --------------------------------------------------------------------------------------------------
# Stop, client gone, exception at step k: no stale state, the next run equals a fresh run
# --------------------------------------------------------------------------------------------------
INTERRUPTIONS = [
    ("demo", "baseline", "stop"),
    ("demo", "magcache", "stop"),
    ("demo", "baseline", "client_gone"),
    ("demo", "magcache", "client_gone"),
    ("demo", "baseline", "exception"),
    ("demo", "magcache", "exception"),
    ("wan_t2v", "magcache", "exception"),
    ("framepack", "magcache", "exception"),  # step 9 of 12: in the second section
]


@pytest.mark.parametrize("tab_id,phase,how", INTERRUPTIONS)
def test_interrupted_runs_leave_no_state_behind(manager, tmp_path_factory, tab_id, phase, how):
    session, k = f"s-{tab_id}-{phase}-{how}", (9 if tab_id == "framepack" else 3)
    gone = threading.Event()
    seen = []

    def at_step(p, done, total):
        seen.append((p, done))
        if p == phase and done == k:
            if how == "stop":
                handlers.stop(manager, session)
            elif how == "client_gone":
                gone.set()
            else:
                raise RuntimeError(f"injected failure at {phase} step {k}")

    if how == "exception":
        with pytest.raises(RuntimeError, match="injected failure"):
            handlers.generate(manager, tab_id, values(tab_id), session, at_step)
    else:
        out = handlers.generate(manager, tab_id, values(tab_id), session, at_step,
                                still_wanted=lambda: not gone.is_set())
        assert out["status"].startswith("⏹ **Stopped**") and f"after step {k} of" in out["status"]
    assert (phase, k + 1) not in seen  # it stopped right there
    assert_clean(manager, tab_id)
    assert handlers.stop(manager, session) == "Nothing is running in this tab."
    assert_same(outputs_of(handlers.generate(manager, tab_id, values(tab_id), session)),
                fresh(tmp_path_factory, tab_id))


JOB_INTERRUPTIONS = [("calibration", "stop"), ("calibration", "exception"), ("sweep", "stop"), ("sweep", "exception")]


@pytest.mark.parametrize("kind,how", JOB_INTERRUPTIONS)
def test_interrupted_calibrations_and_sweeps_leave_no_state_behind(manager, tmp_path_factory, tmp_path, monkeypatch,
                                                                     kind, how):
    """Calibration and sweep run through the same device job as a comparison: stopped or failed at step 3 (the
    calibration) or at the second point (the sweep, with its MagCache handle on the pipeline), the model is left
    as a fresh one and nothing is saved."""
    from magcache.studio import tuning as backend
    from magcache.studio.manager import Cancelled

    monkeypatch.setenv("MAGCACHE_HOME", str(tmp_path / "home"))
    stop = threading.Event()
    req = handlers.request_from_values("demo", values("demo"))

    def at(phase, done, total):
        hit = (phase == "calibration" and done == 3) if kind == "calibration" else phase.startswith("Sweep 2/")
        if hit:
            if how == "stop":
                stop.set()
            else:
                raise RuntimeError(f"injected failure in the {kind}")

    if kind == "calibration":
        with pytest.raises(Cancelled if how == "stop" else RuntimeError, match="step 3 of|injected"):
            backend.run_calibration(manager, req, stop, at)
        assert not (tmp_path / "home").exists()  # nothing saved
    elif how == "stop":
        run = backend.run_tab_sweep(manager, req, [0.05, 0.1], [2], [], stop, at)
        assert run.result.cancelled and len(run.result.rows) == 1
    else:
        with pytest.raises(RuntimeError, match="injected"):
            backend.run_tab_sweep(manager, req, [0.05, 0.1], [2], [], stop, at)
    assert_clean(manager, "demo")
    assert_same(outputs_of(handlers.generate(manager, "demo", values("demo"))), fresh(tmp_path_factory, "demo"))


def test_a_failure_in_one_tab_leaves_the_others_alone(manager, tmp_path_factory):
    before = outputs_of(handlers.generate(manager, "chroma", values("chroma")))

    def explode(phase, done, total):
        if phase == "magcache" and done == 2:
            raise ValueError("injected")

    with pytest.raises(ValueError):
        handlers.generate(manager, "flux", values("flux"), "s", explode)
    assert_same(outputs_of(handlers.generate(manager, "chroma", values("chroma"))), before)
    assert_same(before, fresh(tmp_path_factory, "chroma"))


# --------------------------------------------------------------------------------------------------
# Out of memory (simulated: torch raises the same error class as a real CUDA OOM)
# --------------------------------------------------------------------------------------------------
def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def test_out_of_memory_during_a_run_frees_memory_and_says_what_to_change(tmp_path_factory, outputs, monkeypatch):
    m = new_manager(tmp_path_factory)
    m.get("chroma")  # another model, idle: unloaded to make room
    freed = []
    real_free = manager_module.free_memory
    monkeypatch.setattr(manager_module, "free_memory", lambda: (freed.append(1), real_free()))

    def oom_at_step_3(phase, done, total):
        if phase == "baseline" and done == 3:
            raise _oom()

    with pytest.raises(OutOfMemory) as err:
        handlers.generate(m, "wan_t2v", values("wan_t2v"), "s", oom_at_step_3)
    message = str(err.value)
    assert message.startswith("Out of memory while running the baseline")
    assert "a lower resolution or fewer frames" in message and "Compare with baseline" in message
    assert "keeps running" in message and "20.00 GiB" in message
    assert freed and [x.plan.tab_id for x in m.loaded()] == ["wan_t2v"]  # the idle model went, the tab's stayed
    assert_clean(m, "wan_t2v")
    assert_same(outputs_of(handlers.generate(m, "wan_t2v", values("wan_t2v"))), fresh(tmp_path_factory, "wan_t2v"))


def test_out_of_memory_mentions_offload_on_a_gpu():
    from magcache.studio.catalog import load_catalog
    from magcache.studio.manager import out_of_memory_message

    text = out_of_memory_message(load_catalog().tab("flux"), "loading the model", "CUDA out of memory", "cuda")
    assert "MAGCACHE_OFFLOAD=model" in text and "a lower resolution" in text and "fewer frames" not in text


def _fake(plan, size_gb=0.001):
    return LoadedModel(plan, pipe=object(), bytes=int(size_gb * GB), placement=None, load_seconds=0.0)


def test_out_of_memory_at_load_unloads_the_others_and_retries_once():
    calls = []

    def loader(plan):
        calls.append(plan.tab_id)
        if plan.tab_id == "chroma" and m.loaded():
            raise _oom()
        return _fake(plan)

    m = ModelManager(tiny=True, loader=loader)
    m.get("flux")
    loaded = m.get("chroma")  # first try OOMs with FLUX resident: FLUX is unloaded, the second try fits
    assert calls == ["flux", "chroma", "chroma"] and [x.key for x in m.loaded()] == [loaded.key]
    assert any(e.startswith("out of memory loading chroma1_hd") for e in m.events)


def test_out_of_memory_at_load_that_persists_is_reported_and_the_app_keeps_serving():
    def loader(plan):
        if plan.tab_id == "chroma":
            raise _oom()
        return _fake(plan)

    m = ModelManager(tiny=True, loader=loader)
    with pytest.raises(OutOfMemory, match="Out of memory while loading the model .*a lower resolution"):
        m.get("chroma")
    assert m.loaded() == []
    assert m.get("flux").plan.tab_id == "flux"


def test_the_ui_turns_backend_errors_into_clear_messages(manager, monkeypatch, caplog):
    import gradio as gr

    import ui

    app = ui.build_app(manager)
    fn = next(f for f in app.fns.values() if f.api_name == "generate_flux").fn
    request = SimpleNamespace(session_hash="ui-test")
    call = dict(values("flux"), request=request, progress=lambda *a, **k: None)

    for error, title in ((OutOfMemory("Out of memory while running the baseline (CUDA)."), "Out of memory"),
                         (InvalidRequest("Write a prompt first."), "Cannot run"),
                         (KeyError("something unexpected"), "Run failed")):
        monkeypatch.setattr(handlers, "generate", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        with pytest.raises(gr.Error) as err:
            fn(**call)
        assert err.value.title == title
    assert "KeyError" in str(err.value) and "next run starts clean" in str(err.value)
    assert "generate flux failed" in caplog.text  # the unexpected one is logged with its traceback
    monkeypatch.undo()
    out = fn(**call)  # the real handler again: it runs
    assert any("Done" in str(v) for v in out.values())


# --------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------
CONCURRENT = [("demo", {"seed": 1}), ("flux", {"seed": 2}), ("chroma", {"seed": 3}), ("wan_t2v", {"seed": 4}),
              ("demo", {"seed": 1, "thresh": 0.1}), ("flux", {"seed": 2, "compare": False})]


def test_concurrent_requests_equal_sequential_ones(tmp_path_factory, outputs):
    sequential = new_manager(tmp_path_factory)
    expected = [outputs_of(handlers.generate(sequential, tab, values(tab, **extra))) for tab, extra in CONCURRENT]

    concurrent = new_manager(tmp_path_factory)
    results, errors = [None] * len(CONCURRENT), []
    start = threading.Barrier(len(CONCURRENT))

    def worker(i, tab, extra):
        try:
            start.wait(10)
            results[i] = outputs_of(handlers.generate(concurrent, tab, values(tab, **extra), session=f"user-{i}"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{tab}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i, tab, extra)) for i, (tab, extra) in enumerate(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and all(r is not None for r in results)
    for got, want in zip(results, expected):
        assert_same(got, want)
    assert all(m.users == 0 for m in concurrent.loaded()) and not concurrent.device_busy


def test_a_load_for_another_request_never_unloads_a_model_in_use(tmp_path_factory, outputs):
    # budget for one tiny model: loading a second one would normally evict the first
    m = new_manager(tmp_path_factory, budget_gb=0.0015)
    at_step, go = threading.Event(), threading.Event()
    result = {}

    def hold_at_step_3(phase, done, total):
        if phase == "magcache" and done == 3:
            at_step.set()
            assert go.wait(30)

    def run():
        try:
            result["out"] = handlers.generate(m, "flux", values("flux"), "a", hold_at_step_3)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert at_step.wait(60)
        flux_key = m.loaded()[0].key
        m.get("chroma")  # another caller loads a model meanwhile: over budget, but FLUX is in use
        m.unload_all()  # and someone presses Unload all models
        assert flux_key in [x.key for x in m.loaded()]
        assert "running, unloads when its run ends" in handlers.system_markdown(m)
        pipe = m.loaded()[0].pipe
        assert magcache.get_handle(pipe) is not None  # its run's cache state is intact
    finally:
        go.set()
        thread.join(60)
    assert "error" not in result, result.get("error")
    assert_same(outputs_of(result["out"]), fresh(tmp_path_factory, "flux"))
    assert flux_key not in [x.key for x in m.loaded()]  # the deferred unload happened when the run ended
    assert m.used_bytes() <= m.budget_bytes and not m.device_busy
