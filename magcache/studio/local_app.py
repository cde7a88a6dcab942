"""The app (``app.py``) started in a subprocess on a free loopback port, with tiny offline pipelines: what the
browser test, the security test and the load test run against."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_app(log_path: str | os.PathLike, env: dict[str, str] | None = None, startup_s: float = 180) -> Iterator[str]:
    """``app.py`` with tiny offline pipelines on a free loopback port (the Demo tab on its tiny stand-in, so the
    figures do not depend on whether the demo model is trained); yields its URL, stops it afterwards. One torch
    thread unless ``env`` says otherwise: tiny models gain nothing from more, and a shared CPU loses a lot."""
    import urllib.request

    port = free_port()
    outputs = Path(log_path).parent / "app-outputs"
    full_env = dict(os.environ, MAGCACHE_TINY="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                    PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MAGCACHE_OUTPUT_DIR=str(outputs),
                    MAGCACHE_WEIGHTS_DEMO=str(Path(log_path).parent / "no-demo-model"))
    full_env.update(env or {})
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not answer on {url} within {startup_s:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
