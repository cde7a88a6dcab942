"""Security: user weights only from safetensors (never pickle), uploads confined to the upload folder,
no path traversal through calibration ids, the server binds to loopback and serves no extra folder, and access
tokens never reach a message or a log line. The last checks run against the real server (app.py, tiny mode)."""

import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from magcache.calibration import CalibrationStore
from magcache.studio.request import InvalidRequest
from magcache.studio.manager import ModelLoadError, ModelManager, WeightsNotFound, redact
from magcache.studio.media import MediaError, confine_upload
from magcache.studio.tiny import build_tiny_pipeline

from ui import handlers

FAKE_TOKEN = "hf_" + "Zq8xTESTtokenNOTreal" * 2
ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPT = "a red circle on a blue background"  # the demo model reads shapes and colours


@pytest.fixture
def no_pickle(monkeypatch):
    """torch.load is how pickle weights get in: any call fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


# --------------------------------------------------------------------------------------------------
# Weights: safetensors only
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_checkpoints_are_refused_before_loading(tmp_path, suffix, no_pickle):
    ckpt = tmp_path / f"transformer{suffix}"
    ckpt.write_bytes(b"\x80\x04\x95 pretend pickle")
    m = ModelManager(tiny=False)
    with pytest.raises(WeightsNotFound, match=f"{suffix} checkpoints are pickle files, which can run code"):
        m.plan("flux", weights=str(ckpt))
    with pytest.raises(WeightsNotFound, match="Use a .safetensors checkpoint"):
        handlers.generate(m, "wan_t2v", {"prompt": "x", "weights": str(ckpt)})
    assert m.loaded() == [] and no_pickle == []


def test_a_pickle_file_named_safetensors_is_refused(tmp_path, no_pickle):
    fake = tmp_path / "transformer.safetensors"
    fake.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle stream does not parse as a safetensors header
    with pytest.raises(WeightsNotFound, match="not a valid .safetensors checkpoint"):
        ModelManager(tiny=False).plan("flux", weights=str(fake))
    with pytest.raises(WeightsNotFound, match="or a single-file .safetensors checkpoint that this app can read"):
        ModelManager(tiny=False).plan("flux", weights=str(ROOT / "app.py"))


def test_folders_load_only_safetensors_weights(tmp_path, no_pickle):
    pipe = build_tiny_pipeline("flux")
    pipe.save_pretrained(tmp_path / "safe")
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled" / "transformer").glob("*.bin"))
    m = ModelManager(tiny=False)
    loaded = m.get("flux", weights=str(tmp_path / "safe"))  # loads with torch.load forbidden
    assert type(loaded.pipe).__name__ == "FluxPipeline"
    with pytest.raises(ModelLoadError, match="safetensors") as err:
        m.get("flux", weights=str(tmp_path / "pickled"))
    assert "pickle .bin weights are never loaded" in str(err.value)
    assert no_pickle == [] and [x.key for x in m.loaded()] == [loaded.key]


# --------------------------------------------------------------------------------------------------
# Files: uploads stay in the upload folder, calibration ids are never paths
# --------------------------------------------------------------------------------------------------
def test_uploads_outside_the_upload_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGCACHE_OUTPUT_DIR", str(tmp_path / "outputs"))
    uploads, secret_dir = tmp_path / "uploads", tmp_path / "private"
    uploads.mkdir()
    secret_dir.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    secret = secret_dir / "secret.png"
    Image.fromarray(image).save(secret)
    inside = uploads / "abc123" / "upload.png"
    inside.parent.mkdir()
    Image.fromarray(image).save(inside)
    (uploads / "link.png").symlink_to(secret)

    for path in ("/etc/passwd", str(secret), str(uploads / ".." / "private" / "secret.png"), str(uploads / "link.png")):
        with pytest.raises(MediaError, match="is not an uploaded file"):
            confine_upload(path, [uploads], "input image")
    assert confine_upload(inside, [uploads]) == str(inside.resolve())

    m = ModelManager(tiny=True)
    base = {"prompt": "x", "steps": 4, "num_frames": 5}
    for bad in ({"image": str(uploads / ".." / "private" / "secret.png")}, {"image": {"path": "/etc/passwd"}},
                {"image": str(uploads / "link.png")}):
        with pytest.raises(InvalidRequest, match="The input image: .* is not an uploaded file"):
            handlers.generate(m, "wan_i2v", dict(base, **bad), upload_roots=[uploads])
    with pytest.raises(InvalidRequest, match="The control video: .* is not an uploaded file"):
        handlers.generate(m, "wan_vace", dict(base, control_video="/etc/hostname"), upload_roots=[uploads])
    with pytest.raises(InvalidRequest, match="reference image 1: .* is not an uploaded file"):
        handlers.generate(m, "wan_vace", dict(base, reference_images=[str(secret)]), upload_roots=[uploads])
    out = handlers.generate(m, "wan_i2v", dict(base, image=str(inside)), upload_roots=[uploads])  # a real upload
    assert out["result"].cached.stats[0].completed


def test_calibration_ids_and_names_never_become_paths(tmp_path):
    store = CalibrationStore(tmp_path / "store")
    for evil in ("../../etc/passwd", "..", "a/b", "/abs", "x\\..\\y"):
        with pytest.raises(ValueError, match="invalid calibration id"):
            store.path_for(evil)
    record = ('{"format": "magcache-studio calibration", "version": 1, "id": "../../outside", "model": "tiny",'
              ' "preset": "flux", "num_steps": 4, "resolution": {"height": 32, "width": 32, "frames": 1},'
              ' "scheduler": "FlowMatchEulerDiscreteScheduler", "cfg": false,'
              ' "branches": {"cond": {"mag_ratios": [1.0, 0.9, 0.95, 0.97]}}}')
    with pytest.raises(ValueError, match="invalid calibration id"):
        store.import_text(record)  # the file's own id is validated even though it is then replaced
    saved = store.import_text(record.replace("../../outside", "ok-id"))
    assert saved.id != "ok-id" and store.path_for(saved.id).parent == store.root
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [f"{saved.id}.json"]
    with pytest.raises(ValueError, match="path traversal"):
        store.import_text(record.replace('"model": "tiny"', '"model": "../../tiny"').replace("../../outside", "x"))


# --------------------------------------------------------------------------------------------------
# Server settings and tokens
# --------------------------------------------------------------------------------------------------
def test_the_server_binds_to_loopback_and_serves_no_extra_folder(monkeypatch, tmp_path):
    import tempfile

    import app

    for name in ("MAGCACHE_HOST", "MAGCACHE_PORT", "MAGCACHE_SHARE", "MAGCACHE_MAX_UPLOAD"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    options = app.launch_options(args, Path(tempfile.gettempdir()) / "magcache-studio")
    assert (options["server_name"], options["share"], options["allowed_paths"]) == ("127.0.0.1", False, [])
    assert options["max_file_size"] == "500mb"
    elsewhere = Path("/srv/magcache-outputs-test")  # outside the temp dir and the working directory
    with pytest.raises(SystemExit, match="lies outside the working directory and the temp dir"):
        app.launch_options(args, elsewhere)  # never served as a whole folder
    monkeypatch.setenv("MAGCACHE_MAX_UPLOAD", "20mb")
    assert app.launch_options(args, tmp_path)["max_file_size"] == "20mb"


def test_tokens_are_redacted_from_messages_and_logs(monkeypatch, caplog, tmp_path):
    import app
    import ui

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert FAKE_TOKEN not in redact(f"token={FAKE_TOKEN}") and "hf_abcdefgh12345" not in redact("hf_abcdefgh12345")
    m = ModelManager(tiny=False)
    fn = next(f for f in ui.build_app(m).fns.values() if f.api_name == "generate_flux").fn
    import gradio as gr

    with pytest.raises(gr.Error) as err:  # a user pasting a token into the Weights field by mistake
        fn(request=SimpleNamespace(session_hash="t"), progress=lambda *a, **k: None, prompt="x",
           weights=f"/models/{FAKE_TOKEN}/flux")
    assert FAKE_TOKEN not in str(err.value) and "/models/***/flux" in str(err.value)

    app.configure_logging()  # the app's log handlers redact whatever any library logs
    record = logging.LogRecord("huggingface_hub", logging.WARNING, __file__, 1, "header Authorization: Bearer %s",
                               (FAKE_TOKEN,), None)
    handler = logging.getLogger().handlers[0]
    for f in handler.filters:
        f.filter(record)
    assert FAKE_TOKEN not in record.getMessage() and "***" in record.getMessage()
    assert FAKE_TOKEN not in caplog.text


def test_redaction_covers_server_loggers_streams_and_gradio_errors(monkeypatch):
    import io

    from gradio import queueing, utils

    from magcache.studio import redaction

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("uvicorn.access")  # uvicorn makes its handlers while the server starts
    logger.addHandler(handler)
    try:
        assert redaction.filter_log_handlers() >= 1
        logger.warning('"GET /gradio_api/file=/x/%s HTTP/1.1" 403', FAKE_TOKEN)
    finally:
        logger.removeHandler(handler)
    assert FAKE_TOKEN not in out.getvalue() and "/x/*** " in out.getvalue()

    raw = io.StringIO()
    stream = redaction.RedactingStream(raw)
    stream.write(f"ValueError: could not convert string to float: '{FAKE_TOKEN}'\n")
    assert FAKE_TOKEN not in raw.getvalue() and "'***'" in raw.getvalue()

    monkeypatch.setattr(utils, "error_payload", utils.error_payload)  # restored after the test
    monkeypatch.setattr(queueing, "error_payload", queueing.error_payload)
    from ui.redaction import redact_gradio_errors

    redact_gradio_errors()
    payload = queueing.error_payload(ValueError(f"bad value {FAKE_TOKEN}"), True)
    assert payload["error"] == "bad value ***" and utils.error_payload is queueing.error_payload


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from magcache.studio.local_app import start_app

    folder = tmp_path_factory.mktemp("server")
    log = folder / "app.log"
    with start_app(log, env={"HF_TOKEN": FAKE_TOKEN, "GRADIO_TEMP_DIR": str(folder / "gradio")}) as url:
        yield SimpleNamespace(url=url, log=log, outputs=folder / "app-outputs", gradio=folder / "gradio")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _file_url(server, path: Path | str) -> str:
    return f"{server.url}gradio_api/file={urllib.parse.quote(str(path))}"


def test_the_server_serves_only_what_it_must(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=False)
    result = client.predict(prompt="x", width=32, height=32, steps=4, num_frames=5, api_name="/generate_wan_t2v")
    client.close()
    videos = [v for v in result if isinstance(v, dict) and str(v.get("path", "")).endswith(".mp4")]
    assert len(videos) == 3, result
    served = Path(videos[0]["path"])
    assert server.gradio in served.parents  # the copy Gradio made into its own folder ...
    with urllib.request.urlopen(_file_url(server, served), timeout=10) as r:  # ... is served, on this route
        assert r.status == 200 and r.read() == served.read_bytes()
    written = sorted(server.outputs.rglob("*.mp4"))
    assert written and written[0].read_bytes() in {Path(v["path"]).read_bytes() for v in videos}
    secret = server.outputs / "secret.txt"
    secret.write_text("not for download")
    # The same route refuses the app's own output file (same bytes as the served copy), the output folder, the
    # repository and the system.
    for path in (written[0], secret, "/etc/passwd", ROOT / "app.py", ROOT / "presets.json", "../../etc/passwd"):
        assert _status(_file_url(server, path)) == 403, path
    assert _status(server.url) == 200


def test_the_server_keeps_tokens_out_of_errors_and_logs(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    with pytest.raises(Exception, match="multiple of 16"):
        client.predict(prompt=DEMO_PROMPT, width=40, height=32, api_name="/generate_demo")
    # A token typed into a number field: Gradio's own input processing fails and prints its traceback.
    with pytest.raises(Exception) as err:
        client.predict(prompt=DEMO_PROMPT, seed=FAKE_TOKEN, api_name="/generate_demo")
    assert FAKE_TOKEN not in str(err.value) and "the value passed to the event handler was: '***'" in str(err.value)
    other = "hf_" + "OtherTokenShape123" * 2  # not the server's own token: redacted by its shape
    with pytest.raises(Exception) as err:
        client.predict(prompt=DEMO_PROMPT, width=32, height=32, steps=4, weights=f"/models/{other}", api_name="/generate_demo")
    assert other not in str(err.value) and "/models/hf_***" in str(err.value)
    result = client.predict(prompt=DEMO_PROMPT, width=32, height=32, steps=4, api_name="/generate_demo")
    assert any("Done" in str(v) for v in result)
    client.close()
    deadline = time.monotonic() + 20
    while "Could not preprocess input component" not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "Gradio's input-processing traceback never reached the log"
        time.sleep(0.2)
    log = server.log.read_text(errors="replace")
    assert "was: '***'" in log  # the traceback was printed, redacted ...
    assert FAKE_TOKEN not in log and other not in log  # ... and nowhere else in the log either


def test_a_client_that_goes_away_stops_its_run(server):
    """The real alive check (``ui/layout._event_alive_check``, reading Gradio's queue) stops a cancelled run."""
    from gradio_client import Client
    from gradio_client.utils import Status

    before = server.log.read_text(errors="replace").count("client gone or event cancelled")
    client = Client(server.url, verbose=False)
    job = client.submit(prompt=DEMO_PROMPT, width=32, height=32, steps=100, compare=True, api_name="/generate_demo")
    deadline = time.monotonic() + 60
    while job.status().code not in (Status.PROCESSING, Status.PROGRESS):  # its handler runs
        assert time.monotonic() < deadline and not job.done(), "the request never started"
        time.sleep(0.05)
    time.sleep(1.0)
    assert not job.done()  # 100 steps with the baseline take far longer
    job.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = server.log.read_text(errors="replace")
        if log.count("client gone or event cancelled") > before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server did not stop the cancelled run")
    assert "stopped during the" in log.splitlines()[-1] or "run stopped" in log
    result = client.predict(prompt=DEMO_PROMPT, width=32, height=32, steps=4, api_name="/generate_demo")  # next one runs
    assert any("Done" in str(v) for v in result)
    client.close()
