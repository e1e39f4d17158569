"""``skinfusion serve``: the HTTP API (FastAPI TestClient), micro-batching, bad input and security. The real
server over loopback (a subprocess) is tested in tests/test_serve_processes.py.

The model is the committed 16-px bundles of tests/fixtures/legacy-0.1.0; images are generated here.
No model is trained.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from ensemble import load_ensemble  # noqa: E402
from skinfusion.serve.batching import MicroBatcher, QueueFull  # noqa: E402
from skinfusion.serve.serving import ServeSettings, create_app  # noqa: E402
from skinfusion.serve.serving_io import model_id  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
MEAN, STACKMETA = FIXTURE / "ensemble-mean", FIXTURE / "ensemble-stackmeta"
ROOT = Path(__file__).resolve().parent.parent
TRACE_MARKS = ("Traceback", 'File "', "site-packages")


def lesion(seed: int, size: int = 64) -> np.ndarray:
    """A generated skin-coloured RGB image with a dark disc, different per seed."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (205, 160, 140), np.int16)
    c = size // 2 + int(rng.integers(-size // 8, size // 8))
    cv2.circle(img, (c, c), size // 4, tuple(int(v) for v in rng.integers(30, 110, 3)), -1)
    # Noise over the disc too: a perfectly flat disc is unlike any photo, and the image checks flag it (text_like).
    return np.clip(img + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header declares width × height pixels (400 million by default)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def upload(*images: bytes, names=None) -> list:
    names = names or [f"img{i}.png" for i in range(len(images))]
    return [("files", (n, data, "image/png")) for n, data in zip(names, images)]


def no_trace(response) -> None:
    assert not any(mark in response.text for mark in TRACE_MARKS), response.text


@pytest.fixture(scope="module")
def mean_ens():
    return load_ensemble(MEAN)


@pytest.fixture(scope="module")
def client(mean_ens):
    with TestClient(create_app(mean_ens, model_id(MEAN))) as c:
        yield c


# ---------------------------------------------------------------- the endpoints
def test_predict_gives_the_engines_numbers_decision_ood_fields_model_id_and_timing(client, mean_ens):
    imgs = [lesion(1), lesion(2, 48)]
    r = client.post("/v1/predict", files=upload(*map(png, imgs), names=["a.png", "b.png"]))
    assert r.status_code == 200, r.text
    body = r.json()
    want = mean_ens.details(imgs)
    mid = model_id(MEAN)
    assert body["model_id"] == mid and len(body["images"]) == 2
    for got, w, name in zip(body["images"], want, ["a.png", "b.png"]):
        assert got["filename"] == name and got["model_id"] == mid
        assert got["melanoma_probability"] == pytest.approx(w.melanoma_probability, abs=1e-6)
        assert got["branch_probabilities"] == pytest.approx(w.branch_probabilities, abs=1e-6)
        assert got["decision"] == w.decision == ("melanoma" if got["melanoma_probability"] >= got["threshold"] else "nevus")
        assert got["threshold"] == mean_ens.threshold
        assert got["out_of_distribution"] == w.out_of_distribution and got["ood_reasons"] == w.ood_reasons
        assert "in_distribution_score" in got and set(got["timing_ms"]) == {"decode", "score", "total"}


def test_a_tiny_image_is_flagged_out_of_distribution_with_the_reason(client):
    got = client.post("/v1/predict", files=upload(png(lesion(3, 20)))).json()["images"][0]
    assert got["out_of_distribution"] is True and got["ood_reasons"] == ["too_small"]
    assert "under" in got["ood_reason_text"][0]


def test_explain_gives_three_heatmap_overlays_and_views_as_pngs_with_predicts_numbers(client):
    data = png(lesion(4))
    pred = client.post("/v1/predict", files=upload(data)).json()["images"][0]
    r = client.post("/v1/explain", files=upload(data))
    assert r.status_code == 200, r.text
    got = r.json()["images"][0]
    assert got["melanoma_probability"] == pytest.approx(pred["melanoma_probability"], abs=1e-6)
    assert set(got["heatmaps"]) == set(got["views"]) == {"rgb", "hsv", "fft"}
    assert got["heatmaps"]["fft"]["over"] == "spectrum" and got["heatmaps"]["rgb"]["over"] == "image"
    for picture in [got["image_png"], *(v["png"] for v in got["views"].values()),
                    *(h["png"] for h in got["heatmaps"].values())]:
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(picture), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape[2] == 3


def test_model_summary(client, mean_ens):
    m = client.get("/v1/model").json()
    assert m["model_id"] == model_id(MEAN) and m["views"] == ["rgb", "hsv", "fft"] and m["method"] == "mean"
    assert m["threshold"] == mean_ens.threshold and m["versions"]["skinfusion"] == "0.1.0"
    assert m["ood_gate"]["present"] is False and "gate" in m["ood_gate"]["note"]
    assert {"dataset_fingerprint", "validation_metrics", "calibration_caveat", "notice"} <= set(m)


def test_health_readiness_docs_and_page(client, mean_ens):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text.lower()
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # nothing on the page is fetched from elsewhere (no CDN, no web fonts)
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_readyz_is_503_until_the_warm_up_has_run(mean_ens):
    app = create_app(mean_ens, "x")
    c = TestClient(app)  # no `with`: the start-up (batcher, warm-up) has not run
    assert c.get("/healthz").status_code == 200
    r = c.get("/readyz")
    assert r.status_code == 503 and "warming up" in r.json()["detail"]


def test_metrics_count_requests_errors_and_latency_in_prometheus_format(client):
    client.post("/v1/predict", files=upload(png(lesion(5))))
    client.post("/v1/predict", files=upload(b"not an image"))
    text = client.get("/metrics").text
    assert 'skinfusion_http_requests_total{endpoint="/v1/predict",method="POST",status="200"}' in text
    assert 'skinfusion_http_errors_total{endpoint="/v1/predict",status="422"}' in text
    assert 'skinfusion_http_request_duration_seconds_bucket{endpoint="/v1/predict",le="0.5"}' in text
    assert "skinfusion_batch_images_count" in text and "skinfusion_images_scored_total" in text


# ---------------------------------------------------------------- bad input
def test_an_upload_over_the_limit_is_413_whether_it_declares_its_length_or_not(mean_ens):
    with TestClient(create_app(mean_ens, "x", ServeSettings(max_upload_mb=0.01))) as c:
        big = png(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8))  # ~30 kB > 10 kB
        r = c.post("/v1/predict", files=upload(big))
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
        # chunked: no Content-Length, so the limit is counted as the body streams in
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
        r = c.post("/v1/predict", content=iter([body[i : i + 4096] for i in range(0, len(body), 4096)]),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
        no_trace(r)
        assert c.post("/v1/predict", files=upload(png(lesion(6, 32)))).status_code == 200


@pytest.mark.parametrize("data, words", [
    (b"this is not an image", "cannot decode"),
    (png(lesion(7))[:200], "cannot decode"),  # truncated
    (b"", "empty"),
    (bomb_png(), "decompression bomb"),
])
def test_unreadable_uploads_are_422_with_the_readers_message_naming_the_file(client, data, words):
    r = client.post("/v1/predict", files=upload(data, names=["../../secret/scan.png"]))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert words in detail and detail.startswith("scan.png"), detail
    assert "skinfusion-upload-" not in detail  # the temporary file is not named
    no_trace(r)


def test_a_missing_file_field_or_a_path_instead_of_a_file_is_422_and_reads_nothing(client):
    r = client.post("/v1/predict", data={"age": "40"})
    assert r.status_code == 422 and "'files'" in r.json()["detail"]
    r = client.post("/v1/predict", data={"files": str(FIXTURE / "images" / "gen0.png")})
    assert r.status_code == 422 and "no paths" in r.json()["detail"]
    r = client.post("/v1/explain")
    assert r.status_code == 422
    no_trace(r)


def test_a_bug_is_a_500_without_a_stack_trace(mean_ens, monkeypatch):
    app = create_app(mean_ens, "x")
    with TestClient(app, raise_server_exceptions=False) as c:
        def broken(*a, **k):
            raise RuntimeError("boom inside the engine")
        monkeypatch.setattr(app.state.service, "_score", broken)
        app.state.service.batcher.score = broken
        r = c.post("/v1/predict", files=upload(png(lesion(8))))
        assert r.status_code == 500 and r.json() == {"detail": "internal server error; the details are in the server log"}
        no_trace(r)
        assert "boom" not in r.text


# ---------------------------------------------------------------- security
def test_the_api_key_guards_every_endpoint_but_health_readiness_page_and_docs(mean_ens):
    with TestClient(create_app(mean_ens, "x", ServeSettings(api_key="s3cret"))) as c:
        guarded = [("GET", "/v1/model"), ("GET", "/metrics"), ("POST", "/v1/predict"), ("POST", "/v1/explain")]
        for method, path in guarded:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                r = c.request(method, path, headers=headers, files=upload(png(lesion(9))) if method == "POST" else None)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert "X-API-Key" in r.json()["detail"]
        for path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json"):  # the docs hold no model data
            assert c.get(path).status_code == 200
        for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            assert c.get("/v1/model", headers=headers).status_code == 200
            assert c.post("/v1/predict", headers=headers, files=upload(png(lesion(9)))).status_code == 200


def test_cors_is_off_unless_an_origin_is_given(mean_ens):
    origin = {"Origin": "http://example.org"}
    with TestClient(create_app(mean_ens, "x")) as c:
        assert "access-control-allow-origin" not in c.get("/v1/model", headers=origin).headers
    with TestClient(create_app(mean_ens, "x", ServeSettings(cors_origins=("http://example.org",), api_key="k"))) as c:
        assert c.get("/v1/model", headers={**origin, "X-API-Key": "k"}).headers["access-control-allow-origin"] == \
            "http://example.org"
        pre = c.options("/v1/predict", headers={**origin, "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "x-api-key"})
        assert pre.status_code == 200
        assert "access-control-allow-origin" not in c.get("/v1/model", headers={"Origin": "http://evil.example",
                                                                                 "X-API-Key": "k"}).headers


def test_no_route_takes_a_server_side_path(client):
    for path, item in client.get("/openapi.json").json()["paths"].items():
        assert "{" not in path, path  # no path parameters
        for op in item.values():
            assert not op.get("parameters"), (path, op.get("parameters"))


# ---------------------------------------------------------------- metadata
def test_metadata_form_fields_or_json_reach_the_fusion(mean_ens):
    ens = load_ensemble(STACKMETA)
    imgs = [lesion(10), lesion(11)]
    want = ens.details(imgs, metadata=[{"age": 70, "sex": "female"}] * 2)
    want_each = ens.details(imgs, metadata=[{"age": 30, "sex": "male"}, {"age": 80, "sex": "female"}])
    with TestClient(create_app(ens, "x")) as c:
        files = upload(*map(png, imgs))
        got = c.post("/v1/predict", files=files, data={"age": "70", "sex": "Female"}).json()["images"]
        assert [g["melanoma_probability"] for g in got] == pytest.approx([w.melanoma_probability for w in want], abs=1e-6)
        per_file = json.dumps([{"age": 30, "sex": "male"}, {"age": 80, "sex": "female"}])
        got = c.post("/v1/predict", files=files, data={"metadata": per_file}).json()["images"]
        assert [g["melanoma_probability"] for g in got] == pytest.approx(
            [w.melanoma_probability for w in want_each], abs=1e-6)
        assert got[0]["melanoma_probability"] != pytest.approx(got[1]["melanoma_probability"], abs=1e-9) or \
            want_each[0].melanoma_probability == pytest.approx(want_each[1].melanoma_probability)
        for data, words in [({"sex": "robot"}, "male or female"), ({"age": "old"}, "number of years"),
                            ({"age": "50", "metadata": "{}"}, "not both"), ({"metadata": "[{}]"}, "1 objects for 2"),
                            ({"metadata": "{nope"}, "not valid JSON"), ({"metadata": '{"weight": 3}'}, "unknown field"),
                            ({}, "fuses metadata (age, sex)")]:
            r = c.post("/v1/predict", files=files, data=data)
            assert r.status_code == 422 and words in r.json()["detail"], (data, r.text)
    with TestClient(create_app(mean_ens, "x")) as c:
        r = c.post("/v1/predict", files=upload(png(lesion(12))), data={"age": "50"})
        assert r.status_code == 200 and "ignored" in r.json()["warnings"][0]


# ---------------------------------------------------------------- micro-batching
def test_concurrent_requests_share_forward_passes_and_get_the_numbers_of_single_requests(mean_ens):
    imgs = [png(lesion(20 + i)) for i in range(8)]
    with TestClient(create_app(mean_ens, "x")) as c:
        single = [c.post("/v1/predict", files=upload(d)).json()["images"][0] for d in imgs]
    app = create_app(mean_ens, "x", ServeSettings(batch_wait_ms=300))

    async def burst():
        async with app.router.lifespan_context(app):
            service = app.state.service
            before = service.batcher.forward_passes
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                rs = await asyncio.gather(*(ac.post("/v1/predict", files=upload(d)) for d in imgs))
            return rs, service.batcher.forward_passes - before

    responses, passes = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    print(f"\n8 concurrent requests -> {passes} forward pass(es)")
    assert 1 <= passes < len(imgs)
    for r, s in zip(responses, single):
        got = r.json()["images"][0]
        assert got["melanoma_probability"] == pytest.approx(s["melanoma_probability"], abs=1e-6)
        assert got["branch_probabilities"] == pytest.approx(s["branch_probabilities"], abs=1e-6)


def test_the_batcher_caps_batches_splits_big_jobs_and_hands_errors_to_each_request():
    seen = []

    def score(items):
        seen.append(len(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    async def go():
        b = MicroBatcher(score, max_batch=4, wait_ms=100)
        await b.start()
        try:
            results = await asyncio.gather(b.submit([1, 2]), b.submit([3]), b.submit([4, 5, 6, 7, 8, 9]))
            bad = await asyncio.gather(b.submit(["bad"]), b.submit([1]), return_exceptions=True)
        finally:
            await b.stop()
        return results, bad

    results, bad = asyncio.run(go())
    assert results == [[10, 20], [30], [40, 50, 60, 70, 80, 90]]
    assert max(seen) <= 4 and sum(seen[:-1]) == 9
    assert isinstance(bad[0], ValueError) and isinstance(bad[1], ValueError)  # they shared the failing pass


def test_a_full_queue_refuses_at_once_and_the_batcher_recovers():
    release = threading.Event()

    def score(items):
        release.wait(10)  # the first pass holds the model until the test lets it go
        return [x * 10 for x in items]

    async def go():
        b = MicroBatcher(score, max_batch=2, wait_ms=0, max_queue=3)
        await b.start()
        try:
            first = asyncio.ensure_future(b.submit([1, 2]))
            await asyncio.sleep(0.2)  # taken into the (blocked) pass: no longer waiting
            assert b.waiting == 0
            queued = [asyncio.ensure_future(b.submit([3, 4])), asyncio.ensure_future(b.submit([5]))]
            await asyncio.sleep(0.05)
            assert b.waiting == 3
            with pytest.raises(QueueFull) as full:
                await b.submit([6])
            assert "--max-queue" in str(full.value) and full.value.retry_after_s >= 1 and b.rejected == 1
            with pytest.raises(ValueError, match="send fewer images"):
                await b.submit([1, 2, 3, 4])  # more than the whole queue: no retry would help
            assert b.waiting == 3  # the refused work was not queued
            release.set()
            results = await asyncio.gather(first, *queued)
            assert b.waiting == 0 and await b.submit([7]) == [70]
            return results
        finally:
            release.set()
            await b.stop()

    assert asyncio.run(go()) == [[10, 20], [30, 40], [50]]


def test_requests_beyond_the_queue_limit_get_503_with_retry_after(mean_ens):
    app = create_app(mean_ens, "x", ServeSettings(max_queue=1, max_batch=1, batch_wait_ms=0))
    imgs = [png(lesion(60 + i)) for i in range(4)]

    async def burst():
        async with app.router.lifespan_context(app):
            batcher = app.state.service.batcher
            real = batcher.score
            batcher.score = lambda items: (time.sleep(0.5), real(items))[1]  # a slow model: the queue fills
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/predict", files=upload(d)) for d in imgs))
                after = await ac.post("/v1/predict", files=upload(imgs[0]))  # the burst is over: room again
            return rs, after, batcher.waiting

    responses, after, waiting = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) <= 2, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"], r.text
            no_trace(r)
    assert after.status_code == 200 and waiting == 0
