"""A real browser against the real app: start ``app.py`` (MAGCACHE_TINY=1) on a free loopback port, drive Debian's
chromium with Playwright, run the Demo tab with comparison on, wait for both images and the timing table, save a
screenshot, then open every other tab. Fails (never skips) when chromium is missing: CI installs it."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    port = _free_port()
    env = dict(os.environ, MAGCACHE_TINY="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               MAGCACHE_OUTPUT_DIR=str(tmp_path / "outputs"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 180 s:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_demo_tab_in_a_real_browser(app_url, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); the browser test needs it.")
    from playwright.sync_api import expect, sync_playwright

    from magcache.studio.catalog import load_catalog

    shots = Path(os.environ.get("MAGCACHE_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            run = page.locator("#run-demo")
            expect(run).to_be_visible(timeout=60_000)
            expect(page.locator("#mc-intro")).to_contain_text("MagCache Studio")
            # Compare with baseline is on by default; run the Demo tab
            run.click()
            expect(page.locator("#status-demo")).to_contain_text("Done: Demo", timeout=240_000)
            for side in ("baseline", "magcache"):
                expect(page.locator(f"#{side}-demo img")).to_be_visible(timeout=30_000)
            timing = page.locator("#timing-demo")
            expect(timing).to_contain_text("Baseline (no cache)")
            expect(timing).to_contain_text("MagCache")
            expect(timing).to_contain_text("×")
            expect(page.locator("#metrics-demo")).to_contain_text("PSNR")
            page.screenshot(path=str(shots / "demo_tab.png"), full_page=True)
            assert (shots / "demo_tab.png").stat().st_size > 10_000

            for tab in load_catalog().tabs[1:]:
                page.get_by_role("tab", name=tab.label, exact=True).click()
                expect(page.locator(f"#run-{tab.id}")).to_be_visible(timeout=20_000)
                expect(page.locator(f"#schedule-{tab.id}")).to_be_visible()
            page.screenshot(path=str(shots / "last_tab.png"), full_page=True)
        finally:
            browser.close()
