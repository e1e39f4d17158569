"""Sliding-window crops: random windows in training, a fixed grid of windows averaged at inference."""

import csv
import json

import numpy as np
import pytest

import ensemble
from colorspaces import apply_view, centre_crop, random_crops, read_image, resize_image, sliding_windows, window_offsets
from skinfusion.cli import fuse_main, train_main
from models import BranchConfig, build_branch, predict_images_proba
from models.train import training_batches, view_batches
from models.branch import predict_branch_proba
from models.train import class_weights


def _window_positions(crop: np.ndarray, images: np.ndarray) -> set[tuple[int, int, int]]:
    """Every (image, row, col) at which ``crop`` is a window of ``images``."""
    s, load = crop.shape[0], images.shape[1]
    return {(i, r, c) for i in range(len(images)) for r in range(load - s + 1) for c in range(load - s + 1)
            if np.array_equal(images[i, r : r + s, c : c + s], crop)}


def test_window_offsets_cover_both_edges():
    assert window_offsets(40, 32) == [0, 4, 8]
    assert window_offsets(32, 32) == [0]
    assert window_offsets(41, 32, 4) == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="exceeds"):
        window_offsets(30, 32)
    with pytest.raises(ValueError, match="stride"):
        window_offsets(40, 32, -1)


def test_sliding_windows_are_window_major_and_exact(rng):
    batch = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    wins, k = sliding_windows(batch, 16)
    assert k == 9 and wins.shape == (27, 16, 16, 3)
    np.testing.assert_array_equal(wins[:3], batch[:, :16, :16])  # window 0 of each image
    np.testing.assert_array_equal(wins[-1], batch[2, 4:, 4:])  # last window of the last image
    np.testing.assert_array_equal(wins[4 * 3 + 1], centre_crop(batch, 16)[1])  # the centre window is window 4


def test_random_crops_are_windows_of_their_own_image(rng):
    batch = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    crops = random_crops(batch, 16, np.random.default_rng(7))
    assert crops.shape == (5, 16, 16, 3)
    for i, crop in enumerate(crops):
        assert {p[0] for p in _window_positions(crop, batch)} == {i}
    again = random_crops(batch, 16, np.random.default_rng(7))
    np.testing.assert_array_equal(crops, again)
    assert not np.array_equal(crops, random_crops(batch, 16, np.random.default_rng(8)))


def test_config_validates_crops_and_derives_the_load_size():
    c = BranchConfig(image_size=32, crop_scale=1.25, crop_stride=4)
    assert c.load_size == 40 and BranchConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert BranchConfig(image_size=32).load_size == 32
    for bad in ({"crop_scale": 0.9}, {"crop_scale": 3.0}, {"crop_stride": -2}):
        with pytest.raises(ValueError, match="crop"):
            BranchConfig(**bad)


def test_training_batches_take_random_windows_and_validation_the_centre(rng):
    images = rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    y = np.arange(8) % 2
    config = BranchConfig(view="rgb", image_size=16, crop_scale=1.5, batch_size=8, epochs=2, augment=False)
    assert config.load_size == 24
    ds, steps = training_batches(images, y, config, class_weights(y, "balanced"))
    epochs = [b[0] for b in ds.as_numpy_iterator()]
    assert len(epochs) == 2 * steps and epochs[0].shape == (8, 16, 16, 3)
    as_uint8 = [np.rint(x * 255).astype(np.uint8) for x in epochs]
    positions = [_window_positions(crop, images) for crop in as_uint8[0]]
    assert all(len(p) >= 1 for p in positions), "every training input is a window of a training image"
    offsets = {(r, c) for p in positions for (_, r, c) in p}
    assert len(offsets) > 1, "windows are placed at random, not always in one spot"
    assert not np.array_equal(epochs[0], epochs[1]), "each epoch draws new windows"
    # validation during training sees the deterministic centre window
    v = next(iter(view_batches(images, "rgb", 8, crop=16).as_numpy_iterator()))
    np.testing.assert_allclose(v, apply_view("rgb", centre_crop(images, 16)))


def test_inference_averages_the_window_grid(rng):
    config = BranchConfig(view="hsv", image_size=16, base_filters=4, crop_scale=1.5)
    model = build_branch(config)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    got = predict_images_proba(model, "hsv", images, batch_size=4)
    per_window = [predict_branch_proba(model, apply_view("hsv", images[:, r : r + 16, c : c + 16]))
                  for r in (0, 4, 8) for c in (0, 4, 8)]
    np.testing.assert_allclose(got, np.mean(per_window, axis=0), rtol=1e-5, atol=1e-6)
    # stride 8: a 2 x 2 grid, a different average
    coarse = predict_images_proba(model, "hsv", images, crop_stride=8)
    corners = [predict_branch_proba(model, apply_view("hsv", images[:, r : r + 16, c : c + 16]))
               for r in (0, 8) for c in (0, 8)]
    np.testing.assert_allclose(coarse, np.mean(corners, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_trained_with_crops_scores_the_same_grid_everywhere(synthetic_data, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--view", "all", "--data", str(synthetic_data), "--run", str(run), "--image-size", "24",
                       "--crop-scale", "1.34", "--epochs", "2", "--patience", "2", "-q",
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((run / "branches" / "rgb" / "config.json").read_text())["crop_scale"] == 1.34
    assert fuse_main(["--run", str(run), "--method", "mean", "-q"]) == 0
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    assert manifest["image_size"] == 24 and manifest["load_size"] == 32 and manifest["crop_stride"] == 0

    # The bundle's member probabilities on validation images equal the ones the fusion was fitted
    # on (val_predictions.csv, from the training pipeline's cache): one grid, one average.
    with open(run / "branches" / "fft" / "val_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:6]
    paths = [str(synthetic_data / "images" / f"{r['image_id']}.jpg") for r in rows]
    ensemble.clear_cache()
    ens = ensemble.load(run)
    P = ens.member_proba(paths)
    np.testing.assert_allclose(P[:, ens.views.index("fft")], [float(r["melanoma_proba"]) for r in rows], atol=1e-5)

    # and they are the 3 x 3 window average of each branch, not one full-image pass
    img = resize_image(read_image(paths[0]), 32)
    wins, k = sliding_windows(img[None], 24)
    for j, (model, view) in enumerate(zip(ens.models, ens.views)):
        expected = predict_branch_proba(model, apply_view(view, wins)).mean()
        assert k == 9 and P[0, j] == pytest.approx(expected, abs=1e-5)
    full = predict_branch_proba(ens.models[0], apply_view(ens.views[0], resize_image(read_image(paths[0]), 24)[None]))
    assert P[0, 0] != pytest.approx(full[0], abs=1e-7)
