"""A real browser against the real app: start ``app.py`` (MAGCACHE_TINY=1, the Demo tab on its own model) once on
a free loopback port, drive Debian's chromium with Playwright at a desktop (1400×1000) and a phone (390×844)
viewport: the Demo tab's comparison and its headline, inline validation, Compare off, the tuning section, Stop,
the figures' phone layouts.
Screenshots go to ``MAGCACHE_SCREENSHOT_DIR`` (default: the test's temp dir). Fails (never skips) when chromium
is missing: CI installs it."""

import os
import re
import shutil
from pathlib import Path

import pytest

from magcache.studio.local_app import start_app

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app as the load test starts it (``magcache.studio.local_app.start_app``), with an empty calibration
    store and the Demo tab on its default model (the trained one when it exists, else the tiny stand-in); one app
    for the module's tests (starting one costs more than a test)."""
    root = tmp_path_factory.mktemp("browser")
    env = dict(MAGCACHE_HOME=str(root / "home"), MAGCACHE_WEIGHTS_DEMO="")  # never the user's calibrations
    with start_app(root / "app.log", env=env) as url:
        yield url, root


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); the browser test needs it.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("MAGCACHE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _no_horizontal_overflow(locator) -> bool:
    """Every column of a Gradio table is on screen: nothing scrolls sideways inside it."""
    return locator.evaluate("el => [...el.querySelectorAll('*')].every(e => e.scrollWidth <= e.clientWidth + 2 || "
                            "getComputedStyle(e).overflowX === 'visible')")


def _figure_width(img) -> int:
    """The width in CSS pixels of the layout the browser chose for a figure (wide: 800; phone: 340, at 2x)."""
    return img.evaluate("el => el.complete && el.naturalWidth")


def _open(browser, url, viewport):
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport)
    page.goto(url)
    expect(page.locator("#run-demo")).to_be_visible(timeout=60_000)
    return page


def _select_tab(page, label: str) -> None:
    """Open a tab by its label, from the tab strip or, where the strip has no room left, from its overflow menu."""
    tab = page.get_by_role("tab", name=label, exact=True)
    if tab.is_visible():
        tab.click()
        return
    page.locator(".overflow-menu > button").first.click()
    page.locator(".overflow-dropdown").get_by_role("button", name=label, exact=True).click()


def _fill(page, selector: str, text: str) -> None:
    """Type into a text box and wait until the value has stuck: a box in a tuning sub-tab opened a moment ago
    can be re-mounted with its initial value just after a fill (seen on a busy machine: the sweep then ran the
    default grid), which no person typing could hit but a script can. Refill until the value survives a pause."""
    box = page.locator(selector)
    for _ in range(5):
        box.fill(text)
        page.wait_for_timeout(400)
        if box.input_value() == text:
            return
    raise AssertionError(f"{selector} does not keep {text!r}: it shows {box.input_value()!r}")


def test_demo_tab_on_a_desktop(app, browser, shots):
    """Generate with Compare: the headline card (speed-up with spread, PSNR, SSIM, passes), a timing table that
    fits, provenance folded away; a typed out-of-range value refused next to its slider; Compare off leaves no
    empty boxes; a typed weights path that does not exist is an error. Then every other tab opens."""
    from playwright.sync_api import expect

    from magcache.studio.catalog import load_catalog

    url, _ = app
    page = _open(browser, url, DESKTOP)
    try:
        expect(page.locator("#mc-intro")).to_be_visible()  # the intro is open on a wide screen
        tab = page.locator("#tab-demo")
        expect(page.locator("#baseline-demo")).to_be_hidden()  # no empty result boxes before a run
        page.locator("#run-demo").click()
        expect(page.locator("#status-demo")).to_contain_text("Done: Demo", timeout=240_000)
        headline = page.locator("#headline-demo")
        expect(headline).to_contain_text("× faster")
        for part in ("PSNR", "SSIM", "of 56 transformer passes", "Median of"):
            expect(headline).to_contain_text(part)
        for side in ("baseline", "magcache"):
            expect(page.locator(f"#{side}-demo img")).to_be_visible(timeout=30_000)
        timing = page.locator("#timing-demo")
        for text in ("Baseline (no cache)", "MagCache", "Passes computed", "Calls", "×"):
            expect(timing).to_contain_text(text)
        assert _no_horizontal_overflow(timing)
        expect(page.locator("#passes-help-demo")).to_contain_text("Calls")
        expect(page.locator("#metrics-demo")).to_contain_text("PSNR")
        details = page.locator("#details-demo")
        expect(details).to_contain_text("Details")
        expect(details.get_by_text("Model:")).to_be_hidden()  # provenance is folded away
        assert _figure_width(page.locator("#schedule-demo img")) == 800  # the wide layout of the schedule
        page.screenshot(path=str(shots / "demo_tab.png"), full_page=True)
        assert (shots / "demo_tab.png").stat().st_size > 10_000

        # a typed value out of range: refused next to the slider with its range, the box restored, the preview kept
        preview = tab.locator("p", has_text="Predicted schedule")
        before = preview.inner_text()
        steps = tab.get_by_label("number input for Steps")
        kept = steps.input_value()
        steps.fill("1000")
        steps.press("Enter")
        expect(tab.get_by_text("Steps takes 2 to 100; 1000 was not taken.")).to_be_visible(timeout=10_000)
        expect(steps).to_have_value(kept, timeout=10_000)
        expect(preview).to_have_text(before)
        K = tab.get_by_label("number input for K (max consecutive skips)")
        K.fill("-2")
        K.press("Enter")
        expect(tab.get_by_text("K takes 0 to 10; -2 was not taken.")).to_be_visible(timeout=10_000)
        page.locator("#status-demo").screenshot(path=str(shots / "desktop_status.png"))
        tab.screenshot(path=str(shots / "desktop_inline_validation.png"))

        # Compare off: one image, no baseline / slider / difference map boxes, the headline says what is missing
        tab.get_by_label("Compare with baseline").uncheck()
        page.locator("#run-demo").click()
        expect(headline).to_contain_text("Turn on Compare with baseline", timeout=120_000)
        expect(page.locator("#magcache-demo img")).to_be_visible()
        for hidden in ("#baseline-demo", "#slider-demo", "#heatmap-demo"):
            expect(page.locator(hidden)).to_be_hidden()
        page.screenshot(path=str(shots / "desktop_compare_off.png"), full_page=True)

        # a weights path typed by hand that does not exist: an error, not a silent stand-in model
        tab.get_by_text("Model source").click()
        tab.get_by_label("Weights").fill("/nonexistent/model")
        page.locator("#run-demo").click()
        expect(page.get_by_text("is not a demo model folder")).to_be_visible(timeout=30_000)
        page.locator(".toast-close").first.click()  # the error stays until closed, over the tab strip

        for other in load_catalog().tabs[1:]:
            _select_tab(page, other.label)
            expect(page.locator(f"#run-{other.id}")).to_be_visible(timeout=20_000)
            expect(page.locator(f"#schedule-{other.id}")).to_be_visible()
    finally:
        page.close()


def test_tuning_section_on_a_desktop(app, browser, shots):
    """The Demo tab's tuning section (full width): moving the thresh slider redraws the live preview, a one-click
    calibration is saved and then named by the preview as the curve in use, a 3x2 sweep fills a table that shows
    every column and a Pareto plot, clicking a row sets the sliders, Stop reads "stopped after N of M", the
    export is readable code."""
    from playwright.sync_api import expect

    url, root = app
    page = _open(browser, url, DESKTOP)
    try:
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
        tuning_box = tuning.bounding_box()
        assert tuning_box["width"] > 0.8 * DESKTOP["width"]  # a full-width section, not a corner of the inputs
        tuning.get_by_role("tab", name="Calibrate").click()
        page.locator("#calibrate-demo").click()
        status = page.locator("#calibrate-status-demo")
        expect(status).to_contain_text("Calibrated", timeout=120_000)
        expect(page.locator("#calibrate-plot-demo")).to_be_visible()
        saved = list((root / "home" / "calibrations").glob("*.json"))
        assert len(saved) == 1 and saved[0].stem in status.inner_text()
        expect(preview).to_contain_text(f"calibration {saved[0].stem} (exact)", timeout=20_000)

        # a 3x2 sweep: every column on screen, Pareto plot; a clicked row sets the sliders
        tuning.get_by_role("tab", name="Sweep").click()
        _fill(page, "#sweep-thresh-demo textarea", "0.05, 0.1, 0.2")
        _fill(page, "#sweep-K-demo textarea", "2, 4")
        page.locator("#sweep-demo").click()
        sweep_status = page.locator("#sweep-status-demo")
        expect(sweep_status).to_contain_text("Sweep done: 6 points", timeout=180_000)
        table = page.locator("#sweep-table-demo")
        expect(table.locator('[role="row"]')).to_have_count(7)  # header + 6 points
        for header in ("measured", "PSNR", "SSIM", "Pareto"):
            expect(table.get_by_text(header).first).to_be_visible()
        assert _no_horizontal_overflow(table)
        right = table.evaluate("el => el.getBoundingClientRect().right")
        headers = table.locator('[role="columnheader"]')
        assert headers.count() == 11 and all(headers.nth(i).bounding_box()["x"] + headers.nth(i).bounding_box()["width"]
                                             <= right + 1 for i in range(11))  # every column inside the table box
        expect(page.locator("#sweep-plot-demo")).to_be_visible()
        last = table.locator('[role="row"][aria-rowindex="7"] [role="gridcell"]')
        expect(last.nth(1)).to_have_text("0.2")
        last.nth(1).click()
        expect(thresh).to_have_value("0.2", timeout=10_000)
        expect(tab.get_by_label("number input for K (max consecutive skips)")).to_have_value("4")
        tuning.screenshot(path=str(shots / "tuning_sweep.png"))

        # Stop during a sweep: "stopped after N of M points", no error
        _fill(page, "#sweep-thresh-demo textarea", "0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7")
        _fill(page, "#sweep-retention-demo textarea", "0.1, 0.2")
        page.locator("#sweep-demo").click()
        expect(sweep_status).not_to_contain_text("Sweep done", timeout=10_000)  # the last status is cleared
        expect(sweep_status).to_contain_text(re.compile(r"Sweep (warm-up|baseline|\d)"), timeout=60_000)  # it runs
        page.locator("#sweep-stop-demo").click()
        expect(page.locator("#sweep-stop-note-demo")).to_contain_text("Stop requested")  # beside the button,
        expect(sweep_status).to_contain_text("Sweep stopped", timeout=120_000)  # never over the sweep's own word
        expect(sweep_status).to_contain_text("of 36 points")
        expect(tuning.get_by_text("Error", exact=True)).to_have_count(0)

        # export: readable code with a copy button
        tuning.get_by_role("tab", name="Export").click()
        page.locator("#export-format-demo").get_by_text("magcache Python snippet").click()
        code = page.locator("#export-code-demo")
        expect(code).to_contain_text("magcache", timeout=20_000)
        assert _no_horizontal_overflow(code)
        tuning.screenshot(path=str(shots / "tuning_export.png"))
    finally:
        page.close()


def test_demo_tab_on_a_phone(app, browser, shots):
    """390×844: the intro and the model description collapsed, Generate on the first screen, the page scrolls to
    the progress on press, the headline and the timing table readable; a request waiting behind another
    session's run says which tab holds the device and for how long; Stop says after which step."""
    from playwright.sync_api import expect

    url, _ = app
    page = _open(browser, url, PHONE)
    try:
        expect(page.locator("#mc-intro")).to_be_hidden(timeout=10_000)
        expect(page.locator("#about-demo").get_by_text("procedurally drawn shapes")).to_be_hidden()
        run = page.locator("#run-demo")
        box = run.bounding_box()
        assert box["y"] + box["height"] <= PHONE["height"], f"Generate at y={box['y']:.0f}, below the first screen"
        page.screenshot(path=str(shots / "phone_first_screen.png"))
        run.click()
        status = page.locator("#status-demo")
        expect(status).to_be_in_viewport(timeout=10_000)
        expect(status).to_contain_text("Done: Demo", timeout=240_000)
        headline = page.locator("#headline-demo")
        expect(headline).to_contain_text("× faster")
        headline.scroll_into_view_if_needed()
        assert _no_horizontal_overflow(page.locator("#timing-demo"))
        page.screenshot(path=str(shots / "phone_result.png"))
        page.screenshot(path=str(shots / "phone_full.png"), full_page=True)

        # Stop during a long run says after which step. (Who holds the device while a request waits is checked
        # in tests/test_app_handlers.py: two pages running at once here were too slow to answer on 2 cores.)
        for label, value in (("Steps", "100"), ("Width", "512"), ("Height", "512")):  # a run that lasts
            box = page.locator("#tab-demo").get_by_label(f"number input for {label}")
            box.fill(value)
            box.press("Enter")
        run.click()
        running = re.compile(r"(Baseline|MagCache) run: step \d+/100")
        expect(status).to_contain_text(running, timeout=60_000)
        page.locator("#stop-demo").click()
        expect(status).to_contain_text("Stopped", timeout=60_000)
        expect(status).to_contain_text(" after step ")
        page.screenshot(path=str(shots / "phone_stopped.png"))
    finally:
        page.close()


def test_validation_schedule_and_tuning_on_a_phone(app, browser, shots):
    """390×844: a typed out-of-range value is refused next to its slider with the range and the box restored;
    the schedule figure is its phone layout; the tuning section's four sub-tabs are on screen, the Ratio curve's
    name whole in its box, a 2x2 sweep's table scrolls sideways to every column, the Pareto plot and a
    calibration's plot are their phone layouts, the export is wrapped code with a copy button."""
    from playwright.sync_api import expect

    url, _ = app
    page = _open(browser, url, PHONE)
    try:
        tab = page.locator("#tab-demo")
        schedule = page.locator("#schedule-demo img")
        expect(schedule).to_be_visible(timeout=20_000)
        assert _figure_width(schedule) == 340  # drawn for a phone, not the 800-px figure shrunk
        assert schedule.bounding_box()["width"] <= PHONE["width"]
        schedule.screenshot(path=str(shots / "phone_schedule.png"))

        steps = tab.get_by_label("number input for Steps")
        kept = steps.input_value()
        steps.fill("1000")
        steps.press("Enter")
        refused = tab.get_by_text("Steps takes 2 to 100; 1000 was not taken.")
        expect(refused).to_be_visible(timeout=10_000)
        expect(steps).to_have_value(kept, timeout=10_000)
        box, said = steps.bounding_box(), refused.bounding_box()
        assert abs(said["y"] - box["y"]) < 120 and said["x"] + said["width"] <= PHONE["width"]  # next to the box
        page.screenshot(path=str(shots / "phone_inline_validation.png"))
        steps.fill("4")  # short runs for the sweep below
        steps.press("Enter")
        expect(steps).to_have_value("4")

        tuning = page.locator("#tuning-demo")
        tuning.get_by_text("Tuning: ratio curve").click()
        for name in ("Target", "Calibrate", "Sweep", "Export"):  # all on the strip, none in an overflow menu
            expect(tuning.get_by_role("tab", name=name, exact=True)).to_be_visible()
        # the chosen curve's name is whole in its box (Auto's; a calibration's ends in "…", the list shows it all)
        assert page.locator("#curve-demo input").evaluate("el => el.scrollWidth <= el.clientWidth")
        tuning.get_by_role("tab", name="Sweep", exact=True).click()
        _fill(page, "#sweep-thresh-demo textarea", "0.1, 0.5")
        _fill(page, "#sweep-K-demo textarea", "2, 4")
        page.locator("#sweep-demo").click()
        expect(page.locator("#sweep-status-demo")).to_contain_text("Sweep done: 4 points", timeout=180_000)
        table = page.locator("#sweep-table-demo")
        headers = table.locator('[role="columnheader"]')
        expect(headers).to_have_count(11)
        viewport = table.locator(".virtual-table-viewport")
        for end in ("0", "el.scrollWidth"):  # scrolled to either end, the column there is wholly on screen
            viewport.evaluate(f"el => {{ el.scrollLeft = {end}; }}")
            edge = headers.nth(0 if end == "0" else 10)
            seen, cell = viewport.bounding_box(), edge.bounding_box()
            assert seen["x"] - 1 <= cell["x"] and cell["x"] + cell["width"] <= seen["x"] + seen["width"] + 1, end
        expect(headers.nth(10)).to_have_attribute("title", "Pareto")
        table.screenshot(path=str(shots / "phone_sweep_table.png"))
        plot = page.locator("#sweep-plot-demo img")
        expect(plot).to_be_visible()
        assert _figure_width(plot) == 340
        plot.screenshot(path=str(shots / "phone_pareto.png"))

        tuning.get_by_role("tab", name="Calibrate", exact=True).click()
        page.locator("#calibrate-demo").click()
        expect(page.locator("#calibrate-status-demo")).to_contain_text("Calibrated", timeout=120_000)
        calibration = page.locator("#calibrate-plot-demo img")
        expect(calibration).to_be_visible()
        assert _figure_width(calibration) == 340  # the calibration plot's phone layout
        calibration.screenshot(path=str(shots / "phone_calibration.png"))

        tuning.get_by_role("tab", name="Export", exact=True).click()
        page.locator("#export-format-demo").get_by_text("magcache Python snippet").click()
        code = page.locator("#export-code-demo")
        expect(code).to_contain_text("magcache.apply", timeout=20_000)
        assert _no_horizontal_overflow(code)  # wrapped: every line readable without scrolling
        expect(code.get_by_role("button", name="Copy")).to_be_visible()
        tuning.screenshot(path=str(shots / "phone_tuning_export.png"))
    finally:
        page.close()


def test_strategies_view_on_a_desktop(app, browser, shots):
    """The Demo tab's Strategies accordion: two strategies at one level fill the table and the plot; the speed-up
    target shows the optimal schedule beside the threshold solution."""
    from playwright.sync_api import expect

    url, _ = app
    page = _open(browser, url, DESKTOP)
    try:
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
        plot = page.locator("#strategies-plot-demo img")
        expect(plot).to_be_visible()
        assert _figure_width(plot) == 800  # the wide layout on a desktop
        view.screenshot(path=str(shots / "strategies.png"))
    finally:
        page.close()
