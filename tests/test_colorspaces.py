import cv2
import numpy as np
import pytest

from colorspaces import VIEWS, ImageError, MissingImageError, apply_view, read_image, resize_image, to_fft, to_hsv, to_rgb


def solid(rgb, h=4, w=4):
    return np.full((h, w, 3), rgb, dtype=np.uint8)


@pytest.mark.parametrize("rgb, hue", [((255, 0, 0), 0.0), ((0, 255, 0), 60 / 180), ((0, 0, 255), 120 / 180), ((255, 0, 255), 150 / 180)])
def test_hsv_known_hues_use_the_0_179_range(rgb, hue):
    hsv = to_hsv(solid(rgb))
    np.testing.assert_allclose(hsv[..., 0], hue, atol=1e-6)
    np.testing.assert_allclose(hsv[..., 1:], 1.0, atol=1e-6)


def test_hsv_of_gray_has_zero_saturation():
    hsv = to_hsv(solid((128, 128, 128)))
    assert np.all(hsv[..., 1] == 0) and np.allclose(hsv[..., 2], 128 / 255)


@pytest.mark.parametrize("shape", [(8, 8), (9, 7)])
def test_fft_of_constant_image_has_all_energy_at_centre(shape):
    img = solid((200, 100, 50), *shape)
    out = to_fft(img)
    centre = (shape[0] // 2, shape[1] // 2)
    for c in range(3):
        chan = out[..., c]
        assert np.unravel_index(np.argmax(chan), chan.shape) == centre
        others = np.delete(chan.ravel(), np.ravel_multi_index(centre, chan.shape))
        # every non-DC frequency holds the same (zero) energy, up to float32 FFT rounding
        assert np.ptp(others) < 1e-4 * (chan[centre] - others[0])
        assert chan[centre] > others[0]
    # raw spectrum check: only the DC coefficient is non-zero
    spec = np.abs(np.fft.fftshift(np.fft.fft2(img[..., 0] / 255.0)))
    assert spec[centre] > 0 and np.count_nonzero(spec > 1e-9) == 1


@pytest.mark.parametrize("shape", [(128, 128), (96, 96), (97, 64), (33, 35), (8, 9), (1, 1), (3, 1)])
def test_fast_fft_matches_the_full_complex_spectrum_recipe(shape, rng):
    # to_fft computes a float32 half spectrum and mirrors it; it must equal the documented
    # recipe computed the slow, obvious way in float64, on odd and even sizes alike.
    imgs = rng.integers(0, 256, (2, *shape, 3)).astype(np.uint8)
    x = imgs / 255.0
    log_mag = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(x, axes=(1, 2)), axes=(1, 2))))
    mean, std = log_mag.mean(axis=(1, 2), keepdims=True), log_mag.std(axis=(1, 2), keepdims=True)
    expected = (log_mag - mean) / (std + 1e-6)
    got = to_fft(imgs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_fft_is_standardised_per_image_and_channel(rng):
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = to_fft(img)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1)), 1, atol=1e-3)


def test_rgb_view_scales_to_unit_range():
    out = to_rgb(np.array([[[0, 128, 255]]], np.uint8))
    np.testing.assert_allclose(out, [[[0, 128 / 255, 1.0]]])


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_views_are_deterministic_float32_and_batch_equals_singles(view, rng):
    batch = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    out = apply_view(view, batch)
    assert out.dtype == np.float32 and out.shape == (3, 12, 12, VIEWS[view].channels)
    np.testing.assert_array_equal(out, apply_view(view, batch))
    for i in range(3):
        np.testing.assert_allclose(out[i], apply_view(view, batch[i]), atol=1e-6)


def test_unknown_view_lists_the_choices():
    with pytest.raises(KeyError, match=r"unknown view .xyz.; choose one of .*lab"):
        apply_view("xyz", solid((1, 2, 3)))


def test_views_reject_float_input():
    with pytest.raises(ValueError, match="uint8"):
        to_rgb(np.zeros((4, 4, 3), np.float32))


def test_read_image_turns_bgr_file_into_rgb(tmp_path):
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), solid((0, 0, 255)))  # BGR red on disk
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (4, 4, 3)
    assert tuple(img[0, 0]) == (255, 0, 0)
    assert to_hsv(img)[0, 0, 0] == 0.0


def test_read_image_expands_grayscale_png(tmp_path):
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), np.full((5, 6), 77, np.uint8))
    img = read_image(str(path))
    assert img.shape == (5, 6, 3) and np.all(img == 77)


def test_read_image_accepts_pil_and_matches_array():
    from PIL import Image

    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    np.testing.assert_array_equal(read_image(Image.fromarray(arr)), arr)
    np.testing.assert_array_equal(read_image(arr), arr)


def test_missing_path_is_a_file_not_found_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(MissingImageError, match="nope.jpg"):
        read_image(path)
    with pytest.raises(FileNotFoundError):
        read_image(path)


@pytest.mark.parametrize("content", [b"", b"this is not a jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 10])
def test_corrupt_files_raise_image_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="bad.jpg"):
        read_image(path)


@pytest.mark.parametrize("arr, problem", [
    (np.zeros((4, 4, 3), np.float32), "dtype"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN or inf"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (np.zeros((4, 4, 3), bool), "dtype"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((4, 4, 3, 1), np.uint8), "shape"),
    (np.zeros(12, np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
])
def test_bad_arrays_are_refused(arr, problem):
    with pytest.raises(ImageError, match=problem):
        read_image(arr)


def test_resize_squashes_to_square_and_validates_size():
    img = np.zeros((150, 200, 3), np.uint8)
    assert resize_image(img, 32).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="positive integer"):
        resize_image(img, 0)


def test_prepare_image_checks_the_original_then_resizes_to_the_recipe():
    from colorspaces.pipeline import BranchRecipe, Preprocess, prepare_image, prepare_images

    recipe = Preprocess.from_dict({"image_size": 16, "load_size": 24,
                                   "branches": [{"view": "hsv", "color_constancy": "none", "crop_stride": 4,
                                                 "channels": 3}]})
    assert recipe == Preprocess(16, 24, (BranchRecipe("hsv", "none", 4),))
    strip = np.random.default_rng(0).integers(0, 256, (20, 200, 3), dtype=np.uint8)
    image, checks = prepare_image(strip, recipe)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert checks == ("too_small", "extreme_aspect_ratio")  # judged on the 20 x 200 original, not the square
    batch, all_checks = prepare_images([strip, strip], recipe)
    assert batch.shape == (2, 24, 24, 3) and all_checks == [checks, checks]
    assert prepare_images([], recipe)[0].shape == (0, 24, 24, 3)
