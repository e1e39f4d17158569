"""``skinfusion serve`` as a process on loopback (issue 26): /metrics summed over ``--workers 2``, Ctrl-C exits 130,
HEAD answers 200, /v1/explain's memory stays bounded by one full-size image, and an export is served without
TensorFlow. The model is the committed 16-px bundle (an export of it is made for the last test).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
import httpx  # noqa: E402

from test_serve import lesion, png, server_log, start_server, upload  # noqa: E402


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample ``name{labels}`` in an exposition text (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_add_up_across_two_workers_and_never_go_backwards():
    earlier = set(Path(tempfile.gettempdir()).glob("skinfusion-metrics-*"))
    proc, url = start_server("--workers", "2")
    try:
        n = 20
        for i in range(n):
            # A new connection per request (no keep-alive client): the kernel spreads them over the workers.
            assert httpx.post(url + "/v1/predict", files=upload(png(lesion(i, 40))), timeout=60).status_code == 200
        predicts, images = [], []
        for _ in range(6):
            text = httpx.get(url + "/metrics", timeout=30).text
            predicts.append(_sample(text, "skinfusion_http_requests_total",
                                    'endpoint="/v1/predict",method="POST",status="200"'))
            images.append(_sample(text, "skinfusion_images_scored_total"))
        assert predicts == [n] * 6, predicts
        assert images == [n] * 6, images
        assert _sample(text, "skinfusion_http_request_duration_seconds_count", 'endpoint="/v1/predict"') == n
        assert "skinfusion_http_requests_in_flight" in text
        metrics_dirs = set(Path(tempfile.gettempdir()).glob("skinfusion-metrics-*")) - earlier
        assert len(metrics_dirs) == 1, "the workers share one fresh metrics folder while the server runs"
    finally:
        rc = _stop(proc)
    assert rc == 0, server_log(proc)
    assert not any(d.exists() for d in metrics_dirs), "the metrics folder is removed when the server stops"


def test_head_answers_200_over_loopback_and_ctrl_c_exits_130_after_the_drain():
    proc, url = start_server()
    try:
        for path in ("/", "/healthz", "/readyz"):
            r = httpx.head(url + path, timeout=30)
            assert r.status_code == 200 and r.content == b"", (path, r.status_code)
        assert httpx.get(url + "/", timeout=30).status_code == 200
    finally:
        rc = _stop(proc, signal.SIGINT)
    log = server_log(proc)
    assert rc == 130, log
    assert "Traceback" not in log and "interrupted; server stopped" in log


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _flat_png(side: int, shade: int) -> bytes:
    """A side x side grey RGB PNG written directly (a few kB: the rows compress to almost nothing)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\0" + bytes([shade]) * (3 * side)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read the server's memory")
def test_explain_holds_one_full_size_image_at_a_time_not_every_upload():
    side, count = 6000, 4
    one_image = side * side * 3  # 108 MB decoded
    uploads = [_flat_png(side, 100 + 20 * i) for i in range(count)]
    proc, url = start_server()
    try:
        # Warm every path first (a small explain), so the peak measured next is the uploads' alone.
        assert httpx.post(url + "/v1/explain", files=upload(png(lesion(1, 64))), timeout=120).status_code == 200
        before = _vm(proc.pid, "VmHWM")
        r = httpx.post(url + "/v1/explain", files=upload(*uploads), timeout=300)
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["images"]) == count
        growth = _vm(proc.pid, "VmHWM") - before
        print(f"\n/v1/explain of {count} {side}x{side} PNGs: peak RSS grew {growth / 1e6:.0f} MB "
              f"(one decoded image: {one_image / 1e6:.0f} MB)")
        # Decoded one at a time and shrunk at once: the peak is about one image (plus the decoder's
        # copy), far under the count x one_image that keeping them all would need.
        assert growth < 2.5 * one_image, growth
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from ensemble.export import export_bundle
    from test_serve import MEAN

    out = tmp_path_factory.mktemp("export") / "onnx"
    export_bundle(MEAN, out, "onnx")
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc to see the server's libraries")
@pytest.mark.slow  # converting the bundle to ONNX takes half a minute
def test_serving_an_export_never_loads_tensorflow(onnx_export):
    proc, url = start_server(run=onnx_export)
    try:
        # sys.modules is inside the server; TensorFlow's native library, once imported, shows in its memory map.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "tensorflow" not in maps.lower(), [ln for ln in maps.splitlines() if "tensorflow" in ln.lower()][:3]
        r = httpx.post(url + "/v1/predict", files=upload(png(lesion(2, 64))), timeout=60)
        assert r.status_code == 200 and r.json()["images"][0]["decision"] in ("melanoma", "nevus")
        assert httpx.get(url + "/v1/model", timeout=30).json()["method"] == "mean"
        r = httpx.post(url + "/v1/explain", files=upload(png(lesion(2, 64))), timeout=60)
        assert r.status_code == 422 and "export" in r.json()["detail"], r.text
        assert "tensorflow" not in Path(f"/proc/{proc.pid}/maps").read_text().lower()
    finally:
        rc = _stop(proc)
    log = server_log(proc)
    assert rc == 0 and "onnx export" in log and "Traceback" not in log, log
