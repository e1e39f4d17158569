"""The web page of ``skinfusion serve`` in a real headless Chromium, driven by Selenium: pick an image, read the result,
check the heat maps loaded, take a screenshot, then send a bad file and check the old result is gone.

The browser and driver are the system's (Debian ``chromium`` and ``chromium-driver``, which ``.ci/run``
installs); nothing is downloaded. Without them the test is skipped, saying why, except when ``$CI``
is set: CI must run it, so there a missing browser is a failure. The screenshot is written under the
test's temporary directory, and also to ``$SKINFUSION_SCREENSHOT`` when that is set (to refresh the
docs/serve-page.png, the picture in docs/serve.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from test_serve import MEAN, lesion, png  # noqa: E402
from test_serve_processes import server_log, start_server  # noqa: E402


def _first_file(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c and os.path.isfile(c)), None)


# $SKINFUSION_CHROMIUM / $SKINFUSION_CHROMEDRIVER point at another install; else the Debian packages' paths.
CHROMIUM = _first_file(os.environ.get("SKINFUSION_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                       shutil.which("chromium-browser"))
CHROMEDRIVER = _first_file(os.environ.get("SKINFUSION_CHROMEDRIVER"), "/usr/bin/chromedriver",
                           shutil.which("chromedriver"))
# Flags for a closed network and a container: no sandbox (no user namespaces), no GPU, no /dev/shm
# (small in Docker), and nothing that phones home at start-up.
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1000")
TIMEOUT_S = 60


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no chromium found (apt-get install -y chromium)"
    if CHROMEDRIVER is None:
        return "no chromedriver found (apt-get install -y chromium-driver)"
    return None


def _require_browser() -> None:
    why = _missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"$CI is set and the browser test cannot run: {why}. CI must run it (.ci/run installs it).")
    pytest.skip(why)


@pytest.fixture
def browser(tmp_path):
    """A headless system Chromium under Selenium, with a fresh profile in the test's temp dir."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    # An explicit driver path: Selenium Manager then has nothing to look up or download.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server and wait for it to drain and exit (kill it only if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_page_scores_an_image_like_predict_shows_heatmaps_and_clears_the_result_on_error(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ensemble.api import predict

    image = tmp_path / "lesion.png"
    image.write_bytes(png(lesion(1, 128)))
    want = predict(str(image), run=MEAN)  # what the Python API says about the same file

    proc, url = start_server()
    try:
        wait = WebDriverWait(browser, TIMEOUT_S)
        browser.get(url + "/")
        wait.until(lambda d: "fusion" in d.find_element(By.ID, "model").text)
        assert "not a medical device" in browser.find_element(By.TAG_NAME, "body").text.lower()

        # The file input is hidden behind the drop zone; send_keys still chooses the file and fires "change".
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        shown = browser.find_element(By.ID, "fused").text
        # The page shows 3 decimals: it must be predict()'s number rounded (with float32 slack at a tie).
        assert len(shown.split(".")[-1]) == 3, shown
        assert float(shown) == pytest.approx(want, abs=0.0005 + 1e-6), (shown, want)
        assert browser.find_element(By.ID, "decision").text in ("melanoma", "nevus")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#branches tr")) == 3
        assert "Calibration caveat" in browser.find_element(By.CSS_SELECTOR, ".caveat").text
        assert browser.find_element(By.ID, "ood").text  # a verdict, whichever it is

        heatmaps = browser.find_elements(By.CSS_SELECTOR, "#heatmaps figure img")
        views = browser.find_elements(By.CSS_SELECTOR, "#views figure img")
        assert len(heatmaps) == 3 and len(views) == 4
        # Loaded and decoded: a broken or empty data URL leaves naturalWidth at 0.
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete", i) for i in heatmaps + views))
        for img in heatmaps + views:
            assert browser.execute_script("return arguments[0].naturalWidth", img) > 0, img.get_attribute("alt")

        # The whole page, not only the first screen: grow the window to the page plus the browser's own frame.
        height, frame = browser.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        browser.set_window_size(1280, min(max(height, 1000), 4000) + frame)
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        if os.environ.get("SKINFUSION_SCREENSHOT"):
            Path(os.environ["SKINFUSION_SCREENSHOT"]).write_bytes(data)

        # A failing request: the error is a sentence, and the previous probability is gone from the page.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"this is not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        error = browser.find_element(By.ID, "error")
        wait.until(lambda d: error.is_displayed() and error.text)
        wait.until(lambda d: not d.find_element(By.ID, "busy").is_displayed())
        message = error.text
        assert "could not be used" in message and "notes.png" in message and "{" not in message
        assert not browser.find_element(By.ID, "result").is_displayed()
        assert browser.find_element(By.ID, "fused").get_attribute("textContent") == ""
        assert browser.find_elements(By.CSS_SELECTOR, "#heatmaps figure img") == []
        assert shown not in browser.find_element(By.TAG_NAME, "main").text
        browser.save_screenshot(str(tmp_path / "page-error.png"))
    finally:
        _stop(proc)
    assert proc.returncode == 0, server_log(proc)


def test_a_flagged_image_shows_the_refusal_not_a_probability_or_a_badge(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png(lesion(3, 20)))  # under 32 px: the image-level check flags it out of distribution
    proc, url = start_server()
    try:
        wait = WebDriverWait(browser, TIMEOUT_S)
        browser.get(url + "/")
        wait.until(lambda d: "fusion" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(tiny))
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        badge = browser.find_element(By.ID, "decision")
        assert not badge.is_displayed() and badge.get_attribute("textContent") == ""  # no "nevus"/"melanoma" badge
        assert browser.find_element(By.ID, "fused").text == "withheld"
        assert "no decision" in browser.find_element(By.ID, "verdict-label").text
        ood = browser.find_element(By.ID, "ood").text
        assert "Out of distribution" in ood and "no decision" in ood
        headline = browser.find_element(By.CSS_SELECTOR, ".verdict .big").text
        assert not any(ch.isdigit() for ch in headline), headline  # no number in the headline
        assert "greyed" in browser.find_element(By.ID, "branchtable").get_attribute("class")
        browser.save_screenshot(str(tmp_path / "page-flagged.png"))
    finally:
        _stop(proc)
    assert proc.returncode == 0, server_log(proc)
