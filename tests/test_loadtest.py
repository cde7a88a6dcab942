"""The load test (``python -m bench.loadtest``) in its small CI configuration: the real app on a loopback port,
12 requests to the Demo tab, 4 at a time, through gradio_client. Prints its figures."""

import time

import pytest

from bench.loadtest import INVALID, VALID, request_plan, require_loopback, run_load_test
from magcache.studio.local_app import start_app


def test_request_mix_and_limits():
    plan = request_plan(40)
    kinds = [k for k, _, _ in plan]
    assert (kinds.count("valid"), kinds.count("invalid"), kinds.count("cancel"), kinds.count("stop")) == (24, 10, 3, 3)
    assert {repr(s) for k, s, _ in plan if k == "valid"} == {repr(s) for s in VALID}
    assert {e for k, _, e in plan if k == "invalid"} == {e for _, e in INVALID}
    for url in ("http://example.com:7860/", "http://10.0.0.2:7860/", "http://0.0.0.0:7860/"):
        with pytest.raises(SystemExit, match="only loopback"):
            require_loopback(url)
    assert require_loopback("http://127.0.0.1:7860/") and require_loopback("http://localhost:1/")
    with pytest.raises(ValueError, match="requests must be"):
        run_load_test("http://127.0.0.1:1/", requests=10_000)


def test_load_test_small_configuration(tmp_path, capsys):
    log = tmp_path / "app.log"
    with start_app(log) as url:
        report = run_load_test(url, requests=12, concurrency=4, timeout_s=240, server_log=log)
        with capsys.disabled():
            print("\n" + report.text())
        plan = request_plan(12)
        expected = {kind: sum(k == kind for k, _, _ in plan) for kind in ("valid", "invalid", "cancel", "stop")}
        assert report.problems == [] and report.mismatches == []
        assert report.counts == {"valid:ok": expected["valid"], "invalid:error": expected["invalid"],
                                 "cancel:cancelled": expected["cancel"], "stop:stopped": expected["stop"]}
        assert report.identical_to_sequential and report.passed
        assert 0 < report.latency_p50_s <= report.latency_p95_s <= report.latency_max_s
        assert report.server_stopped_runs >= expected["stop"]  # Stop ends the run on the server, not only the view
        _client_gone_stops_the_run_on_the_server(url, log)


def _client_gone_stops_the_run_on_the_server(url, log):
    """A client that cancels (or disconnects) mid-run: the server stops the pipeline at its next step instead of
    running the remaining steps for nobody, and serves the next request at once."""
    from gradio_client import Client

    from bench.loadtest import call_values

    stopped_before = log.read_text().count("client gone")
    client = Client(url, verbose=False)
    job = client.submit(api_name="/generate_demo", **call_values({"seed": 5, "steps": 100}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the baseline loop is running (its progress shows a step)
        progress = job.status().progress_data or []
        if any((p.index or 0) >= 1 for p in progress):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the long run never reported progress")
    job.cancel()
    client.close()
    while time.monotonic() < deadline and log.read_text().count("client gone") == stopped_before:
        time.sleep(0.1)
    line = next(x for x in reversed(log.read_text().splitlines()) if "client gone" in x)
    assert "run stopped (stopped during the baseline run after step" in line and "of 100" in line
