"""What ``skinfusion serve`` wraps around every request: Prometheus metrics, the API key check and the upload limit.

With ``serve --workers N`` each worker is its own process. Prometheus counters kept in a process's
memory would then answer each scrape with that one worker's share (and seem to go backwards when the
next scrape reaches another worker). So when ``$PROMETHEUS_MULTIPROC_DIR`` is set (``skinfusion
serve --workers N`` makes a fresh one per start) prometheus-client's multiprocess mode writes every
worker's values to files there, and ``/metrics`` adds them up with a ``MultiProcessCollector``.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import time
from typing import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values
from starlette.exceptions import HTTPException

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Reachable without the API key: liveness/readiness probes, the page itself (static files holding
# no model data; the page asks for the key and sends it with its API calls) and the API docs (the
# schema, no model data; Swagger UI's "Authorize" button then sends the key with each call).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect",
                          "/openapi.json", "/redoc"})
PUBLIC_PREFIXES = ("/static/",)
AUTH_HELP = "send the key as the header 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
# Metric labels: known routes by name, everything else as one label (no unbounded label values).
_ROUTES = ("/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/readyz", "/metrics", "/", "/docs",
           "/openapi.json")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The service's options (the ``skinfusion serve`` flags that shape the app)."""

    api_key: str | None = None
    max_upload_mb: float = 20.0
    cors_origins: tuple[str, ...] = ()
    batch_wait_ms: float = 5.0
    max_batch: int = 32
    max_queue: int | None = 128

    @property
    def max_upload_bytes(self) -> int:
        """The request body limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


def multiprocess_metrics() -> bool:
    """Whether this process records metrics in prometheus-client's multiprocess files.

    prometheus-client chooses when it is first imported, from ``$PROMETHEUS_MULTIPROC_DIR``; a
    worker of ``serve --workers N`` is a fresh interpreter started after the parent set it.
    """
    return bool(os.environ.get(MULTIPROC_ENV)) and values.ValueClass is not values.MutexValue


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter("skinfusion_http_requests_total", "HTTP requests answered",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.errors = Counter("skinfusion_http_errors_total", "HTTP requests answered with status >= 400",
                              ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("skinfusion_http_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.images = Counter("skinfusion_images_scored_total", "Images scored", registry=self.registry)
        self.batch_size = Histogram("skinfusion_batch_images", "Images per forward pass (micro-batch size)",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        # livesum: the requests in flight now, summed over the live workers (a dead worker's are dropped).
        self.in_flight = Gauge("skinfusion_http_requests_in_flight", "HTTP requests being answered now",
                               registry=self.registry, multiprocess_mode="livesum")

    def on_batch(self, n: int) -> None:
        """Record one forward pass of ``n`` images."""
        self.images.inc(n)
        self.batch_size.observe(n)

    def on_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        self.requests.labels(endpoint, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of ``GET /metrics``: every worker's values added up in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def process_exit(self) -> None:
        """At a worker's shutdown: drop its live gauges (its counters stay counted)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def _endpoint(path: str) -> str:
    return path if path in _ROUTES else ("/static" if path.startswith("/static/") else "other")


async def send_json(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``{"detail": detail}`` with ``status`` straight through ASGI ``send``."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI re-raises HTTPExceptions from body parsing."""


class GuardMiddleware:
    """ASGI middleware: metrics for every request, the API key check, and the upload size limit.

    The size limit is checked on ``Content-Length`` before the body is read, and counted while
    it streams for a chunked upload that declares none.
    """

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    def _authorised(self, scope) -> bool:
        key = self.settings.api_key
        if not key or scope["method"] == "OPTIONS":  # CORS pre-flights carry no credentials
            return True
        path = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        # compare_digest: the time taken says nothing about how much of the key was right.
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, recorded = time.perf_counter(), [500], [False]
        self.metrics.in_flight.inc()

        def record() -> None:
            if not recorded[0]:
                recorded[0] = True
                self.metrics.on_request(_endpoint(scope["path"]), scope["method"], status[0], time.perf_counter() - t0)
                self.metrics.in_flight.dec()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: a client holding its answer finds it in the
                # next scrape, whichever worker answers that scrape.
                record()
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            record()

    async def _guarded(self, scope, receive, send):
        if not self._authorised(scope):
            return await send_json(send, 401, f"missing or wrong API key; {AUTH_HELP}",
                                   [(b"www-authenticate", b'Bearer realm="skinfusion"')])
        limit = self.settings.max_upload_bytes
        too_large = (f"the upload is larger than the server's limit of {self.settings.max_upload_mb:g} MB "
                     "(skinfusion serve --max-upload-mb)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_json(send, 413, too_large, [(b"connection", b"close")])
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, too_large)
            return message

        await self.app(scope, counted, send)
