"""Bad and unusual input, generated at test time: each case is converted correctly or refused with ImageError.

``FILE_CASES`` and ``ARRAY_CASES`` are the corpus; docs/architecture.md's Reliability section counts them.
"""

import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from colorspaces import ImageError, MissingImageError, read_image, resize_image
from colorspaces.image import MAX_PIXELS


def _jpeg(img_rgb, quality=95):
    return cv2.imencode(".jpg", img_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _png_header_only(width, height):
    """A PNG that declares width × height but carries almost no pixel data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _pil_bytes(mode, size, color, fmt, **kw):
    import io

    from PIL import Image

    buf = io.BytesIO()
    im = Image.new(mode, size, color)
    if kw.pop("exif_orientation", None):
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        kw["exif"] = exif
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16():
    img = np.zeros((12, 20, 3), np.uint16)
    img[..., 2] = 65535  # BGR order for OpenCV: pure red
    return cv2.imencode(".png", img)[1].tobytes()


_GOOD = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (30, 1, 3))

# name -> (file bytes or None for a missing path, expected: ("ok", check) or ("error", message fragment))
FILE_CASES = {
    "truncated.jpg": (_jpeg(_GOOD)[: len(_jpeg(_GOOD)) // 2], ("error", "cannot decode")),
    "truncated_tail.jpg": (_jpeg(_GOOD)[:-2], ("error", "cannot decode")),
    "zero_bytes.jpg": (b"", ("error", "empty")),
    "text_named.jpg": (b"patient notes, not an image\n" * 5, ("error", "cannot decode")),
    "missing.jpg": (None, ("error", "no such image file")),
    "gray.png": (cv2.imencode(".png", np.full((10, 14), 77, np.uint8))[1].tobytes(),
                 ("ok", lambda im: im.shape == (10, 14, 3) and (im == 77).all())),
    "palette.png": (_pil_bytes("P", (14, 10), 3, "PNG"), ("ok", lambda im: im.shape == (10, 14, 3))),
    "rgba.png": (_pil_bytes("RGBA", (14, 10), (255, 0, 0, 10), "PNG"),
                 ("ok", lambda im: im.shape == (10, 14, 3) and (im[0, 0] == [255, 0, 0]).all())),
    "sixteen_bit.png": (_png16(), ("ok", lambda im: (im[0, 0] == [255, 0, 0]).all())),
    "cmyk.jpg": (_pil_bytes("CMYK", (16, 8), (0, 255, 255, 0), "JPEG"),
                 ("ok", lambda im: im.shape == (8, 16, 3) and im[0, 0, 0] > 200 and im[0, 0, 1:].max() < 40)),
    "exif_rotated.jpg": (_pil_bytes("RGB", (20, 10), (0, 128, 0), "JPEG", exif_orientation=True),
                         ("ok", lambda im: im.shape == (20, 10, 3))),
    "one_pixel.png": (cv2.imencode(".png", np.full((1, 1, 3), 200, np.uint8))[1].tobytes(),
                      ("ok", lambda im: im.shape == (1, 1, 3) and resize_image(im, 16).shape == (16, 16, 3))),
    "thin_2x4000.png": (cv2.imencode(".png", np.full((2, 4000, 3), 90, np.uint8))[1].tobytes(),
                        ("ok", lambda im: im.shape == (2, 4000, 3) and (resize_image(im, 32) == 90).all())),
    "bomb_20000x20000.png": (_png_header_only(20000, 20000), ("error", "pixel limit")),
    "bomb_12000x9000.png": (_png_header_only(12000, 9000), ("error", "pixel limit")),
}

ARRAY_CASES = {
    "float32 in [0, 1]": (np.zeros((8, 8, 3), np.float32), ("error", "dtype")),
    "float with NaN": (np.full((8, 8, 3), np.nan), ("error", "NaN or inf")),
    "float with inf": (np.full((8, 8, 3), np.inf, np.float32), ("error", "NaN or inf")),
    "int64": (np.zeros((8, 8, 3), np.int64), ("error", "dtype")),
    "bool": (np.zeros((8, 8, 3), bool), ("error", "dtype")),
    "2 channels": (np.zeros((8, 8, 2), np.uint8), ("error", "shape")),
    "batch of images": (np.zeros((2, 8, 8, 3), np.uint8), ("error", "shape")),
    "1-D": (np.zeros(24, np.uint8), ("error", "shape")),
    "empty": (np.zeros((0, 8, 3), np.uint8), ("error", "empty")),
    "grayscale H×W": (np.full((8, 6), 9, np.uint8), ("ok", lambda im: im.shape == (8, 6, 3) and (im == 9).all())),
    "H×W×1": (np.full((8, 6, 1), 9, np.uint8), ("ok", lambda im: im.shape == (8, 6, 3))),
    "RGBA": (np.full((8, 6, 4), 9, np.uint8), ("ok", lambda im: im.shape == (8, 6, 3))),
    "uint16 RGB": (np.full((8, 6, 3), 65535, np.uint16), ("ok", lambda im: (im == 255).all())),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input")
    for name, (content, _) in FILE_CASES.items():
        if content is not None:
            (folder / name).write_bytes(content)
    return folder


def test_readme_quotes_this_corpus_and_the_pixel_limit_it_tests():
    """docs/architecture.md's Reliability section counts these cases and names the decompression-bomb limit."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    counted = re.search(r"\*\*(\d+) cases\*\* \((\d+) files, (\d+) arrays\)", text)
    assert counted, "docs/architecture.md no longer counts the bad-input cases as '**N cases** (F files, A arrays)'"
    assert tuple(map(int, counted.groups())) == (len(FILE_CASES) + len(ARRAY_CASES), len(FILE_CASES), len(ARRAY_CASES))
    assert f"over the {MAX_PIXELS:,}-pixel limit" in text
    # each bomb case declares more pixels than the limit, so it tests the limit and not a decoder failure
    bombs = [name for name, (_, outcome) in FILE_CASES.items() if outcome == ("error", "pixel limit")]
    assert len(bombs) == 2
    for name in bombs:
        width, height = map(int, re.search(r"(\d+)x(\d+)", name).groups())
        assert width * height > MAX_PIXELS


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_file_case_has_its_defined_outcome(corpus, name):
    path = corpus / name
    kind, expect = FILE_CASES[name][1]
    if kind == "ok":
        img = read_image(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert expect(img), f"{name} was read but converted wrongly: shape {img.shape}, first pixel {img[0, 0]}"
    else:
        with pytest.raises(ImageError, match=expect) as info:
            read_image(path)
        assert name in str(info.value), "the message must name the file"
        if name == "missing.jpg":
            assert isinstance(info.value, MissingImageError) and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", list(ARRAY_CASES))
def test_array_case_has_its_defined_outcome(name):
    arr, (kind, expect) = ARRAY_CASES[name]
    if kind == "ok":
        img = read_image(arr)
        assert img.dtype == np.uint8 and img.shape[2] == 3 and expect(img)
    else:
        with pytest.raises(ImageError, match=expect):
            read_image(arr)


def test_exif_orientation_is_applied_the_same_way_for_files_and_pil(corpus):
    from PIL import Image

    from_file = read_image(corpus / "exif_rotated.jpg")
    with Image.open(corpus / "exif_rotated.jpg") as im:
        np.testing.assert_array_equal(read_image(im), from_file)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=2048),
    # valid headers followed by random bytes reach deeper into the decoders
    st.binary(max_size=1024).map(lambda b: b"\xff\xd8\xff\xe0" + b),
    st.binary(max_size=1024).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=1024).map(lambda b: _jpeg(_GOOD, 50)[:200] + b),
))
def test_fuzz_read_image_on_random_bytes_raises_only_image_error(tmp_path, data):
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(data)
    try:
        img = read_image(path)
    except ImageError as exc:
        assert "fuzz.jpg" in str(exc)
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
    elements=None,
)


@settings(max_examples=200, deadline=None)
@given(arr=_ARRAYS)
def test_fuzz_read_image_on_random_arrays_raises_only_image_error(arr):
    try:
        img = read_image(arr)
    except ImageError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


# Valid images of any size, side by side with arbitrary arrays: without them most draws are invalid.
_RGB_IMAGES = hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arr=st.one_of(_RGB_IMAGES, _ARRAYS))
@example(arr=np.zeros((5, 7, 3), np.uint8))
@example(arr=np.full((4, 4, 3), np.nan, np.float32))
def test_fuzz_predict_on_random_arrays(trained_run, arr):
    """Exactly the arrays ``read_image`` accepts get a probability (the same as for their RGB form);
    every RGB uint8 H×W×3 image is one of them; the rest raise ``ImageError`` (a ``ValueError``)."""
    import ensemble

    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size:
        rgb = read_image(arr)  # the image contract: must be accepted as is
        np.testing.assert_array_equal(rgb, arr)
    else:
        try:
            rgb = read_image(arr)
        except ImageError:
            with pytest.raises(ImageError):
                ensemble.predict(arr, run=trained_run)
            return
    p = ensemble.predict(arr, run=trained_run)
    assert isinstance(p, float) and np.isfinite(p) and 0.0 <= p <= 1.0
    assert p == pytest.approx(ensemble.predict(rgb, run=trained_run), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_predict_on_each_file_case(trained_run, corpus, name):
    import ensemble

    kind, expect = FILE_CASES[name][1]
    if kind == "ok":
        assert 0.0 <= ensemble.predict(corpus / name, run=trained_run) <= 1.0
    else:
        with pytest.raises(ImageError, match=name):
            ensemble.predict(corpus / name, run=trained_run)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (12000, 9000)])
def test_a_decompression_bomb_message_quotes_one_limit(tmp_path, width, height):
    # PIL refuses 20000x20000 itself, with its own (higher) limit in the message: only ours is quoted.
    from colorspaces import ImageError, read_image
    from colorspaces.image import MAX_PIXELS

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    with pytest.raises(ImageError) as exc:
        read_image(path)
    message = str(exc.value)
    assert message.count("limit") == 1 and f"{MAX_PIXELS:,}-pixel limit" in message
    assert f"{width * height:,}" in message or f"{width}x{height}" in message
