"""Load test of the app through its real server: N requests to the Demo tab, C at a time, with gradio_client.

    python -m bench.loadtest                          # starts app.py (MAGCACHE_TINY=1) on a free loopback port
    python -m bench.loadtest --requests 12 --concurrency 4 --json report.json
    python -m bench.loadtest --url http://127.0.0.1:7860/   # an app that is already running (loopback only)

Each simulated user is its own ``gradio_client.Client`` (its own session). The requests cycle through a mix:
valid settings (a few distinct ones, each sent several times), invalid ones (each must fail with a clear message
naming the problem) and cancellations (``job.cancel()``, as a closed browser tab does, and the tab's Stop
endpoint). Afterwards every distinct valid setting runs once more, alone: the concurrent outputs must equal these
sequential ones pixel for pixel (PNG outputs, same seed). Reported: counts per outcome, p50 / p95 / max latency of
the valid requests (submit to result, queue wait included), and whether the server stopped the cancelled runs.

Bounded by design: loopback URLs only, at most 400 requests and 32 at a time, a wall-clock deadline, and the app
it started is stopped at the end. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from magcache.studio.local_app import start_app

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS, MAX_CONCURRENCY = 400, 32
TAB = "demo"
PROMPT = "red background, small blue circle at left"
SIZE = 32  # the tiny stand-in of the Demo tab; the trained demo model would run at its own size

# Valid settings (each runs several times; its outputs must always be the same).
VALID = [
    {"seed": 1},
    {"seed": 2, "thresh": 0.1},
    {"seed": 3, "K": 2, "compare": False},
    {"seed": 1, "retention_ratio": 0.3, "guidance": 1.0},
]
# Invalid settings and a piece of the message the user must get (from the backend or Gradio's own checks).
INVALID = [
    ({"width": 40}, "multiple of 16"),
    ({"prompt": "   "}, "Write a prompt"),
    ({"thresh": 2.5}, "maximum"),  # above the slider's range: Gradio refuses it before the backend
    ({"steps": 500}, "maximum"),
    ({"seed": 2**70}, "Seed must be a whole number"),  # the Number input rounds 1.5, but has no range of its own
]
# One cycle of request kinds; N requests walk through it (index i -> kind i % len).
CYCLE = ["valid", "valid", "invalid", "valid", "cancel", "valid", "invalid", "valid", "stop", "valid", "invalid",
         "valid"]
CANCEL_STEPS = 60  # a cancelled request asks for many steps, so it is still running when it is cancelled


@dataclass
class Outcome:
    index: int
    kind: str  # valid | invalid | cancel | stop
    settings: dict
    status: str  # ok | error | cancelled | stopped | wrong
    seconds: float
    detail: str = ""
    digest: str | None = None


@dataclass
class Report:
    url: str
    requests: int
    concurrency: int
    counts: dict[str, int] = field(default_factory=dict)
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_max_s: float | None = None
    wall_s: float = 0.0
    identical_to_sequential: bool = False
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    server_stopped_runs: int | None = None  # "run stopped" lines in the server log (when this script started it)
    outcomes: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and not self.mismatches and self.identical_to_sequential

    def text(self) -> str:
        lines = [f"load test: {self.requests} requests to /generate_{TAB}, {self.concurrency} at a time, {self.url}",
                 "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
                 f"latency of valid requests (submit to result, queue included): p50 {self.latency_p50_s:.2f} s, "
                 f"p95 {self.latency_p95_s:.2f} s, max {self.latency_max_s:.2f} s" if self.latency_p50_s is not None
                 else "latency: no valid request succeeded",
                 f"outputs identical to sequential runs: {'yes' if self.identical_to_sequential else 'NO'}",
                 f"wall time {self.wall_s:.1f} s"]
        if self.server_stopped_runs is not None:
            lines.append(f"runs the server stopped early (Stop / cancelled / client gone): {self.server_stopped_runs}")
        lines += [f"MISMATCH {m}" for m in self.mismatches] + [f"PROBLEM {p}" for p in self.problems]
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The app under test
# --------------------------------------------------------------------------------------------------
def require_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {url!r}: only loopback URLs (127.0.0.1, ::1, localhost)")
    return url


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
def request_plan(n: int) -> list[tuple[str, dict, str | None]]:
    """``n`` requests: (kind, settings, expected error text)."""
    plan, valid_i, invalid_i = [], 0, 0
    for i in range(n):
        kind = CYCLE[i % len(CYCLE)]
        if kind == "valid":
            plan.append((kind, dict(VALID[valid_i % len(VALID)]), None))
            valid_i += 1
        elif kind == "invalid":
            settings, expected = INVALID[invalid_i % len(INVALID)]
            plan.append((kind, dict(settings), expected))
            invalid_i += 1
        else:
            plan.append((kind, {"seed": 9, "steps": CANCEL_STEPS}, None))
    return plan


def call_values(settings: dict) -> dict[str, Any]:
    values = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": 8, "guidance": 4.0, "seed": 0,
              "thresh": 0.24, "retention_ratio": 0.1, "K": 5, "compare": True}
    values.update(settings)
    return values


class Endpoint:
    """Where the Demo tab's outputs sit in the endpoint's return tuple (read from the server's API info)."""

    def __init__(self, client: Any):
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][f"/generate_{TAB}"]
        labels = [r.get("label") for r in info["returns"]]
        components = [r.get("component") for r in info["returns"]]
        self.baseline = labels.index("Baseline (no cache)")
        self.magcache = labels.index("MagCache")
        self.status = components.index("Markdown")  # the status line is the first Markdown output
        self.parameters = {p["parameter_name"] for p in info["parameters"]}


def image_digest(path: str | None) -> str:
    """sha256 of the decoded pixels (not of the file: two encoders may write the same pixels differently)."""
    if not path:
        return "none"
    from PIL import Image

    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()[:16]


def output_digest(result: tuple, ep: Endpoint) -> str:
    return f"{image_digest(result[ep.baseline])}/{image_digest(result[ep.magcache])}"


def one_request(url: str, index: int, kind: str, settings: dict, expected: str | None, deadline: float,
                cancel_after_s: float) -> Outcome:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=tempfile.mkdtemp(prefix="loadtest-"))
    ep = Endpoint(client)
    t0 = time.perf_counter()
    job = client.submit(api_name=f"/generate_{TAB}", **call_values(settings))
    try:
        if kind in ("cancel", "stop"):
            _wait_until_running(job, min(deadline, time.monotonic() + 60))
            time.sleep(cancel_after_s)
            if kind == "cancel":
                job.cancel()  # what a closed browser tab amounts to: the server must stop the run itself
                return Outcome(index, kind, settings, "cancelled", time.perf_counter() - t0)
            stop_text = client.predict(api_name=f"/stop_{TAB}")
            with contextlib.suppress(Exception):
                job.result(timeout=max(1.0, deadline - time.monotonic()))
            return Outcome(index, kind, settings, "stopped", time.perf_counter() - t0, detail=str(stop_text)[:120])
        result = job.result(timeout=max(1.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - t0
        if kind == "invalid":
            return Outcome(index, kind, settings, "wrong", seconds, detail=f"succeeded, expected an error ({expected})")
        status = str(result[ep.status])
        if "Done" not in status:
            return Outcome(index, kind, settings, "wrong", seconds, detail=f"status: {status[:200]}")
        return Outcome(index, kind, settings, "ok", seconds, digest=output_digest(result, ep))
    except Exception as e:  # noqa: BLE001 - the client raises AppError / ValueError / TimeoutError: all recorded
        seconds = time.perf_counter() - t0
        message = f"{type(e).__name__}: {e}"
        if kind == "invalid" and expected and expected.lower() in message.lower():
            return Outcome(index, kind, settings, "error", seconds, detail=message[:200])
        return Outcome(index, kind, settings, "wrong", seconds, detail=message[:300])
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _wait_until_running(job: Any, deadline: float) -> None:
    from gradio_client.utils import Status

    while time.monotonic() < deadline and not job.done():
        if job.status().code in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING):
            return
        time.sleep(0.05)


def sequential_reference(url: str, settings_list: list[dict], deadline: float) -> dict[str, str]:
    """Each distinct valid setting once, alone: the outputs the concurrent runs must equal."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=tempfile.mkdtemp(prefix="loadtest-"))
    ep = Endpoint(client)
    out = {}
    try:
        for settings in settings_list:
            job = client.submit(api_name=f"/generate_{TAB}", **call_values(settings))
            out[_key(settings)] = output_digest(job.result(timeout=max(1.0, deadline - time.monotonic())), ep)
    finally:
        client.close()
    return out


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_load_test(url: str, requests: int = 40, concurrency: int = 8, timeout_s: float = 600,
                  cancel_after_s: float = 0.3, server_log: str | os.PathLike | None = None) -> Report:
    require_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"requests must be 1..{MAX_REQUESTS} and concurrency 1..{MAX_CONCURRENCY}")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    plan = request_plan(requests)
    report = Report(url, requests, concurrency)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one_request, url, i, kind, settings, expected, deadline, cancel_after_s)
                   for i, (kind, settings, expected) in enumerate(plan)]
        outcomes = [f.result() for f in futures]
    valid_settings = list({_key(s): s for kind, s, _ in plan if kind == "valid"}.values())
    reference = sequential_reference(url, valid_settings, deadline) if valid_settings else {}
    report.wall_s = time.monotonic() - t0

    for o in outcomes:
        report.counts[f"{o.kind}:{o.status}"] = report.counts.get(f"{o.kind}:{o.status}", 0) + 1
        if o.status == "wrong":
            report.problems.append(f"request {o.index} ({o.kind} {o.settings}): {o.detail}")
        elif o.kind == "valid" and o.digest != reference.get(_key(o.settings)):
            report.mismatches.append(f"request {o.index} {o.settings}: {o.digest} != sequential "
                                     f"{reference.get(_key(o.settings))}")
    report.identical_to_sequential = not report.mismatches and any(o.kind == "valid" for o in outcomes)
    latencies = [o.seconds for o in outcomes if o.kind == "valid" and o.status == "ok"]
    if latencies:
        report.latency_p50_s = statistics.median(latencies)
        report.latency_p95_s = _percentile(latencies, 0.95)
        report.latency_max_s = max(latencies)
    if server_log is not None:
        report.server_stopped_runs = Path(server_log).read_text(errors="replace").count("run stopped")
    report.outcomes = [asdict(o) for o in outcomes]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running app (loopback only); default: start app.py with MAGCACHE_TINY=1")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600, help="wall-clock limit of the whole test, seconds")
    parser.add_argument("--json", help="also write the report (with every request's outcome) to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="magcache-loadtest-") as tmp:
        if args.url:
            report = run_load_test(require_loopback(args.url), args.requests, args.concurrency, args.timeout)
        else:
            log = Path(tmp) / "app.log"
            with start_app(log) as url:
                report = run_load_test(url, args.requests, args.concurrency, args.timeout, server_log=log)
    print(report.text())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
