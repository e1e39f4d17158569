"""The one boundary where files, PIL images and arrays become validated RGB uint8 arrays."""

from __future__ import annotations

import os
from pathlib import Path
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


def read_image(source: Any) -> np.ndarray:
    """Read an image as RGB ``uint8`` (H, W, 3).

    This is the only place where OpenCV's BGR order becomes RGB. Grayscale files are
    expanded to three channels, alpha is dropped, 16-bit files are scaled to 8 bits and
    EXIF orientation is applied (OpenCV's ``IMREAD_COLOR`` behaviour).

    Args:
        source: a path (``str`` or ``os.PathLike``), a PIL image, or an RGB uint8 array.

    Returns:
        A C-contiguous RGB uint8 array of shape (H, W, 3).

    Raises:
        MissingImageError: if a path does not exist.
        ImageError: if the file cannot be decoded or an array breaks the contract.
    """
    if isinstance(source, np.ndarray):
        return validate_image(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source))
    if type(source).__module__.startswith("PIL.") and hasattr(source, "convert"):
        # PIL is optional: accept its images without importing it at module level.
        from PIL import ImageOps

        # Match the file path, where OpenCV applies EXIF orientation.
        return validate_image(np.asarray(ImageOps.exif_transpose(source).convert("RGB")), name="PIL image")
    raise ImageError(
        f"unsupported image type {type(source).__name__}; "
        "expected a path, a PIL image or an RGB uint8 numpy array"
    )


def _read_path(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MissingImageError(f"{path}: no such image file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc})") from exc
    if data.size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes)")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{path}: cannot decode image (corrupt or not an image)")
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
