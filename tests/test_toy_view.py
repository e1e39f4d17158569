"""A view is one entry of ``colorspaces.VIEWS``: a toy fourth view registered by a fixture trains, fuses,
predicts and is explained through the command line with no other code change."""

import csv
import json

import numpy as np
import pytest

from colorspaces import VIEWS, ViewSpec, read_image, resize_image


def to_gray(images: np.ndarray) -> np.ndarray:
    """Grey level (ITU-R 601 luma) scaled to [0, 1], one channel: (..., H, W, 3) uint8 -> (..., H, W, 1) float32."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"the gray view takes RGB uint8 (H, W, 3) or (N, H, W, 3), got {images.dtype} {images.shape}")
    luma = np.array([0.299, 0.587, 0.114], np.float32) / np.float32(255.0)
    return (images.astype(np.float32) @ luma)[..., None]


@pytest.fixture
def gray_view(monkeypatch):
    """Register the toy view for one test; monkeypatch removes it afterwards."""
    spec = ViewSpec("gray", 1, to_gray, "grey level scaled to [0, 1] (a toy view registered by a test)")
    monkeypatch.setitem(VIEWS, "gray", spec)
    return spec


def test_the_toy_view_is_a_one_channel_view_in_unit_range(gray_view, rng):
    from colorspaces import apply_view

    batch = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    out = apply_view("gray", batch)
    assert out.shape == (2, 5, 4, 1) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    np.testing.assert_allclose(apply_view("gray", batch[0]), out[0])
    np.testing.assert_allclose(apply_view("gray", np.full((2, 2, 3), 255, np.uint8)), 1.0, atol=1e-6)


def test_explain_draws_a_registered_view_from_its_entry_alone(gray_view, tmp_path):
    # explain's pictures of what a branch receives come from the VIEWS entry (channel names, display
    # range, frequency flag, with defaults): a toy view with one channel needs nothing else.
    from ensemble.api import Explanation
    from ensemble.details import PredictionDetails
    from skinfusion.workflows.explaining import heatmap_is_empty, view_caption, view_picture, write_explanation
    from skinfusion.serve.serving_io import explanation_json

    image = np.zeros((24, 24, 3), np.uint8)
    image[6:18, 6:18] = 200
    array = to_gray(image)
    details = PredictionDetails(0.4, {"gray": 0.4}, "nevus", None, None, [])
    expl = Explanation(details, 0.5, image, {"gray": np.zeros((24, 24))}, {"gray": array}, ())
    picture = view_picture("gray", array)
    assert picture.shape == (24, 24, 3)  # one channel: one grey tile
    assert picture[12, 12, 0] == round(200 * 255 * (0.299 + 0.587 + 0.114) / 255) and picture[0, 0, 0] == 0
    assert "c0" in view_caption("gray", 1) and "0 = black, 1 = white" in view_caption("gray", 1)
    assert heatmap_is_empty(expl.heatmaps["gray"])
    written = write_explanation(expl, tmp_path, "toy", thresholds={"gray": 0.3})
    assert sorted(p.name for p in written) == ["toy.gray.png", "toy.panel.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    got = explanation_json(expl, {"gray": 0.3})
    assert got["heatmaps"]["gray"]["empty"] is True and got["heatmaps"]["gray"]["over"] == "image"
    assert got["heatmaps"]["gray"]["threshold"] == 0.3 and "c0" in got["views"]["gray"]["caption"]


@pytest.mark.slow
def test_a_registered_view_trains_fuses_and_predicts_through_the_cli(gray_view, synthetic_data, tmp_path):
    import ensemble
    from models import load_branch, predict_images_proba
    from skinfusion.cli import explain_main, fuse_main, predict_main, train_main

    run = tmp_path / "run"
    for view in ("gray", "rgb"):
        assert train_main(["--view", view, "--data", str(synthetic_data), "--run", str(run),
                           "--image-size", "32", "--epochs", "3", "-q"]) == 0
    assert fuse_main(["--run", str(run), "--views", "rgb,gray", "-q"]) == 0
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    assert manifest["branch_order"] == ["rgb", "gray"]
    gray_model, gray_config, _ = load_branch(run / "branches" / "gray")
    assert gray_config.view == "gray" and tuple(gray_model.input_shape) == (None, 32, 32, 1)
    assert load_branch(run / "branches" / "rgb")[0].input_shape[-1] == 3

    paths = sorted(str(p) for p in (synthetic_data / "images").glob("*.jpg"))[:12]
    out = tmp_path / "pred.csv"
    assert predict_main(["--run", str(run), *paths, "--out", str(out), "-q"]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == paths
    proba = np.array([float(r["melanoma_proba"]) for r in rows])
    assert np.isfinite(proba).all() and ((0 <= proba) & (proba <= 1)).all()
    # the written probabilities are the mean of the two branches, the gray one scored through its view
    P = ensemble.load(run).member_proba(paths)
    assert P.shape == (12, 2)
    np.testing.assert_allclose(proba, P.mean(axis=1), atol=2e-6)
    batch = np.stack([resize_image(read_image(p), 32) for p in paths])
    np.testing.assert_allclose(P[:, 1], predict_images_proba(gray_model, "gray", batch), atol=1e-5)

    # ... and explain draws it: a heat map over the image and a panel, from its VIEWS entry alone
    pictures = tmp_path / "explained"
    assert explain_main(["--run", str(run), paths[0], "--out", str(pictures), "-q"]) == 0
    stem = paths[0].rsplit("/", 1)[-1].rsplit(".", 1)[0]
    assert sorted(p.name for p in pictures.iterdir()) == sorted(f"{stem}.{part}.png" for part in ("rgb", "gray", "panel"))
