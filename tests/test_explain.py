"""Grad-CAM (models.gradcam), ``explain`` (ensemble.api) and ``skinfusion explain``.

The localisation test trains a tiny branch on generated images whose melanoma cue (a dark disc)
lies in the top-left quadrant only. The API and CLI tests use the committed 16-px bundles of
tests/fixtures/legacy-0.1.0, so no ensemble is trained here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from colorspaces import read_image, to_rgb
from colorspaces.crops import window_offsets
from models import BranchConfig, build_branch
from models.branch import branch_inputs
from models.gradcam import explain_branch, gradcam, last_conv_layer

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
IMAGES = [FIXTURE / "images" / f"gen{i}.png" for i in range(4)]
SIZE = 64


def quadrant_images(n: int, rng: np.random.Generator, every: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Skin-coloured noise; every ``every``-th image (melanoma) has a dark disc inside the top-left quadrant."""
    y = (np.arange(n) % every == 0).astype(int)
    images = np.clip(np.array([200, 150, 130]) + rng.integers(-25, 25, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    half = SIZE // 2
    for i in np.flatnonzero(y):
        r = int(rng.integers(SIZE // 16, SIZE // 10 + 1))
        cx, cy = (int(v) for v in rng.integers(r + 1, half - r - 1, 2))
        cv2.circle(images[i], (cx, cy), r, (50, 30, 25), -1)
    return images, y


@pytest.fixture(scope="module")
def quadrant_branch():
    """A tiny rgb branch trained (about 5 s) to find the top-left disc, and 16 melanoma test images."""
    from models.train import fit_branch

    rng = np.random.default_rng(0)
    xt, yt = quadrant_images(128, rng)
    xv, yv = quadrant_images(32, rng)
    # No augmentation: flips would move the cue out of its quadrant.
    config = BranchConfig(view="rgb", image_size=SIZE, base_filters=4, epochs=6, patience=6, batch_size=16,
                          dropout=0.0, augment=False, class_weight="none", sampling="none", seed=0)
    model, history = fit_branch(config, xt, yt, xv, yv)
    assert history["best_val_auc"] > 0.95, "the branch did not learn the cue; the test below would mean nothing"
    return config, model, quadrant_images(16, np.random.default_rng(100), every=1)[0]


def quadrant_share(heat: np.ndarray) -> np.ndarray:
    """Per map, the share of its mass above the map's median that lies in the top-left quadrant.

    The median is taken off first: the last conv's raw maps carry a constant floor (BatchNorm's
    shift comes after the convolution), and a floor says nothing about where the evidence is.
    A map spread evenly scores 0.25.
    """
    lifted = np.maximum(heat - np.median(heat, axis=(1, 2), keepdims=True), 0.0)
    half = heat.shape[1] // 2
    return lifted[:, :half, :half].sum(axis=(1, 2)) / np.maximum(lifted.sum(axis=(1, 2)), 1e-12)


def reference_gradcam(model, x, layer: str) -> np.ndarray:
    """Textbook Grad-CAM at a named layer for the branch's probability, normalised by its maximum.

    ``d p = p (1 - p) d logit`` per image, so after normalisation this equals the logit's map.
    """
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        maps, p = sub(tf.constant(x), training=False)
        score = tf.reduce_sum(p)
    weights = tf.reduce_mean(tape.gradient(score, maps), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0].numpy()
    return cam / cam.max(axis=(1, 2), keepdims=True)


# ---------------------------------------------------------------- the layer
def test_the_layer_is_the_last_conv2d_found_by_type_not_by_name():
    model = build_branch(BranchConfig(view="rgb", image_size=16, base_filters=4))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert last_conv_layer(model) is convs[-1] and convs[-1].name == "conv4"
    # Names that sort the other way round: the choice follows the graph, not the names.
    x = inputs = keras.Input((16, 16, 3))
    for name in ("z_last_name", "m_middle", "a_first_name"):
        x = keras.layers.Conv2D(2, 3, padding="same", name=name)(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x)))
    assert last_conv_layer(model).name == "a_first_name"
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(ValueError, match="no Conv2D layer"):
        last_conv_layer(flat)


@pytest.mark.slow
def test_the_heat_map_is_textbook_gradcam_at_the_last_conv_for_melanoma(quadrant_branch):
    """Fails if the map is taken at another layer (e.g. the first conv) or for nevus (the negative gradient)."""
    config, model, images = quadrant_branch
    x, _ = branch_inputs(config, images)
    heat, _ = explain_branch(config, model, images)
    np.testing.assert_allclose(heat, reference_gradcam(model, x, "conv4"), atol=1e-4)
    assert np.abs(heat - reference_gradcam(model, x, "conv1")).max() > 0.1  # the comparison can tell layers apart
    _, logits = gradcam(model, x)
    p = np.asarray(model(x, training=False)).ravel()
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), p, atol=1e-5)  # the gradient is the sigmoid unit's logit's


@pytest.mark.slow
def test_the_melanoma_map_falls_on_the_quadrant_that_holds_the_cue(quadrant_branch):
    config, model, images = quadrant_branch
    heat, _ = explain_branch(config, model, images)
    half = SIZE // 2
    peaks = [np.unravel_index(np.argmax(h), h.shape) for h in heat]
    # 0.25 for a map spread evenly; > 0.5 means most of the evidence is on the cue's quadrant.
    assert quadrant_share(heat).mean() > 0.5
    assert np.mean([r < half and c < half for r, c in peaks]) >= 0.9
    # The same check on the nevus direction (negative gradient) fails: it is not the melanoma evidence.
    nevus, _ = explain_branch(config, model, images, sign=-1.0)
    assert quadrant_share(nevus).mean() < 0.5


# ---------------------------------------------------------------- crops
def test_with_crops_window_maps_are_averaged_back_into_the_image_and_fft_stays_in_frequency_space(rng):
    images = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    keras.utils.set_random_seed(1)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, crop_scale=1.5)
    model = build_branch(config)
    heat, views = explain_branch(config, model, images)
    assert heat.shape == (2, 24, 24) and heat.min() >= 0.0 and heat.max() <= 1.0
    np.testing.assert_allclose(views, to_rgb(images))  # windows pasted back where they were cut
    # Pixels only the top-left window covers: the map there is that window's own map, scaled.
    assert window_offsets(24, 16) == [0, 4, 8]
    x, k = branch_inputs(config, images)
    own, _ = gradcam(model, x[: len(images)])
    corner, mine = own[:, :4, :4], heat[:, :4, :4]
    assert k == 9 and corner.max() > 0
    per_image = {"axis": (1, 2), "keepdims": True}
    np.testing.assert_allclose(mine / mine.max(**per_image), corner / corner.max(**per_image), atol=1e-6)
    fft = BranchConfig(view="fft", image_size=16, base_filters=4, crop_scale=1.5)
    heat, views = explain_branch(fft, build_branch(fft), images)
    assert heat.shape == (2, 16, 16) and views.shape == (2, 16, 16, 3)


# ---------------------------------------------------------------- explain()
@pytest.mark.parametrize("bundle, meta", [("ensemble-mean", None), ("ensemble-stack", None),
                                          ("ensemble-stackmeta", {"age": 50, "sex": "male"})])
def test_explain_gives_the_numbers_predict_gives(bundle, meta):
    from ensemble import load
    from ensemble.api import explain, predict

    run = FIXTURE / bundle
    for image in IMAGES[:2]:
        expl = explain(str(image), run=run, metadata=meta)
        assert abs(expl.melanoma_probability - predict(str(image), run=run, metadata=meta)) <= 1e-6
        ens = load(run)
        P = ens.member_proba_batch(ens.prepare([str(image)]))[0]
        assert list(expl.branch_probabilities) == ["rgb", "hsv", "fft"]
        np.testing.assert_allclose(list(expl.branch_probabilities.values()), P, atol=1e-7)
        assert expl.frequency_views == ("fft",) and expl.threshold == ens.threshold
        for view, heat in expl.heatmaps.items():
            assert heat.shape == (16, 16) and 0.0 <= heat.min() and heat.max() <= 1.0
            assert expl.views[view].shape == (16, 16, 3)
    import skinfusion

    assert skinfusion.explain is explain


def test_explain_names_an_unreadable_image(tmp_path):
    from colorspaces import ImageError
    from ensemble.api import explain

    with pytest.raises(ImageError, match="nope.png"):
        explain(str(tmp_path / "nope.png"), run=FIXTURE / "ensemble-mean")


# ---------------------------------------------------------------- the command
def test_output_names_are_stems_lengthened_only_on_collisions():
    from skinfusion.workflows.explaining import output_names

    assert output_names(["d/a.png", "d/b.jpg"]) == ["a", "b"]
    assert output_names(["one/x.png", "two/x.png", "one/y.png"]) == ["one_x_png", "two_x_png", "y"]
    assert output_names(["d/x.png", "d/x.jpg"]) == ["x_png", "x_jpg"]
    assert output_names(["d/x.png", "d/x.png"]) == ["x", "x-2"]


def test_cli_writes_overlays_and_a_panel_per_image_and_skips_a_missing_one(tmp_path, capsys):
    from skinfusion.cli import main

    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for src, dst in ((IMAGES[0], first), (IMAGES[1], second)):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    out = tmp_path / "new" / "out"
    rc = main(["explain", "--run", str(FIXTURE / "ensemble-mean"), str(first), str(second),
               str(tmp_path / "missing.png"), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err  # as predict: unreadable images are skipped, named, and make the exit status 1
    assert "missing.png" in err and "no such image file" in err and "Traceback" not in err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{stem}.{part}.png" for stem in ("a_x_png", "b_x_png")
                           for part in ("rgb", "hsv", "fft", "panel"))
    panel = read_image(out / "a_x_png.panel.png")
    assert panel.shape[0] > 300 and panel.std() > 0  # a drawn figure, not an empty file


def test_cli_mistakes_exit_2_with_one_line(tmp_path, capsys):
    from skinfusion.cli import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    run = str(FIXTURE / "ensemble-mean")
    for argv, words in ((["--run", run, str(IMAGES[0]), "--out", str(a_file)], "not a directory"),
                        (["--run", run, "--out", str(tmp_path / "o")], "no images given"),
                        (["--run", run, str(tmp_path), "--out", str(tmp_path / "o")], "is a directory"),
                        (["--run", str(tmp_path / "norun"), str(IMAGES[0]), "--out", str(tmp_path / "o")], "norun")):
        rc = main(["explain", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, (argv, err)
