"""Lesion-centred input: the localiser, its crop contract, the config option, resized-crop augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from colorspaces.lesion import FALLBACK_FRACTION, crop_to_lesion, locate_lesion
from models.augment import augment_batch, resized_crops
from models.branch import BranchConfig
from skinfusion.data.cache import cache_key


def _skin(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array([215, 175, 155]) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _with_lesion(h, w, centre, radius, rng, vignette=False) -> np.ndarray:
    img = _skin(h, w, rng)
    cv2.ellipse(img, centre, radius, 0, 0, 360, (95, 60, 45), -1)
    if vignette:  # a dermoscope's dark corners, outside the inscribed circle
        yy, xx = np.mgrid[0:h, 0:w]
        img[np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) > 1.02] = 5
    return img


def test_the_box_holds_an_off_centre_lesion_and_the_crop_keeps_the_aspect(rng):
    img = _with_lesion(150, 200, (140, 60), (22, 18), rng)  # a 4:3 image, as HAM10000's
    box = locate_lesion(img, margin=0.15)
    assert box.found
    r0, r1, c0, c1 = box.pixels(150, 200)
    assert r0 <= 60 - 18 and r1 >= 60 + 18 and c0 <= 140 - 22 and c1 >= 140 + 22  # the whole lesion
    assert (r1 - r0) * (c1 - c0) < 0.35 * 150 * 200  # ... and not the whole image
    crop = crop_to_lesion(img, 0.15)
    assert crop.dtype == np.uint8 and crop.shape == (r1 - r0, c1 - c0, 3)
    assert abs(crop.shape[0] / 150 - crop.shape[1] / 200) < 0.02  # square once squashed
    np.testing.assert_array_equal(crop, crop_to_lesion(img, 0.15))  # deterministic
    # more margin, more context
    wider = locate_lesion(img, margin=0.5)
    assert wider.side > box.side


def test_dark_vignette_corners_are_not_the_lesion(rng):
    img = _with_lesion(256, 256, (128, 128), (20, 20), rng, vignette=True)
    box = locate_lesion(img)
    r0, r1, c0, c1 = box.pixels(256, 256)
    assert box.found and r0 > 60 and c0 > 60 and r1 < 196 and c1 < 196


def test_no_lesion_falls_back_to_the_centre_with_a_reason(rng):
    img = _skin(100, 100, rng)
    box = locate_lesion(img)
    assert not box.found and "skin colour" in box.reason
    crop = crop_to_lesion(img)
    side = round(100 * FALLBACK_FRACTION)
    assert crop.shape == (side, side, 3)
    np.testing.assert_array_equal(crop, img[10:90, 10:90])


def test_the_crop_refuses_what_is_not_one_rgb_uint8_image():
    with pytest.raises(ValueError, match="RGB uint8"):
        crop_to_lesion(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        crop_to_lesion(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="margin"):
        crop_to_lesion(np.zeros((8, 8, 3), np.uint8), margin=2.0)


def test_lesion_crop_is_a_recorded_config_option_that_refuses_unknown_values():
    config = BranchConfig(lesion_crop="box", lesion_margin=0.3)
    assert config.to_dict()["lesion_crop"] == "box" and config.to_dict()["lesion_margin"] == 0.3
    assert BranchConfig.from_dict(config.to_dict()) == config
    assert BranchConfig().lesion_crop == "none"  # off by default: saved branches are unchanged
    with pytest.raises(ValueError, match=r"lesion_crop must be one of \('none', 'box'\)"):
        BranchConfig(lesion_crop="circle")
    with pytest.raises(ValueError, match="lesion_margin"):
        BranchConfig(lesion_margin=1.5)
    with pytest.raises(ValueError, match="resized_crop"):
        BranchConfig(resized_crop=1.0)


def test_lesion_crops_have_a_cache_of_their_own():
    paths = ["a.png", "b.png"]
    assert cache_key(paths, 16) != cache_key(paths, 16, 0.15) != cache_key(paths, 16, 0.3)
    assert cache_key(paths, 16) == cache_key(paths, 16, None)


def test_resized_crops_zoom_in_and_are_seeded(rng):
    # A linear ramp: a zoomed-in window spans a narrower range of values than the whole image.
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 32)[None, :, None], 32, 0)[None], 8, 0)
    batch = np.repeat(ramp, 3, -1).astype(np.uint8)
    out = resized_crops(batch, np.random.default_rng(1), 0.6)
    assert out.shape == batch.shape and out.dtype == np.uint8
    spans = out[..., 0].max(axis=(1, 2)).astype(int) - out[..., 0].min(axis=(1, 2))
    assert (spans < 250).any()
    np.testing.assert_array_equal(out, resized_crops(batch, np.random.default_rng(1), 0.6))
    # Off by default: the augmentation stream is the one it was.
    plain = augment_batch(batch, np.random.default_rng(2), BranchConfig(image_size=32))
    np.testing.assert_array_equal(plain, augment_batch(batch, np.random.default_rng(2), None))


def test_inference_preparation_crops_to_the_lesion_exactly_as_training_decodes(rng):
    """prepare_image (every inference path: Keras, exports, serve, Ray, adapt) crops like training's decoding."""
    from colorspaces.image import resize_image
    from colorspaces.pipeline import Preprocess, prepare_image

    img = _with_lesion(150, 200, (140, 60), (22, 18), rng)
    whole, checks = prepare_image(img, Preprocess(32, 32))
    cropped, checks_cropped = prepare_image(img, Preprocess(32, 32, lesion_margin=0.15))
    np.testing.assert_array_equal(whole, resize_image(img, 32))
    np.testing.assert_array_equal(cropped, resize_image(crop_to_lesion(img, 0.15), 32))
    assert not np.array_equal(whole, cropped)
    assert checks == checks_cropped  # the image-level checks see the whole decoded image either way
    # the recipe travels through preprocess.json; an export written before lesion crops has none
    assert Preprocess.from_dict({"image_size": 32, "lesion_margin": 0.15}).lesion_margin == 0.15
    assert Preprocess.from_dict({"image_size": 32}).lesion_margin is None


def test_an_ensemble_refuses_branches_that_disagree_on_the_lesion_crop():
    from ensemble.engine import shared_decode_margin

    plain, boxed = BranchConfig(view="rgb"), BranchConfig(view="hsv", lesion_crop="box", lesion_margin=0.2)
    assert plain.decode_margin is None and boxed.decode_margin == 0.2
    assert shared_decode_margin([boxed, BranchConfig(view="fft", lesion_crop="box", lesion_margin=0.2)]) == 0.2
    with pytest.raises(ValueError, match="disagree on lesion-centred input"):
        shared_decode_margin([plain, boxed])
