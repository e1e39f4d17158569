"""Loopback load for ``skinfusion bench-serve``: a served process's tree, RSS and CPU, and N keep-alive clients.

Split from ``bench_serve`` (the benchmark's configuration, images and report) so each module has one job.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 120
READY_TIMEOUT_S = 600  # TensorFlow's import, the bundle's load and the warm-up, on a busy small machine

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


# Ports below the kernel's ephemeral range (where bind(port 0) and every outgoing connection draw theirs)
# and above Ray's default worker ports (10002-19999): a port chosen here is taken in the gap before the
# server binds it only by another explicit bind, not by any process opening connections. A port drawn
# with bind(0) was once taken in that gap by a Ray cluster on the other test worker (CI, stop 41).
_QUIET_PORTS = (20000, 32768)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; elsewhere the draw below still checks each port


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` now, outside the ephemeral range where the system can.

    A port can still be taken before the caller binds it; callers that start a server retry on
    "address already in use" (see ``address_in_use``).
    """
    lo, hi = _QUIET_PORTS
    e_lo, e_hi = _ephemeral_range()
    draw = random.SystemRandom()  # not the seeded global generator: parallel test workers must differ
    ports: list[int] = []
    for _ in range(200 * n):
        if len(ports) == n:
            return ports
        port = draw.randrange(lo, hi)
        if port in ports or e_lo <= port <= e_hi:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    # A crowded quiet range: fall back to the kernel's choice.
    while len(ports) < n:
        with socket.socket() as s:
            s.bind((host, 0))
            if (port := s.getsockname()[1]) not in ports:
                ports.append(port)
    return ports


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (see ``free_ports``)."""
    return free_ports(1)[0]


def address_in_use(log: str) -> bool:
    """Whether a server's log says its port was taken: ``skinfusion serve``'s own refusal, or the
    system's "address already in use" from a server that binds later."""
    return "already in use" in log.lower()


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
