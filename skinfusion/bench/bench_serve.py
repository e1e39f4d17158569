"""The load benchmark of ``skinfusion serve``: N concurrent clients on loopback, beside in-process ``predict_proba``.

``run_bench`` starts ``skinfusion serve`` as a child process on a loopback port (or uses the URL
of one already running on this machine), waits until ``/readyz`` says yes, and lets ``clients``
threads post one image per request to ``/v1/predict`` until ``requests`` have been sent or
``duration_s`` has passed, whichever comes first. Then it stops the server (SIGTERM) and times
``Ensemble.predict_proba`` on the same image files in this process, so that the served
throughput can be read against the batch throughput of the same model on the same machine.

The client side is kept cheap, because on a small machine it shares the cores with the server:
every request body (multipart, one image) is built once, each client keeps one keep-alive
``http.client`` connection, and an answer is checked for its status and one key, not parsed. The
client's CPU time is measured (``getrusage``) and reported, next to the server's (``/proc``).

Images are generated (a skin-coloured square with a dark irregular lesion, JPEG) unless
``images_dir`` gives real files. Numbers from a shared machine are noisy; the report says how
many cores there were and the load average before and after.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ensemble.rundir import model_id

from skinfusion.bench.loadgen import (
    READY_TIMEOUT_S,
    ServerProcess,
    address_in_use,
    free_port,
    listener_pid,
    loopback_url,
    rss_mb,
    run_load,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BOUNDARY = "skinfusion-bench-7d1f"
# The goals (2 cores, 16 clients): served/in-process throughput, p99, errors, RSS growth per 10,000 requests.
GOAL_RATIO, GOAL_P99_MS, GOAL_RSS_MB, GOAL_RSS_PER = 0.5, 250.0, 50.0, 10_000


@dataclasses.dataclass
class BenchConfig:
    """What one ``skinfusion bench-serve`` measures (its flags)."""

    run: str
    url: str | None = None
    clients: int = 16
    requests: int = 10_000
    duration_s: float = 120.0
    images_dir: str | None = None
    n_images: int = 64
    image_size: int = 256
    port: int = 0
    api_key: str | None = None
    batch_wait_ms: float | None = None
    max_batch: int | None = None
    workers: int = 1
    warmup_requests: int = 200
    inproc_s: float = 10.0
    inproc_batch: int = 64
    progress: bool = True


# ---------------------------------------------------------------- images
def synthetic_images(n: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` generated lesion-like JPEGs of ``size`` px as ``(name, bytes)``: SYNTHETIC, never patient data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    theta = np.arctan2(yy, xx)
    out = []
    for i in range(n):
        skin = np.array([rng.uniform(200, 235), rng.uniform(160, 195), rng.uniform(140, 175)])
        img = np.ones((size, size, 3)) * skin + rng.normal(0, 6, (size, size, 3))
        radius = rng.uniform(0.14, 0.34)
        wobble = sum(rng.uniform(0, 0.2) / k * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
        border = radius * (1 + wobble)
        mask = np.clip((border - np.hypot(xx - rng.normal(0, 0.04), yy - rng.normal(0, 0.04))) / 0.02, 0, 1)[..., None]
        lesion = np.array([rng.uniform(40, 140), rng.uniform(30, 85), rng.uniform(20, 60)])
        img = np.clip(img * (1 - mask) + lesion * mask, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise RuntimeError("JPEG encoding failed")
        out.append((f"synthetic-{i:03d}.jpg", buf.tobytes()))
    return out


def folder_images(folder: str | os.PathLike, limit: int) -> list[tuple[str, bytes]]:
    """Up to ``limit`` image files of ``folder`` (sorted by name) as ``(name, bytes)``.

    Raises:
        FileNotFoundError: if the folder does not exist.
        ValueError: if it holds no image file.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"--images {path}: no such folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"--images {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return [(p.name, p.read_bytes()) for p in files]


def multipart(name: str, data: bytes) -> bytes:
    """A ``multipart/form-data`` body with one file in the field ``files`` (boundary ``BOUNDARY``)."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


# ---------------------------------------------------------------- processes
def in_process_throughput(run: str, paths: Sequence[str], batch_size: int, seconds: float) -> dict[str, Any]:
    """Images per second of ``Ensemble.predict_proba`` on ``paths`` (read, resized and scored, as the server does).

    One warm-up call first (graph tracing), then whole batches until ``seconds`` have passed
    (at least one batch).
    """
    from colorspaces import ImageError, read_image
    from ensemble.api import load

    ens = load(run)
    readable = []
    for p in paths:
        try:
            read_image(p)
            readable.append(p)
        except ImageError:
            pass  # the server answered it with an error too (counted there)
    if not readable:
        return {"images": 0, "seconds": 0.0, "batch_size": batch_size, "images_per_s": None,
                "note": "no readable image to score", "image_size": ens.image_size, "load_size": ens.load_size}
    batch = [readable[i % len(readable)] for i in range(batch_size)]
    ens.predict_proba(batch[: min(4, batch_size)], batch_size=batch_size)
    ens.predict_proba(batch, batch_size=batch_size)  # the full batch shape traced too
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        ens.predict_proba(batch, batch_size=batch_size)
        n += len(batch)
    elapsed = time.perf_counter() - t0
    return {"images": n, "seconds": round(elapsed, 3), "batch_size": batch_size,
            "images_per_s": round(n / elapsed, 2), "image_size": ens.image_size, "load_size": ens.load_size}


# ---------------------------------------------------------------- the whole benchmark
def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's four goals, each with the measured value and whether it was met (None: not measurable)."""
    load, ratio = report["load"], report.get("served_over_in_process")
    growth = load["server"]["rss_growth_mb"]
    n = load["requests"]
    return {
        "throughput": {"goal": f">= {GOAL_RATIO:.0%} of in-process", "value": ratio,
                       "met": None if ratio is None else ratio >= GOAL_RATIO},
        "p99_latency": {"goal": f"<= {GOAL_P99_MS:g} ms", "value": load["latency_ms"]["p99"],
                        "met": None if load["latency_ms"]["p99"] is None else load["latency_ms"]["p99"] <= GOAL_P99_MS},
        "errors": {"goal": "0", "value": load["errors"], "met": load["errors"] == 0 and n > 0},
        "rss_growth": {"goal": f"< {GOAL_RSS_MB:g} MB over {GOAL_RSS_PER:,} requests",
                       "value": growth, "requests": n,
                       # Fewer requests than the goal's: met only if the growth is already under the bound.
                       "met": None if growth is None else growth < GOAL_RSS_MB},
    }


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Run the whole benchmark described by ``cfg`` and return its report (see ``format_table``).

    Raises:
        FileNotFoundError, ValueError: a missing run or image folder, a non-loopback ``--url``.
        RuntimeError: the server would not start or be reached (with its log's tail).
    """
    try:  # a missing run stops here, before anything starts
        mid = model_id(cfg.run)  # TensorFlow-free: the client process stays light beside the server
    except FileNotFoundError:
        raise FileNotFoundError(f"--run {cfg.run}: no fused ensemble (no ensemble/manifest.json); run skinfusion "
                                "fuse first") from None
    images = (folder_images(cfg.images_dir, cfg.n_images) if cfg.images_dir
              else synthetic_images(cfg.n_images, cfg.image_size))
    bodies = [multipart(name, data) for name, data in images]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Connection": "keep-alive"}
    if cfg.api_key:
        headers["X-API-Key"] = cfg.api_key
    tty = sys.stderr.isatty()
    last_line = [0.0]

    def progress(line: str) -> None:
        if not cfg.progress:
            return
        if tty:
            sys.stderr.write("\r" + line + "   ")
            sys.stderr.flush()
        elif time.monotonic() - last_line[0] >= 10:  # in a log file: a line every 10 s, not a flood
            last_line[0] = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "command": "skinfusion bench-serve",
        "run": os.path.abspath(cfg.run), "model_id": mid,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("api_key", "progress")},
        "images": {"source": cfg.images_dir or "synthetic", "count": len(images),
                   "mean_kb": round(sum(len(d) for _, d in images) / len(images) / 1024, 1)},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg()},
    }
    tmp = Path(tempfile.mkdtemp(prefix="skinfusion-bench-serve-"))
    server = None
    try:
        if cfg.url:
            host, port, base = loopback_url(cfg.url)
            pid = listener_pid(port)
            if pid is None:
                say(f"note: no process found listening on port {port}; server RSS and CPU are not reported")
        else:
            host, port, base = "127.0.0.1", cfg.port or free_port(), ""
            extra = ["--workers", str(cfg.workers)]
            if cfg.batch_wait_ms is not None:
                extra += ["--batch-wait-ms", str(cfg.batch_wait_ms)]
            if cfg.max_batch is not None:
                extra += ["--max-batch", str(cfg.max_batch)]
            if cfg.api_key:
                extra += ["--api-key", cfg.api_key]
            for attempt in range(3):
                say(f"starting skinfusion serve --run {cfg.run} on 127.0.0.1:{port} ...")
                server = ServerProcess(cfg.run, port, extra, tmp)
                try:
                    server.wait_ready(READY_TIMEOUT_S,
                                      lambda s: progress(f"waiting for the server to warm up: {s:.0f} s"))
                    break
                except RuntimeError:
                    # A port this benchmark chose was taken by another process before the server started
                    # and took it: choose again. A --port the user gave is theirs: refused as it is.
                    if cfg.port or attempt == 2 or not address_in_use(server.log_tail(50)):
                        raise
                    server.stop()  # it has exited; this closes its log
                    port = free_port()
                    say(f"note: that port was taken meanwhile; trying port {port}")
            pid = server.proc.pid
        served_mid = _served_model_id(host, port, base, headers)
        report["server_url"] = f"http://{host}:{port}{base}"
        if served_mid != mid:
            say(f"warning: the server's model ({(served_mid or 'unknown')[:12]}) is not --run's ({mid[:12]}); "
                "the in-process comparison is then with another model")
        report["served_model_id"] = served_mid
        say(f"{cfg.clients} clients, up to {cfg.requests} requests or {cfg.duration_s:g} s, "
            f"{len(images)} {report['images']['source']} images ({report['images']['mean_kb']} kB each on average)")
        rss_ready = rss_mb(pid) if pid else None
        if cfg.warmup_requests:
            # Not measured: the first requests of each batch size make TensorFlow/oneDNN build and cache
            # their kernels, and the allocators grow to their working size. That is memory a leak check
            # should not count, so the RSS growth is measured from after this phase.
            warm = run_load(host, port, base + "/v1/predict", bodies, cfg.clients, cfg.warmup_requests,
                            cfg.duration_s, headers, pid)
            report["warmup"] = {"requests": warm["requests"], "errors": warm["errors"], "seconds": warm["seconds"],
                                "rss_ready_mb": rss_ready, "rss_after_mb": warm["server"]["rss_end_mb"]}
        report["load"] = run_load(host, port, base + "/v1/predict", bodies, cfg.clients, cfg.requests, cfg.duration_s,
                                  headers, pid, progress)
        report["load"]["server"]["rss_ready_mb"] = rss_ready
        if cfg.progress and tty:
            sys.stderr.write("\n")
        if server is not None:
            report["load"]["server"]["exit_status"] = server.stop()
            server = None
        report["machine"]["loadavg_after_load"] = os.getloadavg()
        say(f"in-process predict_proba on the same images for {cfg.inproc_s:g} s ...")
        paths = []
        for name, data in images:
            p = tmp / name
            p.write_bytes(data)
            paths.append(str(p))
        report["in_process"] = in_process_throughput(cfg.run, paths, cfg.inproc_batch, cfg.inproc_s)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    served, inproc = report["load"]["requests_per_s"], report["in_process"]["images_per_s"]
    report["served_over_in_process"] = round(served / inproc, 3) if inproc else None
    report["goals"] = goals(report)
    return report


def _served_model_id(host: str, port: int, base: str, headers: dict[str, str]) -> str | None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", base + "/v1/model", headers={k: v for k, v in headers.items() if k == "X-API-Key"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise RuntimeError(f"cannot reach the server at http://{host}:{port}{base}/v1/model ({exc}); is it running?") \
            from None
    if resp.status == 401:
        raise ValueError(f"the server at http://{host}:{port}{base} needs an API key: pass --api-key KEY")
    if resp.status != 200:
        raise RuntimeError(f"http://{host}:{port}{base}/v1/model answered {resp.status}; is it skinfusion serve?")
    try:
        return json.loads(body).get("model_id")
    except (ValueError, AttributeError):
        return None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}" if abs(value) >= 10 else f"{value:.2f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: load, latency, memory, CPU, in-process, then the goals met and missed."""
    load, srv, cli, inp = report["load"], report["load"]["server"], report["load"]["client"], report["in_process"]
    lat = load["latency_ms"]
    rows = [
        ("requests (ok / errors)", f"{load['requests']:,} ({load['ok']:,} / {load['errors']:,})"
                                   + (f"  {load['error_kinds']}" if load["errors"] else "")),
        ("stopped by", f"{load['stopped_by']} after {load['seconds']:.1f} s"),
        ("clients", str(cli["threads"])),
        ("served throughput", _fmt(load["requests_per_s"], " req/s")),
        ("latency p50 / p95 / p99", f"{_fmt(lat['p50'])} / {_fmt(lat['p95'])} / {_fmt(lat['p99'])} ms"),
        ("latency mean / max", f"{_fmt(lat['mean'])} / {_fmt(lat['max'])} ms"),
        ("in the app p50: decode / score / all", " / ".join(_fmt(load["server_timing_ms"][k]["p50"])
                                                           for k in ("decode", "score", "total")) + " ms"),
        ("server RSS ready / start / end", f"{_fmt(srv.get('rss_ready_mb'))} / {_fmt(srv['rss_start_mb'])} / "
                                           f"{_fmt(srv['rss_end_mb'])} MB (growth start -> end "
                                           f"{_fmt(srv['rss_growth_mb'])} MB; start = after "
                                           f"{report.get('warmup', {}).get('requests', 0)} warm-up requests)"),
        ("server CPU", f"{_fmt(srv['cpu_s'])} s ({_fmt(srv['cpu_cores_busy'])} cores busy)"),
        ("client CPU (this process)", f"{_fmt(cli['cpu_s'])} s ({_fmt(cli['cpu_cores_busy'])} cores busy)"),
        ("in-process predict_proba", f"{_fmt(inp['images_per_s'])} images/s (batch {inp['batch_size']}, "
                                     f"{inp['images']} images in {inp['seconds']:.1f} s)"
                                     + (f"  {inp['note']}" if inp.get("note") else "")),
        ("served / in-process", _fmt(report["served_over_in_process"])),
        ("machine", f"{report['machine']['cpu_count']} cores, load average before "
                    f"{report['machine']['loadavg_before'][0]:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("goals (issue 19: 2 cores, 16 clients):")
    for name, g in report["goals"].items():
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[g["met"]]
        extra = ""
        if name == "rss_growth" and g["requests"] < GOAL_RSS_PER:
            extra = f" (measured over {g['requests']:,} requests)"
        lines.append(f"  {mark} {name:<12} goal {g['goal']}, measured {_fmt(g['value'])}{extra}")
    return "\n".join(lines)
