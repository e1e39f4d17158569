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
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BOUNDARY = "skinfusion-bench-7d1f"
READY_TIMEOUT_S = 600  # TensorFlow's import, the bundle's load and the warm-up, on a busy small machine
REQUEST_TIMEOUT_S = 120
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
def _proc_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn ``--workers`` children), as far as /proc shows them."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _proc_children(p)
    return out


def rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of ``pid`` and its descendants in MB; None if /proc cannot tell."""
    total, seen = 0.0, False
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024.0
                    seen = True
        except OSError:
            pass
    return round(total, 1) if seen else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its descendants so far; None if /proc cannot tell."""
    tick, total, seen = os.sysconf("SC_CLK_TCK"), 0.0, False
    for p in process_tree(pid):
        try:
            # The command name (field 2) may hold spaces: count the fields after its closing parenthesis.
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            seen = True
        except (OSError, IndexError, ValueError):
            pass
    return total if seen else None


def listener_pid(port: int) -> int | None:
    """The process listening on loopback TCP ``port`` (through /proc/net/tcp and the fds), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{f[9]}]")
    candidates = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                candidates.append(int(proc.name))
        except OSError:
            continue
    # With --workers, the parent and its children share the socket: take the oldest (the parent).
    return min(candidates) if candidates else None


def manifest_sha256(run: str | os.PathLike) -> str:
    """The model id ``skinfusion serve`` reports: the SHA-256 of the run's ensemble manifest.

    Computed here rather than with ``serving_io.model_id``, which imports TensorFlow: the client
    process stays light while it shares the cores with the server.

    Raises:
        FileNotFoundError: if the run has no fused ensemble.
    """
    path = Path(run)
    for candidate in (path / "ensemble" / "manifest.json", path / "manifest.json"):
        if candidate.is_file():
            return hashlib.sha256(candidate.read_bytes()).hexdigest()
    raise FileNotFoundError(f"--run {path}: no fused ensemble (no ensemble/manifest.json); run skinfusion fuse first")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_url(url: str) -> tuple[str, int, str]:
    """``(host, port, base path)`` of an http:// URL on this machine.

    Raises:
        ValueError: for another scheme or a host that is not loopback (the benchmark must not load a remote server).
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise ValueError(f"--url {url}: give an http:// URL such as http://127.0.0.1:8000")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ValueError(f"--url {url}: the benchmark only loads a server on this machine (127.0.0.1, ::1 or "
                         "localhost); run bench-serve on the server's machine")
    return host, parts.port or 80, parts.path.rstrip("/")


class ServerProcess:
    """``skinfusion serve`` as a child process on a loopback port, its log in a temporary file."""

    def __init__(self, run: str, port: int, extra: Sequence[str], log_dir: Path):
        self.port, self.log_path = port, log_dir / "serve.log"
        cmd = [sys.executable, "-m", "skinfusion", "serve", "--run", run, "--host", "127.0.0.1", "--port", str(port),
               "-q", *extra]
        # -q: no access-log line per request (that costs the server CPU and would fill a pipe); the log
        # goes to a file, never a pipe nobody reads.
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the server's lifetime; stop() closes it
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError:
            self._log.close()
            raise

    def log_tail(self, n: int = 15) -> str:
        """The last ``n`` lines the server wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float, on_wait: Callable[[float], None] | None = None) -> None:
        """Block until ``GET /readyz`` answers 200.

        Raises:
            RuntimeError: if the server exits or is not ready within ``timeout`` seconds, with its log's tail.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"skinfusion serve exited with status {self.proc.returncode} before it was "
                                   f"ready; its last lines:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except (OSError, http.client.HTTPException):
                pass
            if on_wait:
                on_wait(time.monotonic() - t0)
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"skinfusion serve was not ready after {timeout:.0f} s; its last lines:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, wait for the drain (kill after 60 s); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------- load
class _Load:
    """Shared state of the client threads: tickets (the request bound), the deadline, and what came back."""

    def __init__(self, total: int, deadline: float):
        self.total, self.deadline = total, deadline
        self.lock = threading.Lock()
        self.issued = 0
        self.latencies: list[float] = []  # seconds, successful requests; list.append is atomic in CPython
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.server_timing: list[tuple[float, float, float]] = []  # (decode, score, total) ms, every 10th answer

    def ticket(self) -> int | None:
        with self.lock:
            if self.issued >= self.total or time.perf_counter() >= self.deadline:
                return None
            self.issued += 1
            return self.issued - 1

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors += 1
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _client(load: _Load, host: str, port: int, path: str, bodies: Sequence[bytes], headers: dict[str, str]) -> None:
    conn = None
    while (i := load.ticket()) is not None:
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            load.error(type(exc).__name__)
            if conn is not None:
                conn.close()
            conn = None
            continue
        if resp.status != 200 or b'"melanoma_probability"' not in data:
            load.error(f"HTTP {resp.status}")
        else:
            load.latencies.append(time.perf_counter() - t0)
            if i % 10 == 0:  # parse a sample only: the client must stay cheap
                try:
                    t = json.loads(data)["images"][0]["timing_ms"]
                    load.server_timing.append((t["decode"], t["score"], t["total"]))
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
        if resp.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def _percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {k: None for k in ("p50", "p95", "p99", "mean", "max")}
    ms = np.asarray(seconds) * 1000.0
    q = np.percentile(ms, [50, 95, 99])
    return {"p50": round(float(q[0]), 2), "p95": round(float(q[1]), 2), "p99": round(float(q[2]), 2),
            "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2)}


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_load(host: str, port: int, path: str, bodies: Sequence[bytes], clients: int, requests: int,
             duration_s: float, headers: dict[str, str], server_pid: int | None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Drive ``clients`` threads against ``POST path`` until ``requests`` are sent or ``duration_s`` passes.

    Returns:
        The load part of the report: counts, throughput, latency percentiles, the server's RSS
        and CPU at start and end, and this process's (the clients') CPU.
    """
    rss_start = rss_mb(server_pid) if server_pid else None
    server_cpu0 = cpu_seconds(server_pid) if server_pid else None
    cpu0, t0 = _cpu_self(), time.perf_counter()
    load = _Load(requests, t0 + duration_s)
    threads = [threading.Thread(target=_client, args=(load, host, port, path, bodies, headers), daemon=True,
                                name=f"bench-client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    last, samples = 0.0, []
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        now = time.perf_counter() - t0
        if now - last >= 1.0:
            last = now
            done = len(load.latencies) + load.errors
            if server_pid and len(samples) < 2000:  # a growth curve: a leak keeps rising, a warm-up levels off
                samples.append([round(now, 1), done, rss_mb(server_pid)])
            if progress:
                    progress(f"{done}/{requests} requests  {done / max(now, 1e-9):6.1f} req/s  {load.errors} errors  "
                         f"{now:5.0f}/{duration_s:.0f} s")
    elapsed = time.perf_counter() - t0
    client_cpu = _cpu_self() - cpu0
    rss_end = rss_mb(server_pid) if server_pid else None
    server_cpu1 = cpu_seconds(server_pid) if server_pid else None
    done = len(load.latencies) + load.errors
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    return {
        "requests": done,
        "ok": len(load.latencies),
        "errors": load.errors,
        "error_kinds": load.error_kinds,
        "stopped_by": "requests" if load.issued >= requests else "time",
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(load.latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": _percentiles(load.latencies),
        # Where the time goes, as the server measured it (a sample of answers): decoding and preparing the
        # upload, waiting for and sharing a forward pass, and the whole request inside the app. The
        # rest of the client's latency is HTTP and waiting for the event loop.
        "server_timing_ms": {k: _percentiles([x[j] / 1000.0 for x in load.server_timing])
                             for j, k in enumerate(("decode", "score", "total"))},
        "server": {"pid": server_pid, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
                   "rss_growth_mb": None if rss_start is None or rss_end is None else round(rss_end - rss_start, 1),
                   "rss_samples": samples,  # [seconds, requests done, RSS MB], about one a second
                   "cpu_s": None if server_cpu is None else round(server_cpu, 2),
                   "cpu_cores_busy": None if server_cpu is None else round(server_cpu / elapsed, 2)},
        "client": {"threads": clients, "cpu_s": round(client_cpu, 2), "cpu_cores_busy": round(client_cpu / elapsed, 2)},
    }


# ---------------------------------------------------------------- in-process
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
    mid = manifest_sha256(cfg.run)  # a missing run stops here, before anything starts
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
            say(f"starting skinfusion serve --run {cfg.run} on 127.0.0.1:{port} ...")
            server = ServerProcess(cfg.run, port, extra, tmp)
            server.wait_ready(READY_TIMEOUT_S, lambda s: progress(f"waiting for the server to warm up: {s:.0f} s"))
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
