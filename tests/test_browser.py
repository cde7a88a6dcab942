"""A real browser against the real app: start ``app.py`` (MAGCACHE_TINY=1) on a free loopback port, drive Debian's
chromium with Playwright, run the Demo tab with comparison on, wait for both images and the timing table, save a
screenshot, then open every other tab. Fails (never skips) when chromium is missing: CI installs it."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from magcache.studio.local_app import start_app

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def app_url(tmp_path):
    """The app as the load test starts it (``magcache.studio.local_app.start_app``), with an empty calibration store and the
    Demo tab on its default model (the trained one when it exists, else the tiny stand-in)."""
    env = dict(MAGCACHE_HOME=str(tmp_path / "home"), MAGCACHE_WEIGHTS_DEMO="")  # never the user's calibrations
    with start_app(tmp_path / "app.log", env=env) as url:
        yield url


@contextlib.contextmanager
def _demo_page(app_url, tmp_path):
    """A chromium page on the app with the Demo tab shown, and the folder for screenshots."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); the browser test needs it.")
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("MAGCACHE_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            expect(page.locator("#run-demo")).to_be_visible(timeout=60_000)
            yield page, shots
        finally:
            browser.close()


def test_demo_tab_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import expect

    from magcache.studio.catalog import load_catalog

    with _demo_page(app_url, tmp_path) as (page, shots):
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


def test_tuning_panel_in_a_real_browser(app_url, tmp_path):
    """The Demo tab's tuning panel: moving the thresh slider redraws the live preview, a one-click calibration
    is saved and then named by the preview as the curve in use, a 3x2 sweep fills its table and Pareto plot, and
    clicking a row sets the sliders."""
    from playwright.sync_api import expect

    with _demo_page(app_url, tmp_path) as (page, shots):
        tab = page.locator("#tab-demo")
        preview = tab.locator("p", has_text="Predicted schedule")
        expect(preview).to_contain_text("ratio curve: preset", timeout=20_000)

        # the live preview follows the sliders (no model run); 8 steps keep the runs below short with any model
        before = preview.inner_text()
        steps = tab.get_by_label("number input for Steps")
        steps.fill("8")
        steps.press("Enter")
        expect(preview).not_to_have_text(before, timeout=20_000)
        before = preview.inner_text()
        thresh = tab.get_by_label("number input for thresh (error budget)")
        thresh.fill("0.02")
        thresh.press("Enter")
        expect(preview).not_to_have_text(before, timeout=20_000)
        assert "transformer passes computed" in preview.inner_text()

        # one-click calibration: saved to the store, plotted, and from now on the curve in use
        tuning = page.locator("#tuning-demo")
        tuning.get_by_text("Tuning: ratio curve").click()
        tuning.get_by_role("tab", name="Calibrate").click()
        page.locator("#calibrate-demo").click()
        status = page.locator("#calibrate-status-demo")
        expect(status).to_contain_text("Calibrated", timeout=120_000)
        expect(page.locator("#calibrate-plot-demo")).to_be_visible()
        saved = list((tmp_path / "home" / "calibrations").glob("*.json"))
        assert len(saved) == 1 and saved[0].stem in status.inner_text()
        expect(preview).to_contain_text(f"calibration {saved[0].stem} (exact)", timeout=20_000)
        tuning.screenshot(path=str(shots / "tuning_calibration.png"))

        # a 3x2 sweep: table, Pareto plot; a clicked row sets the sliders
        tuning.get_by_role("tab", name="Sweep").click()
        page.locator("#sweep-thresh-demo textarea").fill("0.05, 0.1, 0.2")
        page.locator("#sweep-K-demo textarea").fill("2, 4")
        page.locator("#sweep-demo").click()
        expect(page.locator("#sweep-status-demo")).to_contain_text("Sweep done: 6 points", timeout=180_000)
        table = page.locator("#sweep-table-demo")
        expect(table.locator('[role="row"]')).to_have_count(7)  # header + 6 points
        expect(page.locator("#sweep-plot-demo")).to_be_visible()
        last = table.locator('[role="row"][aria-rowindex="7"] [role="gridcell"]')
        expect(last.nth(1)).to_have_text("0.2")
        last.nth(1).click()
        expect(thresh).to_have_value("0.2", timeout=10_000)
        expect(tab.get_by_label("number input for K (max consecutive skips)")).to_have_value("4")
        tuning.screenshot(path=str(shots / "tuning_sweep.png"))
        assert (shots / "tuning_sweep.png").stat().st_size > 10_000


def test_strategies_view_in_a_real_browser(app_url, tmp_path):
    """The Demo tab's Strategies accordion: two strategies at one level fill the table and the plot; the speed-up
    target shows the optimal schedule beside the threshold solution."""
    from playwright.sync_api import expect

    with _demo_page(app_url, tmp_path) as (page, shots):
        tab = page.locator("#tab-demo")
        steps = tab.get_by_label("number input for Steps")
        steps.fill("8")
        steps.press("Enter")

        tuning = page.locator("#tuning-demo")
        tuning.get_by_text("Tuning: ratio curve").click()
        page.locator("#solve-demo").click()
        expect(page.locator("#solve-text-demo")).to_contain_text("Optimal-budget schedule", timeout=20_000)

        view = page.locator("#strategies-demo")
        view.get_by_text("Strategies: every cache").click()
        page.locator("#strategies-levels-demo textarea").fill("2")
        chosen = page.locator("#strategies-chosen-demo")
        for name in ("magcache_optimal", "random", "first_block_cache", "taylorseer", "faster_cache",
                     "pyramid_attention_broadcast", "diffusers_magcache"):
            chosen.get_by_label(name, exact=True).uncheck()
        page.locator("#strategies-run-demo").click()
        expect(page.locator("#strategies-status-demo")).to_contain_text("Strategies done: 2 points",
                                                                         timeout=180_000)
        table = page.locator("#strategies-table-demo")
        expect(table.locator('[role="row"]')).to_have_count(3)  # header + magcache + uniform
        expect(page.locator("#strategies-plot-demo")).to_be_visible()
        view.screenshot(path=str(shots / "strategies.png"))
