"""The one boundary where files, PIL images and arrays become validated RGB uint8 arrays."""

from __future__ import annotations

import os
import re
from pathlib import Path
from struct import error as struct_error
from typing import Any

import cv2
import numpy as np


class ImageError(ValueError):
    """An image could not be read or does not meet the RGB uint8 H×W×3 contract."""


class MissingImageError(ImageError, FileNotFoundError):
    """The image path does not exist (also a ``FileNotFoundError``)."""


def validate_image(image: Any, name: str = "image") -> np.ndarray:
    """Check the image contract: an RGB ``uint8`` array of shape (H, W, 3).

    Args:
        image: the candidate array.
        name: how to name the image in error messages (a path, or "image").

    Returns:
        The same array, made C-contiguous.

    Raises:
        ImageError: if the dtype, shape or channel count is wrong.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8 (RGB 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name}: expected shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"{name}: image is empty, shape {image.shape}")
    return np.ascontiguousarray(image)


# File suffixes read_image decodes, for every place that looks for image files (datasets, predict).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # larger declared sizes are refused before decoding (decompression bombs)


def read_image(source: Any) -> np.ndarray:
    """Read an image as RGB ``uint8`` (H, W, 3).

    This is the only place where OpenCV's BGR order becomes RGB. Supported inputs are
    converted, not refused: grayscale and palette files are expanded to three channels,
    alpha is dropped, 16-bit files are scaled to 8 bits, CMYK JPEGs become RGB and EXIF
    orientation is applied. Arrays may be uint8 or uint16, (H, W), (H, W, 1), (H, W, 3)
    RGB or (H, W, 4) RGBA. Everything else raises ``ImageError`` naming the input and
    the problem; no other exception escapes for bad content.

    Args:
        source: a path (``str`` or ``os.PathLike``), a PIL image, or a NumPy array.

    Returns:
        A C-contiguous RGB uint8 array of shape (H, W, 3).

    Raises:
        MissingImageError: if a path does not exist.
        ImageError: if the file cannot be decoded, declares more than ``MAX_PIXELS`` pixels,
            or an array has an unsupported dtype, shape or channel count.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, "image array")
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source))
    if type(source).__module__.startswith("PIL.") and hasattr(source, "convert"):
        # PIL is optional: accept its images without importing it at module level.
        from PIL import ImageOps

        w, h = source.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"PIL image: {w}x{h} is over the {MAX_PIXELS:,}-pixel limit")
        try:
            # Match the file path, where OpenCV applies EXIF orientation.
            return validate_image(np.asarray(ImageOps.exif_transpose(source).convert("RGB")), name="PIL image")
        except (OSError, ValueError) as exc:
            raise ImageError(f"PIL image: cannot convert to RGB ({exc})") from exc
    raise ImageError(
        f"unsupported image type {type(source).__name__}; "
        "expected a path, a PIL image or an RGB uint8 numpy array"
    )


def _from_array(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint16:
        # np.asarray: on a 0-d array the shift gives a numpy scalar, not an array.
        image = np.asarray(image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        hint = " (it contains NaN or inf)" if image.dtype.kind in "fc" and not np.isfinite(image).all() else ""
        raise ImageError(f"{name}: expected dtype uint8 (RGB 0-255) or uint16, got {image.dtype}{hint}; "
                         "scale and convert it, e.g. (x * 255).round().astype(np.uint8) for [0, 1] floats")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {image.shape[1]}x{image.shape[0]} is over the {MAX_PIXELS:,}-pixel limit")
    return validate_image(image, name=name)


def _declared_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the file header, without decoding pixels (None if PIL cannot tell)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as exc:
        # PIL's message quotes its own, higher limit: only the size is taken from it, so the user
        # reads one limit, ours.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "a size"
        raise ImageError(f"{path}: declares {declared}, over the {MAX_PIXELS:,}-pixel limit (possible decompression "
                         "bomb); not decoded") from exc
    except (OSError, ValueError, SyntaxError, struct_error):
        return None


def _read_path(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MissingImageError(f"{path}: no such image file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc})") from exc
    if data.size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes)")
    size = _declared_size(path)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise ImageError(f"{path}: declares {size[0]}x{size[1]} pixels, over the {MAX_PIXELS:,}-pixel limit "
                         "(possible decompression bomb); not decoded")
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(f"{path}: cannot decode image ({str(exc).strip().splitlines()[-1]})") from exc
    if bgr is None:
        raise ImageError(f"{path}: cannot decode image (corrupt, truncated or not an image)")
    return validate_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), name=str(path))


# Names the resize recipe below; decoded-image caches are keyed by it, so change it with the recipe.
RESIZE_RECIPE = "squash-square/area-down-linear-up/v1"


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` × ``size``, ignoring its aspect ratio.

    Squashing to a square is deliberate: the ISIC 2017 copies were already squashed from
    4:3 to 1:1, so squashing HAM10000's 4:3 images the same way gives every source the
    same lesion geometry, whereas letterboxing or centre-cropping would not.

    Args:
        image: RGB uint8 (H, W, 3).
        size: output side in pixels.

    Returns:
        RGB uint8 (size, size, 3).

    Raises:
        ValueError: if ``size`` is not a positive integer.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    image = validate_image(image)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    # INTER_AREA avoids aliasing when shrinking; it degrades to bilinear when enlarging.
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (int(size), int(size)), interpolation=interp)
