"""The HTTP service of ``skinfusion serve``: a FastAPI app over one loaded ensemble, with micro-batching.

Endpoints: ``POST /v1/predict`` and ``POST /v1/explain`` (multipart uploads, field ``files``),
``GET /v1/model``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus), the
generated docs (``/docs``, ``/openapi.json``) and the web page at ``/`` (``static/``).

Every error answer is JSON ``{"detail": "<one readable sentence>"}``: a client's mistake gets a
4xx with what to fix, and a bug gets a 500 that says only that (its traceback goes to the
server log, never into the answer). No endpoint takes a server-side path: images arrive as
uploads only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException

from colorspaces import ImageError
from ensemble.api import explain_with
from ensemble.scoring import ScoringEngine
from skinfusion.workflows.batching import MicroBatcher, QueueFull
from skinfusion.workflows.serving_io import (
    decode_upload,
    details_json,
    display_name,
    elapsed_ms,
    explanation_json,
    fusion_metadata,
    metadata_warnings,
    model_summary,
    parse_metadata,
    prepare_upload,
)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
# Reachable without the API key: liveness/readiness probes, and the page itself (static files
# holding no model data; the page asks for the key and sends it with its API calls).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})
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


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (so several apps can live in one process)."""

    def __init__(self) -> None:
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

    def on_batch(self, n: int) -> None:
        """Record one forward pass of ``n`` images."""
        self.images.inc(n)
        self.batch_size.observe(n)


def _endpoint(path: str) -> str:
    return path if path in _ROUTES else ("/static" if path.startswith("/static/") else "other")


async def _send_json(send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
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
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            endpoint = _endpoint(scope["path"])
            self.metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
            if status[0] >= 400:
                self.metrics.errors.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send):
        if not self._authorised(scope):
            return await _send_json(send, 401, f"missing or wrong API key; {AUTH_HELP}",
                                    [(b"www-authenticate", b'Bearer realm="skinfusion"')])
        limit = self.settings.max_upload_bytes
        too_large = (f"the upload is larger than the server's limit of {self.settings.max_upload_mb:g} MB "
                     "(skinfusion serve --max-upload-mb)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, too_large, [(b"connection", b"close")])
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


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """One sentence for FastAPI's validation errors: which form field is missing or wrong."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "header")]
        field = loc[0] if loc else "request"
        if err.get("type") == "missing" and field == "files":
            parts.append("no image uploaded: send one or more files in the multipart form field 'files'")
        elif field == "files":
            parts.append("form field 'files' must hold uploaded image files (multipart/form-data), not text; "
                         "the server reads no paths")
        else:
            parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no such endpoint {request.url.path}; see /docs"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(ImageError)
    async def bad_image(request: Request, exc: ImageError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's mistake: the traceback is for the server's log only.
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error; the details are in the server log")


class Service:
    """The loaded ensemble, its batcher and readiness; what the routes work with."""

    def __init__(self, ens: ScoringEngine, mid: str, settings: ServeSettings, metrics: Metrics):
        self.ens, self.model_id, self.settings = ens, mid, settings
        self.batcher = MicroBatcher(self._score, settings.max_batch, settings.batch_wait_ms, metrics.on_batch,
                                    settings.max_queue)
        self.ready = False

    def _score(self, items: list[tuple[np.ndarray, tuple[str, ...], dict | None]]) -> list:
        """One forward pass over images from any number of requests (runs on the model thread)."""
        batch = np.stack([img for img, _, _ in items])
        meta = [m for _, _, m in items] if self.ens.metadata_fields else None
        scores = self.ens.score_details(batch, meta=meta, reasons=[r for _, r, _ in items])
        return [scores.row(j, self.ens.views, self.ens.threshold) for j in range(len(items))]

    def _warm_up(self) -> None:
        """Score and explain one blank image: traces every graph before /readyz says yes."""
        blank = np.full((self.ens.load_size, self.ens.load_size, 3), 128, np.uint8)
        meta = [{}] if self.ens.metadata_fields else None
        self._score([(blank, (), meta[0] if meta else None)])
        explain_with(self.ens, blank, {} if self.ens.metadata_fields else None)

    async def start(self) -> None:
        """Start the batcher and warm the model up."""
        await self.batcher.start()
        await self.batcher.run(self._warm_up)
        self.ready = True
        logger.info("model %s warmed up; ready", self.model_id[:12])

    async def stop(self) -> None:
        """Stop the batcher (after uvicorn has let in-flight requests finish)."""
        self.ready = False
        await self.batcher.stop()

    def _decode_one(self, data: bytes, name: str, prepare: bool) -> tuple:
        image = decode_upload(data, name)
        # Prepared, the original is dropped here: a request waiting for its batch holds only the
        # small resized copy, not a full-size photo.
        return (None, *prepare_upload(image, self.ens.preprocess)) if prepare else (image,)

    async def decode(self, files: Sequence[UploadFile], prepare: bool = False) -> list[tuple]:
        """``(name, RGB image, decode ms)`` per upload; with ``prepare``, ``(name, None, decode and prepare ms,
        resized, OOD reasons)``.

        Decoding (and preparing) runs in a worker thread, off the event loop, in one hop per file:
        under load every extra hand-over between the loop and a thread adds latency.
        """
        out = []
        for f in files:
            t0 = time.perf_counter()
            name = display_name(f.filename)
            image, *prepared = await asyncio.to_thread(self._decode_one, await f.read(), name, prepare)
            out.append((name, image, elapsed_ms(t0), *prepared))
        return out


def _form_metadata(ens: ScoringEngine, n: int, age, sex, site, metadata) -> tuple[list[dict], list[str]]:
    if ens.metadata_fields and all(v is None for v in (age, sex, site, metadata)):
        # As predict(): a model fused with metadata is never silently scored as "all unknown".
        raise ValueError(f"this model fuses metadata ({', '.join(ens.metadata_fields)}): send them as form "
                         "fields (an empty value means unknown) or as one JSON 'metadata' field")
    parsed = parse_metadata(n, {"age": age, "sex": sex, "site": site}, metadata)
    return parsed, metadata_warnings(ens, parsed)


def create_app(ens: ScoringEngine, mid: str, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``ens`` (model id ``mid``, the manifest's SHA-256).

    Use it as an ASGI app (uvicorn) or with ``fastapi.testclient.TestClient`` in a ``with``
    block, which runs the start-up (batcher and warm-up) and the shutdown.
    """
    settings = settings or ServeSettings()
    metrics = Metrics()
    service = Service(ens, mid, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="skinfusion", version=str(ens.manifest.get("versions", {}).get("skinfusion", "")),
                  description="Melanoma vs. nevus from dermoscopic images (research software, not a medical "
                              f"device). With --api-key, {AUTH_HELP}.", lifespan=lifespan)
    app.state.service, app.state.metrics = service, metrics
    _add_error_handlers(app)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        # Outermost, so that pre-flights are answered before the key check; off unless asked for.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    files_doc = File(..., description="one or more image files (JPEG, PNG, BMP, TIFF, WebP)")
    meta_doc = ("for a model fused with metadata: applied to every file of the request; empty = unknown. "
                "Or give the JSON field 'metadata' instead")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up", responses={503: {"description": "warming up"}})
    async def readyz():
        if not service.ready:
            return _error(503, "the model is still warming up")
        return {"status": "ready", "model_id": service.model_id}

    @app.get("/v1/model", summary="What the loaded model is and how it was validated")
    async def model() -> dict:
        return model_summary(ens, service.model_id)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", summary="Fused and per-branch melanoma probabilities and the OOD verdict per image")
    async def predict(files: list[UploadFile] = files_doc, age: str | None = Form(None, description=meta_doc),
                      sex: str | None = Form(None, description=meta_doc),
                      site: str | None = Form(None, description=meta_doc),
                      metadata: str | None = Form(None, description="JSON: one object for all files, or a list "
                                                  "of objects, one per file in upload order")) -> dict:
        t0 = time.perf_counter()
        meta, warnings = _form_metadata(ens, len(files), age, sex, site, metadata)
        service.batcher.check_room(len(files))  # a full queue answers 503 before any decoding work
        decoded = await service.decode(files, prepare=True)
        items = [(resized, reasons, (fusion_metadata(ens, [m]) or [None])[0])
                 for (_, _, _, resized, reasons), m in zip(decoded, meta)]
        t1 = time.perf_counter()
        rows = await service.batcher.submit(items)
        score_ms = elapsed_ms(t1)
        images = [details_json(d, name, ens.threshold, service.model_id,
                               {"decode": dec, "score": score_ms, "total": elapsed_ms(t0)})
                  for d, (name, _, dec, _, _) in zip(rows, decoded)]
        return {"model_id": service.model_id, "images": images, "warnings": warnings,
                "timing_ms": {"total": round(elapsed_ms(t0), 2)}}

    @app.post("/v1/explain", summary="predict plus each branch's Grad-CAM heat map and view, as base64 PNGs")
    async def explain(files: list[UploadFile] = files_doc, age: str | None = Form(None, description=meta_doc),
                      sex: str | None = Form(None, description=meta_doc),
                      site: str | None = Form(None, description=meta_doc),
                      metadata: str | None = Form(None)) -> dict:
        t0 = time.perf_counter()
        meta, warnings = _form_metadata(ens, len(files), age, sex, site, metadata)
        service.batcher.check_room(len(files))
        decoded = await service.decode(files)
        images = []
        for (name, image, dec), m in zip(decoded, meta):
            t1 = time.perf_counter()
            fm = (fusion_metadata(ens, [m]) or [None])[0]
            expl = await service.batcher.run(explain_with, ens, image, fm)
            pictures = await asyncio.to_thread(explanation_json, expl)
            row = details_json(expl.details, name, ens.threshold, service.model_id,
                               {"decode": dec, "explain": elapsed_ms(t1), "total": elapsed_ms(t0)})
            images.append({**row, **pictures})
        return {"model_id": service.model_id, "images": images, "warnings": warnings,
                "timing_ms": {"total": round(elapsed_ms(t0), 2)}}

    return app
