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
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from fastapi import FastAPI, File, Form, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from colorspaces import ImageError
from ensemble.api import explain_with
from ensemble.runtime import ExportedEnsemble
from ensemble.scoring import ScoringEngine
from skinfusion.serve.batching import MicroBatcher, QueueFull
from skinfusion.serve.serving_guard import AUTH_HELP, GuardMiddleware, Metrics, ServeSettings  # noqa: F401
from skinfusion.serve.serving_io import (
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
from skinfusion.workflows.explaining import branch_thresholds


logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


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
        """Score (and, for a Keras bundle, explain) one blank image: traces every graph before /readyz says yes."""
        blank = np.full((self.ens.load_size, self.ens.load_size, 3), 128, np.uint8)
        meta = {} if self.ens.metadata_fields else None
        self._score([(blank, (), meta)])
        if not isinstance(self.ens, ExportedEnsemble):  # an export has no gradients: /v1/explain says so
            explain_with(self.ens, blank, meta, reasons=())

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

    def _decode_one(self, data: bytes, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
        # The original is dropped here, one file at a time: a request (waiting for its batch, or
        # explained image after image) holds only small resized copies, never several full-size
        # photos at once (four 9000 x 9000 PNGs would be 1 GB).
        return prepare_upload(decode_upload(data, name), self.ens.preprocess)

    async def decode(self, files: Sequence[UploadFile]) -> list[tuple]:
        """``(name, decode and prepare ms, image at load_size, image-level OOD reasons)`` per upload.

        Decoding and preparing run in a worker thread, off the event loop, in one hop per file:
        under load every extra hand-over between the loop and a thread adds latency.
        """
        out = []
        for f in files:
            t0 = time.perf_counter()
            name = display_name(f.filename)
            resized, reasons = await asyncio.to_thread(self._decode_one, await f.read(), name)
            await f.close()  # the upload's spooled bytes go now, not at the end of the request
            out.append((name, elapsed_ms(t0), resized, reasons))
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
            metrics.process_exit()

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

    # Declared for the OpenAPI schema (Swagger UI's "Authorize" button then sends the key); the check
    # itself is GuardMiddleware's, on every path but the public ones. auto_error=False: no second check.
    guard = ([Security(APIKeyHeader(name="X-API-Key", auto_error=False, description=AUTH_HELP)),
              Security(HTTPBearer(auto_error=False, description=AUTH_HELP))] if settings.api_key else [])
    files_doc = File(..., description="one or more image files (JPEG, PNG, BMP, TIFF, WebP)")
    meta_doc = ("for a model fused with metadata: applied to every file of the request; empty = unknown. "
                "Or give the JSON field 'metadata' instead")

    # HEAD as well as GET on the page and the probes: uptime checkers and load balancers send HEAD.
    @app.get("/", include_in_schema=False)
    @app.head("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="The process is alive (HEAD too)")
    @app.head("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up (HEAD too)",
             responses={503: {"description": "warming up"}})
    @app.head("/readyz", include_in_schema=False)
    async def readyz():
        if not service.ready:
            return _error(503, "the model is still warming up")
        return {"status": "ready", "model_id": service.model_id}

    @app.get("/v1/model", summary="What the loaded model is and how it was validated", dependencies=guard)
    async def model() -> dict:
        return model_summary(ens, service.model_id)

    @app.get("/metrics", summary="Prometheus metrics (summed over the workers of serve --workers N)",
             response_class=Response, dependencies=guard)
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/predict", summary="Fused and per-branch melanoma probabilities and the OOD verdict per image",
              dependencies=guard)
    async def predict(files: list[UploadFile] = files_doc, age: str | None = Form(None, description=meta_doc),
                      sex: str | None = Form(None, description=meta_doc),
                      site: str | None = Form(None, description=meta_doc),
                      metadata: str | None = Form(None, description="JSON: one object for all files, or a list "
                                                  "of objects, one per file in upload order")) -> dict:
        t0 = time.perf_counter()
        meta, warnings = _form_metadata(ens, len(files), age, sex, site, metadata)
        service.batcher.check_room(len(files))  # a full queue answers 503 before any decoding work
        decoded = await service.decode(files)
        items = [(resized, reasons, (fusion_metadata(ens, [m]) or [None])[0])
                 for (_, _, resized, reasons), m in zip(decoded, meta)]
        t1 = time.perf_counter()
        rows = await service.batcher.submit(items)
        score_ms = elapsed_ms(t1)
        images = [details_json(d, name, ens.threshold, service.model_id,
                               {"decode": dec, "score": score_ms, "total": elapsed_ms(t0)})
                  for d, (name, dec, _, _) in zip(rows, decoded)]
        return {"model_id": service.model_id, "images": images, "warnings": warnings,
                "timing_ms": {"total": round(elapsed_ms(t0), 2)}}

    @app.post("/v1/explain", summary="predict plus each branch's Grad-CAM heat map and view, as base64 PNGs",
              dependencies=guard)
    async def explain(files: list[UploadFile] = files_doc, age: str | None = Form(None, description=meta_doc),
                      sex: str | None = Form(None, description=meta_doc),
                      site: str | None = Form(None, description=meta_doc),
                      metadata: str | None = Form(None)) -> dict:
        t0 = time.perf_counter()
        meta, warnings = _form_metadata(ens, len(files), age, sex, site, metadata)
        service.batcher.check_room(len(files))
        decoded = await service.decode(files)
        images, thresholds = [], branch_thresholds(ens)
        for (name, dec, resized, reasons), m in zip(decoded, meta):
            t1 = time.perf_counter()
            fm = (fusion_metadata(ens, [m]) or [None])[0]
            expl = await service.batcher.run(explain_with, ens, resized, fm, reasons)
            pictures = await asyncio.to_thread(explanation_json, expl, thresholds)
            row = details_json(expl.details, name, ens.threshold, service.model_id,
                               {"decode": dec, "explain": elapsed_ms(t1), "total": elapsed_ms(t0)})
            images.append({**row, **pictures})
        return {"model_id": service.model_id, "images": images, "warnings": warnings,
                "timing_ms": {"total": round(elapsed_ms(t0), 2)}}

    return app
