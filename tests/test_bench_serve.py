"""``skinfusion bench-serve``: the load benchmark's bounds, its report fields and its refusals, on a tiny bound.

Timing goals are not asserted (a shared CI machine says nothing about them); the counts, the
zero-error run, the bounds (request count and time) and the sanity of every number are. The model
is the committed 16-px bundle of tests/fixtures/legacy-0.1.0; images are generated.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from test_serve import MEAN  # noqa: E402
from test_serve_processes import start_server  # noqa: E402

from skinfusion.cli.bench_serve import main  # noqa: E402
from skinfusion.bench.bench_serve import listener_pid, loopback_url, synthetic_images  # noqa: E402

FAST = ["--warmup-requests", "4", "--in-process-s", "0.3", "--in-process-batch", "8", "--n-images", "8",
        "--image-size", "96", "-q"]


def _run(capsys, tmp_path, *args: str) -> tuple[int, dict, str]:
    out = tmp_path / "report.json"
    rc = main(["--run", str(MEAN), *args, *FAST, "--out", str(out)])
    printed = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else {}), printed.out + printed.err


def _sane(report: dict, n: int) -> None:
    load = report["load"]
    assert load["requests"] == load["ok"] == n and load["errors"] == 0 and load["error_kinds"] == {}
    assert load["requests_per_s"] > 0 and load["seconds"] > 0
    lat = load["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    srv = load["server"]
    assert srv["rss_start_mb"] > 50 and srv["rss_end_mb"] > 50  # a Python process with TensorFlow, in MB
    assert srv["rss_growth_mb"] == pytest.approx(srv["rss_end_mb"] - srv["rss_start_mb"], abs=0.11)
    assert srv["cpu_s"] > 0 and load["client"]["cpu_s"] >= 0
    assert load["server_timing_ms"]["total"]["p50"] > 0  # sampled from the answers
    inp = report["in_process"]
    assert inp["images_per_s"] > 0 and inp["images"] >= inp["batch_size"] == 8
    assert report["served_over_in_process"] == pytest.approx(load["requests_per_s"] / inp["images_per_s"], rel=0.01)
    assert set(report["goals"]) == {"throughput", "p99_latency", "errors", "rss_growth"}
    assert report["goals"]["errors"]["met"] is True
    assert all(g["met"] in (True, False) for g in report["goals"].values())


def test_bench_serve_starts_a_server_sends_the_bounded_requests_reports_and_stops_it(capsys, tmp_path):
    rc, report, printed = _run(capsys, tmp_path, "--clients", "2", "--requests", "40")
    assert rc == 0, printed
    _sane(report, 40)
    assert report["load"]["stopped_by"] == "requests"
    warm = report["warmup"]
    assert warm["requests"] == 4 and warm["errors"] == 0 and warm["rss_ready_mb"] > 50
    assert warm["rss_after_mb"] == pytest.approx(report["load"]["server"]["rss_start_mb"], abs=30)
    samples = report["load"]["server"]["rss_samples"]
    assert all(len(x) == 3 and x[2] > 50 for x in samples)
    assert report["load"]["server"]["exit_status"] == 0  # SIGTERM, drained, exited cleanly
    assert report["images"] == {"source": "synthetic", "count": 8, "mean_kb": report["images"]["mean_kb"]}
    for words in ("served throughput", "p50 / p95 / p99", "server RSS", "client CPU", "served / in-process",
                  "goals", "p99_latency"):
        assert words in printed, words
    assert "Traceback" not in printed


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield proc, url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_a_running_server_is_measured_until_the_time_bound(capsys, tmp_path, server):
    proc, url = server
    assert listener_pid(int(url.rsplit(":", 1)[1])) == proc.pid  # whose RSS is read
    rc, report, printed = _run(capsys, tmp_path, "--url", url, "--clients", "2", "--requests", "1000000",
                               "--duration-s", "1.5")
    assert rc == 0, printed
    load = report["load"]
    assert load["stopped_by"] == "time" and 0 < load["requests"] < 1_000_000
    assert 1.5 <= load["seconds"] < 15  # the requests in flight at the deadline finish, then it stops
    _sane(report, load["requests"])
    assert report["load"]["server"]["pid"] == proc.pid and proc.poll() is None  # not ours: left running


def test_failed_requests_are_counted_as_errors_and_the_goal_is_missed(capsys, tmp_path, server):
    _, url = server
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image at all")
    rc, report, printed = _run(capsys, tmp_path, "--url", url, "--clients", "2", "--requests", "6",
                               "--images", str(folder))
    assert rc == 0, printed  # a benchmark reports missed goals; it does not fail
    assert report["load"]["errors"] == 6 and report["load"]["ok"] == 0
    assert report["load"]["error_kinds"] == {"HTTP 422": 6}
    assert report["goals"]["errors"]["met"] is False and "MISSED errors" in printed


@pytest.mark.parametrize("args, words", [
    (["--url", "http://example.org:8000"], "only loads a server on this machine"),
    (["--url", "ftp://127.0.0.1"], "http:// URL"),
    (["--images", "/nonexistent/folder"], "--images /nonexistent/folder: no such folder"),
    (["--port", "70000"], "port number"),
    (["--clients", "0"], "at least 1"),
])
def test_bench_serve_refuses_bad_flags_with_one_line(capsys, args, words):
    try:
        rc = main(["--run", str(MEAN), *args, "-q"])
    except SystemExit as exc:  # argparse's refusal of a flag's value
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_a_missing_run_and_an_empty_image_folder_are_refused(capsys, tmp_path):
    assert main(["--run", str(tmp_path / "nope"), "-q"]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--run", str(MEAN), "--images", str(tmp_path / "empty"), "-q"]) == 2
    assert "no image files" in capsys.readouterr().err


def test_synthetic_images_are_distinct_jpegs_of_the_asked_size():
    import cv2
    import numpy as np

    imgs = synthetic_images(3, 80, seed=1)
    assert len({data for _, data in imgs}) == 3
    for name, data in imgs:
        assert name.endswith(".jpg") and data[:2] == b"\xff\xd8"
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (80, 80, 3)
    assert loopback_url("http://localhost:8123/") == ("localhost", 8123, "")

