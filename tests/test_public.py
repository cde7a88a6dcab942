"""Public mode and the admission of a request: no server paths or hub ids from visitors, calibrations kept per
visitor, strict parsing of every field, the compute budget and the per-client limit, both refused before the
request waits for the device; and the disk housekeeping."""

import os
import threading
import time
from pathlib import Path

import pytest

from magcache.calibration import CalibrationStore
from magcache.studio import housekeeping, public
from magcache.studio.manager import ModelManager, WeightsNotFound
from magcache.studio.request import InvalidRequest
from magcache.studio.tuning import CALIBRATION_PREFIX

from ui import handlers

DEMO_PROMPT = "a red circle on a blue background"  # the demo model reads shapes and colours
SMALL = {"prompt": DEMO_PROMPT, "steps": 4, "width": 32, "height": 32, "guidance": 3.0}


@pytest.fixture
def manager(tmp_path):
    return ModelManager(tiny=True, demo_dir=tmp_path / "no-demo-model")


@pytest.fixture
def public_on(monkeypatch, tmp_path):
    for name in ("MAGCACHE_PUBLIC", "MAGCACHE_SHARED_CALIBRATIONS", "MAGCACHE_BUDGET_CPU", "MAGCACHE_CLIENT_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/magcache-studio")
    monkeypatch.setenv("MAGCACHE_SESSION_DIR", str(tmp_path / "sessions"))
    assert public.public_mode()


def test_public_mode_follows_space_id_and_the_flag(monkeypatch):
    monkeypatch.delenv("MAGCACHE_PUBLIC", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not public.public_mode()
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert public.public_mode()
    monkeypatch.setenv("MAGCACHE_PUBLIC", "0")  # the owner of a private Space turns it off
    assert not public.public_mode()
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("MAGCACHE_PUBLIC", "1")
    assert public.public_mode()


def test_public_mode_refuses_model_sources_and_hides_the_fields(public_on, manager, tmp_path):
    for fields in ({"weights": "/root"}, {"weights": "black-forest-labs/FLUX.1-dev"}, {"base": str(tmp_path)},
                   {"weights": "~", "base": "x/y"}):
        with pytest.raises(InvalidRequest, match="This is a public instance: the .* cannot be set here"):
            handlers.generate(manager, "flux", dict(SMALL, **fields))
    with pytest.raises(InvalidRequest, match="public instance"):  # the tuning panel's calibration too
        from ui import tuning

        tuning.calibrate_tab(manager, "flux", dict(SMALL, weights="/root"))
    assert manager.loaded() == []
    out = handlers.generate(manager, "flux", dict(SMALL, weights="  "))  # an empty field is no source
    assert "Done" in out["status"]

    import ui

    app = ui.build_app(manager)
    weights = [b for b in app.blocks.values() if getattr(b, "label", None) == "Weights"]
    accordions = [b for b in app.blocks.values() if getattr(b, "label", None) == "Model source"]
    assert weights and accordions and not any(a.visible for a in accordions)


def test_public_mode_previews_and_budgets_the_tuning_panel_on_the_catalog_model(public_on, manager, monkeypatch):
    from magcache.studio import tuning as backend
    from ui import tuning

    planned = []
    real_plan = manager.plan
    monkeypatch.setattr(manager, "plan", lambda *a, **k: planned.append(a) or real_plan(*a, **k))
    preview = dict(SMALL, thresh=0.1, retention_ratio=0.2, K=2, weights="/root", base="/etc")
    assert backend.tab_inputs(manager, "flux", preview).plan.key == real_plan("flux").key
    assert handlers.live_preview(manager, "flux", preview)[0] is not None
    assert not any("/root" in map(str, a) or "/etc" in map(str, a) for a in planned)  # never even looked at
    monkeypatch.setenv("MAGCACHE_BUDGET_CPU", str(32 * 32 * 4))  # one run of SMALL (FLUX: one pass) fits
    with pytest.raises(InvalidRequest, match="32x32 x 5 steps x 1 run x 1 pass per step = 5,120 pixel-steps"):
        tuning.calibrate_tab(manager, "flux", dict(SMALL, steps=5))  # with Compare on: still one run
    assert tuning.calibrate_tab(manager, "flux", SMALL)["calibration"] is not None


def test_local_mode_keeps_model_sources(monkeypatch, manager, tmp_path):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("MAGCACHE_PUBLIC", raising=False)
    with pytest.raises(WeightsNotFound, match="is not a diffusers pipeline folder"):
        ModelManager(tiny=False).plan("flux", weights=str(tmp_path))
    import ui

    app = ui.build_app(manager)
    assert all(b.visible for b in app.blocks.values() if getattr(b, "label", None) == "Model source")


def test_the_demo_tab_never_runs_a_stand_in_for_a_typed_path(manager, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    for typed in ("/etc", str(tmp_path / "missing"), str(tmp_path / "other")):
        with pytest.raises(WeightsNotFound, match="is not a demo model folder"):
            handlers.generate(manager, "demo", dict(SMALL, weights=typed))
    out = handlers.generate(manager, "demo", SMALL)  # nothing typed: the tiny stand-in, with a note saying so
    assert "demo model is not at" in out["details"]


def test_calibrations_are_kept_per_visitor_in_public_mode(public_on, monkeypatch, tmp_path):
    a, b = public.calibration_root("session-a"), public.calibration_root("session-b")
    assert a != b and a.parent.parent == tmp_path / "sessions"
    assert public.calibration_root("session-a") == a
    assert public.calibration_root("../../etc").parent.parent == tmp_path / "sessions"  # a hash, not a path
    assert public.calibration_root().parent.name != a.parent.name  # no event: an empty store
    monkeypatch.setenv("MAGCACHE_SHARED_CALIBRATIONS", "1")  # the owner shares one store
    assert public.calibration_root("session-a") == CalibrationStore().root
    monkeypatch.setenv("MAGCACHE_SHARED_CALIBRATIONS", "0")
    monkeypatch.setenv("MAGCACHE_PUBLIC", "0")
    assert public.calibration_root("session-a") == CalibrationStore().root  # local: the user store


def test_the_tuning_backend_keeps_only_so_many_visitor_stores_in_memory(public_on, monkeypatch):
    from magcache.studio import tuning

    monkeypatch.setattr(tuning, "_stores", type(tuning._stores)())
    roots = []
    for i in range(tuning.MAX_KEPT_STORES + 5):
        monkeypatch.setattr(public, "current_session", lambda i=i: f"visitor-{i}")
        roots.append(tuning.calibration_store().root)
        assert tuning.calibration_store() is tuning.calibration_store()  # kept while in use
    assert len(set(roots)) == len(roots) and len(tuning._stores) == tuning.MAX_KEPT_STORES
    assert list(tuning._stores) == roots[-tuning.MAX_KEPT_STORES:]  # the least recently used went first


def test_the_tuning_panel_reads_the_visitors_store(public_on, manager, monkeypatch):
    from ui import tuning

    monkeypatch.setattr(public, "current_session", lambda: "visitor-1")
    mine = tuning.calibrate_tab(manager, "flux", SMALL, session="visitor-1")["calibration"]
    assert mine is not None and CalibrationStore(public.calibration_root("visitor-1")).load(mine.id).id == mine.id
    ids = [value for _, value in tuning.curve_options(manager, "flux")]
    assert CALIBRATION_PREFIX + mine.id in ids
    monkeypatch.setattr(public, "current_session", lambda: "visitor-2")
    ids = [value for _, value in tuning.curve_options(manager, "flux")]
    assert CALIBRATION_PREFIX + mine.id not in ids  # another visitor never sees it


# --------------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,flag", [("false", False), ("FALSE", False), ("0", False), ("off", False), (0, False),
                                       (False, False), ("true", True), ("1", True), (1, True), (True, True)])
def test_flags_parse_strictly(text, flag):
    assert public.parse_flag(text, "Compare with baseline") is flag


@pytest.mark.parametrize("bad", ["maybe", 2, 0.5, [], {"a": 1}])
def test_flags_refuse_anything_else(bad):
    with pytest.raises(InvalidRequest, match="Compare with baseline must be true or false"):
        public.parse_flag(bad, "Compare with baseline")


def test_every_field_parses_strictly_and_the_next_request_is_unaffected(manager):
    out = handlers.generate(manager, "flux", dict(SMALL, compare="false"))
    assert out["result"].baseline is None  # "false" is not read as True
    bad = [({"compare": "maybe"}, "Compare with baseline must be true or false"),
           ({"prompt": "a \ud800 b"}, "Prompt contains characters that are not valid Unicode"),
           ({"prompt": "a\x00b"}, "Prompt contains a NUL character"),
           ({"negative_prompt": 5}, "Negative prompt must be text"),
           ({"weights": "/x" * 2600}, r"Weights is too long \(5200 characters; the limit is 1024\)"),
           ({"base": "a\x00"}, "Base pipeline contains a NUL"),
           ({"variant": ["x"]}, "Model variant must be text"),
           ({"variant": "no such variant"}, "has no variant 'no such variant'"),
           ({"steps": "hf_abc"}, "Steps must be a number"),
           ({"steps": True}, "Steps must be a number"),
           ({"guidance": "1e400"}, "Guidance must be a number from 0 to 50")]
    for fields, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            handlers.generate(manager, "flux", dict(SMALL, **fields))
        assert not manager.device_busy
    out = handlers.generate(manager, "flux", SMALL)
    assert out["result"].baseline is not None and out["result"].cached.stats[0].completed


# --------------------------------------------------------------------------------------------------
# Budget and per-client limit: refused at once, even while the device is busy
# --------------------------------------------------------------------------------------------------
def _hold_device(manager):
    """Hold the device slot in another thread until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with manager.device_slot():
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_over_budget_requests_are_refused_at_once_with_the_limit(public_on, manager, monkeypatch):
    monkeypatch.setenv("MAGCACHE_BUDGET_CPU", str(32 * 32 * 4 * 2))  # SMALL (FLUX: one pass) with the baseline fits
    release, thread = _hold_device(manager)
    try:
        t0 = time.monotonic()
        with pytest.raises(InvalidRequest) as err:
            handlers.generate(manager, "flux", dict(SMALL, steps=5))
        assert time.monotonic() - t0 < 5  # not after the device's current run
        text = str(err.value)
        assert "32x32 x 5 steps x 2 runs x 1 pass per step = 10,240 pixel-steps" in text
        assert "the limit on this CPU is 8,192 (MAGCACHE_BUDGET_CPU)" in text
        assert "turn off Compare with baseline" in text and "fewer steps" in text
        with pytest.raises(InvalidRequest, match="over this server's compute budget"):
            handlers.generate(manager, "wan_t2v", dict(SMALL, num_frames=5))  # frames count
    finally:
        release.set()
        thread.join()
    assert "Done" in handlers.generate(manager, "flux", SMALL)["status"]  # at the limit
    assert "Done" in handlers.generate(manager, "flux", dict(SMALL, steps=8, compare=False))["status"]
    monkeypatch.setenv("MAGCACHE_BUDGET_CPU", "0")  # no limit
    assert "Done" in handlers.generate(manager, "flux", dict(SMALL, steps=8))["status"]


def test_budget_defaults_per_device_kind(public_on, monkeypatch):
    assert public.budget("cpu") == public.DEFAULT_BUDGET["cpu"] < public.budget("cuda:0") == public.DEFAULT_BUDGET["gpu"]
    monkeypatch.setenv("MAGCACHE_BUDGET_GPU", "1e6")
    assert public.budget("cuda") == 10**6
    monkeypatch.setenv("MAGCACHE_PUBLIC", "0")
    assert public.budget("cpu") == 0  # local: no limit unless set


def test_a_client_may_queue_only_so_many_requests(public_on, manager, monkeypatch):
    monkeypatch.setenv("MAGCACHE_CLIENT_QUEUE", "2")
    release, thread = _hold_device(manager)
    results, workers = [], []
    try:
        for i in range(2):
            w = threading.Thread(target=lambda i=i: results.append(
                handlers.generate(manager, "flux", dict(SMALL, seed=i), session=f"a{i}", client="10.0.0.1")))
            w.start()
            workers.append(w)
        deadline = time.monotonic() + 10
        while public.CLIENTS.active("10.0.0.1") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(InvalidRequest, match=r"You already have 2 requests waiting or running .* limit is 2"):
            handlers.generate(manager, "flux", SMALL, session="a3", client="10.0.0.1")
        assert time.monotonic() - t0 < 5
        other = threading.Thread(target=lambda: results.append(
            handlers.generate(manager, "flux", SMALL, session="b", client="10.0.0.2")))  # another client: admitted
        other.start()
        workers.append(other)
    finally:
        release.set()
        thread.join()
        for w in workers:
            w.join(120)
    assert len(results) == 3 and all("Done" in r["status"] for r in results)
    assert public.CLIENTS.active("10.0.0.1") == 0
    assert "Done" in handlers.generate(manager, "flux", SMALL, client="10.0.0.1")["status"]


def test_the_client_is_the_peer_or_the_proxys_last_hop(public_on, monkeypatch):
    from types import SimpleNamespace

    req = SimpleNamespace(client=SimpleNamespace(host="10.1.1.1"), headers={"x-forwarded-for": "6.6.6.6, 1.2.3.4"})
    assert public.client_id(req) == "1.2.3.4"  # the first entry is whatever the client wrote
    monkeypatch.setenv("MAGCACHE_PUBLIC", "0")
    assert public.client_id(req) == "10.1.1.1"


# --------------------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------------------
def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_sweep_deletes_by_age_then_oldest_first_by_size(tmp_path):
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    old = _file(outputs / "run-1" / "a.mp4", 100)
    now = time.time()
    limits = housekeeping.Limits(every_s=1, max_age_s=3600, max_bytes=1000, min_age_s=60)
    assert housekeeping.sweep([outputs], limits, now=now).deleted_files == 0  # young, small: kept
    report = housekeeping.sweep([outputs, tmp_path / "missing"], limits, now=now + 3601 + 10)
    assert report.deleted_files == 1 and not old.exists() and not (outputs / "run-1").exists()  # with its folder

    files = []
    for i in range(3):  # created one after the other: oldest first
        files.append(_file(cache / f"h{i}" / "image.png", 400))
        time.sleep(0.05)
    later = time.time() + 600  # all older than min_age, none older than max_age
    report = housekeeping.sweep([cache], housekeeping.Limits(1, 10**6, 1000, 60), now=later)
    assert [p.exists() for p in files] == [False, True, True] and report.kept_bytes[str(cache)] == 800
    fresh = _file(cache / "fresh" / "x.bin", 5000)  # over the size bound alone, but younger than min_age: kept
    housekeeping.sweep([cache], limits, now=time.time())
    assert fresh.exists()
    housekeeping.sweep([cache], limits, now=time.time() + 61)
    assert not fresh.exists()


def test_the_janitor_sweeps_on_its_schedule(tmp_path):
    folder = tmp_path / "outputs"
    first = _file(folder / "a" / "one.mp4", 10)
    janitor = housekeeping.Janitor([folder], housekeeping.Limits(every_s=0.2, max_age_s=0.5, max_bytes=10**9,
                                                                 min_age_s=0.5)).start()
    try:
        deadline = time.monotonic() + 10
        while first.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not first.exists()
    finally:
        janitor.stop()


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAGCACHE_CLEANUP_EVERY_S", "10")
    monkeypatch.setenv("MAGCACHE_MAX_FILE_AGE_S", "30")
    monkeypatch.setenv("MAGCACHE_MAX_DISK_MB", "1")
    assert housekeeping.Limits.from_env() == housekeeping.Limits(10, 30, 1024**2, 30)
    monkeypatch.setenv("MAGCACHE_MAX_DISK_MB", "lots")
    with pytest.raises(ValueError, match="MAGCACHE_MAX_DISK_MB must be a number"):
        housekeeping.Limits.from_env()


# --------------------------------------------------------------------------------------------------
# Through the real server
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def public_server(tmp_path_factory):
    from types import SimpleNamespace

    from bench.loadtest import start_app

    folder = tmp_path_factory.mktemp("public-server")
    env = {"MAGCACHE_PUBLIC": "1", "MAGCACHE_BUDGET_CPU": str(32 * 32 * 8 * 2 * 2),
           "MAGCACHE_SESSION_DIR": str(folder / "sessions"), "GRADIO_TEMP_DIR": str(folder / "gradio")}
    with start_app(folder / "app.log", env=env) as url:
        yield SimpleNamespace(url=url, log=folder / "app.log")


def test_a_public_server_refuses_sources_and_over_budget_requests(public_server):
    import json
    import urllib.request

    from gradio_client import Client

    with urllib.request.urlopen(f"{public_server.url}config", timeout=10) as r:
        config = json.loads(r.read())
    sources = [c for c in config["components"] if c.get("props", {}).get("label") == "Model source"]
    assert sources and not any(c["props"].get("visible", True) for c in sources)  # hidden in every tab
    client = Client(public_server.url, verbose=False, download_files=False)
    with pytest.raises(Exception, match="This is a public instance: the Weights field cannot be set here"):
        client.predict(prompt=DEMO_PROMPT, width=32, height=32, steps=4, weights="/root", api_name="/generate_demo")
    with pytest.raises(Exception, match="the Base pipeline field cannot be set here"):
        client.predict(prompt="x", base="black-forest-labs/FLUX.1-dev", api_name="/generate_flux")
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"over this server.*s compute budget: 64x64 x 8 steps x 2 runs x 2 passes per step = "
                                          r"131,072 pixel-steps; the limit on this CPU is 32,768"):
        client.predict(prompt=DEMO_PROMPT, width=64, height=64, steps=8, api_name="/generate_demo")
    assert time.monotonic() - t0 < 10
    result = client.predict(prompt=DEMO_PROMPT, width=32, height=32, steps=8, api_name="/generate_demo")  # at the limit
    assert any("Done" in str(v) for v in result)
    client.close()
    assert "public mode on; compute budget 32,768 pixel-steps" in public_server.log.read_text()


def test_disk_use_stays_flat_over_a_soak(tmp_path):
    """Video runs through the real server with housekeeping on a short schedule (``bench/soak.py``)."""
    from bench.soak import soak

    report = soak(runs=16, every_s=1.0, max_age_s=2.0, bound_mb=0.8, deadline_s=240, folder=tmp_path)
    assert report.passed, report.text()
    assert len(report.samples_kb) == 16 and report.written_kb > 2 * report.bound_kb
