"""``skinfusion serve``, what a demanding new user broke (issue 26): the OOD refusal as the answer, metadata that
must be a 422, the API key declared in the OpenAPI schema, HEAD on the page and probes, and what /v1/explain
shows of each branch. In-process (FastAPI TestClient) on the committed 16-px bundle; the loopback tests are in
tests/test_serve_processes.py.
"""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from ensemble import load_ensemble  # noqa: E402
from skinfusion.serve.serving import ServeSettings, create_app  # noqa: E402
from test_serve import MEAN, lesion, no_trace, png, upload  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(load_ensemble(MEAN), "x")) as c:
        yield c


# ---------------------------------------------------------------- the OOD refusal is the answer
@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
def test_a_flagged_image_gets_no_decision_and_no_probability_but_the_reason(client, endpoint):
    r = client.post(endpoint, files=upload(png(lesion(3, 20)), png(lesion(4, 64))))  # 20 px: too small
    assert r.status_code == 200, r.text
    flagged, fine = r.json()["images"]
    assert flagged["out_of_distribution"] is True
    assert flagged["decision"] is None and flagged["melanoma_probability"] is None
    assert "out of distribution" in flagged["withheld_reason"] and "under 32 px" in flagged["withheld_reason"]
    assert 0.0 <= flagged["raw_melanoma_probability"] <= 1.0  # kept, under a name that says what it is
    assert fine["out_of_distribution"] is not True and fine["withheld_reason"] is None
    assert fine["decision"] in ("melanoma", "nevus")
    assert fine["melanoma_probability"] == fine["raw_melanoma_probability"]


# ---------------------------------------------------------------- metadata mistakes are 422s
def test_deeply_nested_metadata_json_is_a_422_not_a_500(client):
    r = client.post("/v1/predict", files=upload(png(lesion(5))), data={"metadata": "[" * 100_000 + "]" * 100_000})
    assert r.status_code == 422, r.text
    assert "nested too deeply" in r.json()["detail"]
    r = client.post("/v1/predict", files=upload(png(lesion(5))), data={"metadata": json.dumps({"age": {"a": 1}})})
    assert r.status_code == 422 and "single value" in r.json()["detail"]


@pytest.mark.parametrize("data", [{"metadata": '{"age": ' + "9" * 5000 + "}"}, {"age": "9" * 5000},
                                  {"metadata": '{"age": -3}'}])
def test_an_impossible_age_says_it_must_be_0_to_120(client, data):
    r = client.post("/v1/predict", files=upload(png(lesion(5))), data=data)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "age must be 0–120" in detail and "set_int_max_str_digits" not in detail
    assert len(detail) < 300  # the 5,000 digits are not echoed back
    no_trace(r)


# ---------------------------------------------------------------- API key in the docs, HEAD
def test_with_a_key_the_openapi_schema_declares_it_and_the_docs_are_reachable():
    with TestClient(create_app(load_ensemble(MEAN), "x", ServeSettings(api_key="k"))) as c:
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json")
        assert schema.status_code == 200
        schemes = schema.json()["components"]["securitySchemes"]
        kinds = {(s["type"], s.get("in"), s.get("name"), s.get("scheme")) for s in schemes.values()}
        assert ("apiKey", "header", "X-API-Key", None) in kinds and ("http", None, None, "bearer") in kinds
        paths = schema.json()["paths"]
        for path, method in (("/v1/predict", "post"), ("/v1/explain", "post"), ("/v1/model", "get"),
                             ("/metrics", "get")):
            assert {name for req in paths[path][method]["security"] for name in req} == set(schemes), path
        assert "security" not in paths["/healthz"]["get"]
    with TestClient(create_app(load_ensemble(MEAN), "x")) as c:  # no key: none declared
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


def test_head_on_the_page_and_the_probes_is_200(client):
    for path in ("/", "/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b""


# ---------------------------------------------------------------- what explain shows
def _picture(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


def test_explain_shows_each_views_channels_as_grey_tiles_and_each_branchs_own_threshold(client):
    got = client.post("/v1/explain", files=upload(png(lesion(6, 64)))).json()["images"][0]
    thresholds = json.loads((MEAN / "manifest.json").read_text())["validation_metrics"]
    for view, names in (("rgb", "R | G | B"), ("hsv", "H | S | V"), ("fft", "R spectrum | G spectrum | B spectrum")):
        assert names in got["views"][view]["caption"]
        tiles = _picture(got["views"][view]["png"])
        h, w = tiles.shape[:2]
        assert w > 3 * h  # three channels side by side, not one picture
        assert np.array_equal(tiles[..., 0], tiles[..., 1]) and np.array_equal(tiles[..., 1], tiles[..., 2])  # grey
        assert got["heatmaps"][view]["threshold"] == pytest.approx(thresholds[view]["threshold"])
    # The hsv tiles are the branch's input, not the photo converted back: the V tile is max(R, G, B).
    from colorspaces import to_hsv

    image = _picture(got["image_png"])[..., ::-1]
    hsv = to_hsv(np.ascontiguousarray(image))
    tiles = _picture(got["views"]["hsv"]["png"])[..., 0]
    side = hsv.shape[0]
    v_tile = tiles[:, -side:]
    assert np.abs(v_tile.astype(int) - np.rint(hsv[..., 2] * 255).astype(int)).max() <= 1


def test_predict_says_flagged_images_get_no_decision(tmp_path, capsys, caplog):
    from skinfusion.cli import predict_main

    tiny, fine = tmp_path / "tiny.png", tmp_path / "fine.png"
    tiny.write_bytes(png(lesion(3, 20)))
    fine.write_bytes(png(lesion(4, 64)))
    assert predict_main(["--run", str(MEAN), str(tiny), str(fine)]) == 0
    said = capsys.readouterr().err + caplog.text
    assert "1 image(s) flagged out of distribution" in said and "no decision" in said, said
