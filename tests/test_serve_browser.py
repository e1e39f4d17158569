"""The web page of ``skinfusion serve`` driven in headless Chromium: pick an image, read the result, take a screenshot.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), so no websocket library and no browser
download is needed. Skipped, saying why, when no chromium is installed (CI installs it: .ci/run).
The screenshot is written to ``$SKINFUSION_SCREENSHOT`` when set, to look at.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from test_serve import lesion, png, start_server  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "chromium-headless-shell",
                                               "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")


class Browser:
    """A headless Chromium page, commanded over the DevTools pipe."""

    def __init__(self, tmp: Path):
        self._to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, self._from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes on fd 4.
        def fds():
            os.dup2(self._to_chrome_r, 3)
            os.dup2(self._from_chrome_w, 4)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp}",
             "--window-size=1280,1000", "about:blank"],
            # close_fds=False: the child's fd closing runs after preexec_fn and would close 3 and 4 again.
            preexec_fn=fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self._to_chrome_r)
        os.close(self._from_chrome_w)
        self._ids, self._buf, self.session = itertools.count(1), b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, **params):
        """Send one command and return its result (events in between are dropped)."""
        mid = next(self._ids)
        msg = {"id": mid, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == mid:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        """Evaluate ``expression`` in the page and return its value."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def pick_file(self, path: Path) -> None:
        """Choose ``path`` in the page's file input, as a user would (fires its change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_chrome_w)
        os.close(self._from_chrome_r)


def test_the_page_scores_an_image_shows_heatmaps_and_reports_a_bad_file(tmp_path):
    proc, url = start_server()
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url + "/")
        browser.wait_for("document.getElementById('model').textContent.includes('fusion')")
        assert "not a medical device" in browser.js("document.body.innerText").lower()

        image = tmp_path / "lesion.png"
        image.write_bytes(png(lesion(1, 128)))
        browser.pick_file(image)
        browser.wait_for("!document.getElementById('result').hidden")
        fused = float(browser.js("document.getElementById('fused').textContent"))
        assert 0.0 <= fused <= 1.0
        assert browser.js("document.getElementById('decision').textContent") in ("melanoma", "nevus")
        assert browser.js("document.querySelectorAll('#heatmaps figure img').length") == 3
        assert browser.js("document.querySelectorAll('#views figure img').length") == 4
        assert browser.js("document.querySelectorAll('#branches tr').length") == 3
        assert "Calibration caveat" in browser.js("document.querySelector('.caveat').innerText")
        assert browser.js("document.getElementById('ood').textContent")  # a verdict, whichever it is
        # every picture decoded (a broken data URL has naturalWidth 0)
        assert browser.js("[...document.querySelectorAll('figure img')].every(i => i.naturalWidth > 0)")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        (tmp_path / "page.png").write_bytes(shot)
        if os.environ.get("SKINFUSION_SCREENSHOT"):
            Path(os.environ["SKINFUSION_SCREENSHOT"]).write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000

        bad = tmp_path / "notes.png"
        bad.write_bytes(b"this is not an image")
        browser.pick_file(bad)
        message = browser.wait_for("!document.getElementById('error').hidden && "
                                   "document.getElementById('error').textContent")
        assert "could not be used" in message and "notes.png" in message and "{" not in message
    finally:
        browser.close()
        proc.terminate()
        proc.wait(30)
