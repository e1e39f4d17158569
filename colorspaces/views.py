"""The views of an image (RGB, HSV, FFT by default; LAB and YCrCb as options), as deterministic,
vectorised functions shared by training and inference."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import scipy.fft

from colorspaces.constancy import shades_of_gray

_EPS = 1e-6


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(
            f"views take RGB uint8 arrays of shape (H, W, 3) or (N, H, W, 3), "
            f"got dtype {images.dtype} and shape {images.shape}"
        )
    single = images.ndim == 3
    return (images[None] if single else images), single


def to_rgb(images: np.ndarray) -> np.ndarray:
    """RGB view: the image scaled to [0, 1] as float32.

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 array of the same shape.
    """
    batch, single = _as_batch(images)
    out = batch.astype(np.float32) / 255.0
    return out[0] if single else out


def to_hsv(images: np.ndarray) -> np.ndarray:
    """HSV view: OpenCV's RGB→HSV conversion, every channel scaled to [0, 1].

    OpenCV stores 8-bit hue as degrees/2 in 0–179, so hue is divided by 180 (not 255):
    pure red is 0 and hue 179 (358°) maps to 0.994. S and V are divided by 255.

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 array of the same shape, channels (H, S, V).
    """
    return _opencv_view(images, cv2.COLOR_RGB2HSV, (1.0 / 180.0, 1.0 / 255.0, 1.0 / 255.0))


def to_lab(images: np.ndarray) -> np.ndarray:
    """LAB view (an option, not a default): OpenCV's 8-bit RGB→CIE L*a*b*, every channel / 255.

    OpenCV's 8-bit LAB stores L* × 255/100 and a*, b* + 128, so after / 255 white is
    (1, 0.502, 0.502) and black (0, 0.502, 0.502): a* and b* are centred on 128/255.

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 array of the same shape, channels (L, a, b).
    """
    return _opencv_view(images, cv2.COLOR_RGB2LAB, (1.0 / 255.0,) * 3)


def to_ycrcb(images: np.ndarray) -> np.ndarray:
    """YCrCb view (an option, not a default): OpenCV's 8-bit RGB→YCrCb (BT.601), every channel / 255.

    Y = 0.299 R + 0.587 G + 0.114 B; Cr and Cb are centred on 128/255 (grey has no chroma).

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 array of the same shape, channels (Y, Cr, Cb).
    """
    return _opencv_view(images, cv2.COLOR_RGB2YCrCb, (1.0 / 255.0,) * 3)


def _opencv_view(images: np.ndarray, code: int, scale: tuple[float, float, float]) -> np.ndarray:
    batch, single = _as_batch(images)
    n, h, w, _ = batch.shape
    # cvtColor works on 2-D images only; stacking the batch vertically keeps it one call.
    converted = cv2.cvtColor(np.ascontiguousarray(batch.reshape(n * h, w, 3)), code)
    out = converted.reshape(n, h, w, 3).astype(np.float32)
    for k, factor in enumerate(np.array(scale, dtype=np.float32)):  # channel by channel: 3x faster than broadcasting
        out[..., k] *= factor
    return out[0] if single else out


@functools.lru_cache(maxsize=16)
def _spectrum_layout(h: int, w: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """For ``to_fft`` on H×W×C images: the half spectrum's column weights, flattened (1, H·(W//2+1)),
    and the flat indices that gather the centred full spectrum (H, W, C) out of the half one.

    Column k2 of the half spectrum stands for itself and, for 1 <= k2 <= w - hw, its mirror too.
    Pixel (r, s) of the centred spectrum is frequency (i, j) = ((r - H//2) mod H, (s - W//2) mod W),
    which the half spectrum holds at (i, j) for j < hw, else conjugated at ((-i) mod H, W - j).
    """
    hw = w // 2 + 1
    col_weight = np.ones(hw, np.float32)
    col_weight[1 : w - hw + 1] = 2.0
    i = (np.arange(h)[:, None] - h // 2) % h
    j = (np.arange(w)[None, :] - w // 2) % w
    pixel = np.where(j < hw, i * hw + j, ((-i) % h) * hw + (w - j) % w)
    gather = (pixel[..., None] * c + np.arange(c)).ravel()
    weight, gather = np.tile(col_weight, h)[None, :], gather.astype(np.intp)
    weight.flags.writeable = gather.flags.writeable = False
    return weight, gather


def to_fft(images: np.ndarray) -> np.ndarray:
    """FFT view: per-channel centred log-magnitude spectrum, standardised per image.

    Recipe, for each image and each RGB channel ``c`` (values scaled to [0, 1]):
    ``F = fftshift(fft2(c))``; ``L = log(1 + |F|)``; output ``(L - mean(L)) / (std(L) + 1e-6)``,
    where mean and std are taken over that channel's H×W spectrum. The zero frequency sits
    at pixel (H // 2, W // 2). No window is applied.

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 array of the same shape.
    """
    batch, single = _as_batch(images)
    n, h, w, c = batch.shape
    x = batch.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    # A real image's spectrum is conjugate-symmetric, |F(k1, k2)| = |F(-k1, -k2)|: compute the
    # half spectrum (rfft2, float32), normalise it, then mirror it into the full one. This is
    # about 6x faster than the full complex128 FFT, and the FFT view is what bounds training
    # input speed (see experiments/benchmark.py).
    spec = scipy.fft.rfft2(x, axes=(1, 2))
    half = np.abs(spec, out=np.empty(spec.shape, np.float32))
    np.log1p(half, out=half)
    weight, gather = _spectrum_layout(h, w, c)
    flat = half.reshape(n, -1, c)
    # Reductions as matrix products: numpy's strided mean over (H, W) is ~30x slower here.
    mean = (weight @ flat) / np.float32(h * w)
    # Channel by channel: broadcasting over a last axis of length 3 is 3x slower, for the same values.
    for k in range(c):
        flat[..., k] -= mean[..., k]
    std = np.sqrt((weight @ np.square(flat)) / np.float32(h * w))
    scale = 1.0 / (std + np.float32(_EPS))
    for k in range(c):
        flat[..., k] *= scale[..., k]
    # Mirror the half spectrum into the full one and centre it (fftshift) in one gather.
    out = np.take(half.reshape(n, -1), gather, axis=1).reshape(n, h, w, c)
    return out[0] if single else out


def to_rgb_sog(images: np.ndarray) -> np.ndarray:
    """RGB view of the image after Shades-of-Gray colour constancy (``colorspaces.constancy.shades_of_gray``, p = 6).

    The same arrays as the ``rgb`` view of a branch trained with ``color_constancy`` "shades_of_gray",
    as a view of its own, so that a run can hold both branches side by side.
    """
    return to_rgb(shades_of_gray(images))


def to_hsv_sog(images: np.ndarray) -> np.ndarray:
    """HSV view of the image after Shades-of-Gray colour constancy (see ``to_rgb_sog``)."""
    return to_hsv(shades_of_gray(images))


@dataclass(frozen=True)
class ViewSpec:
    """What a branch, and ``explain``, need to know about a view.

    Attributes:
        name, channels, transform, description: the view's key, channel count, RGB uint8 ->
            float32 function and one line saying what it holds.
        channel_names: a short name per channel, for ``explain``'s pictures of what the branch
            receives (default: c0, c1, ...).
        display_range: the values a channel spans, drawn as black to white so that channels
            compare; ``None``: each channel is stretched from its own minimum to its maximum
            (for unbounded values, such as a z-scored spectrum).
        frequency: the view's image axes are frequencies, not positions (fft): its Grad-CAM maps
            are averaged over sliding windows in frequency space and drawn over its spectrum,
            never over the photo.
        constancy, base: a view that is another view of a colour-constancy-corrected image
            (``transform(x) == VIEWS[base].transform(apply_constancy(constancy, x))``) says so, so
            that a bundle scoring several such views corrects each batch once
            (``colorspaces.pipeline.Preprocess.branch_inputs``); ``base`` None: a view of its own.
    """

    name: str
    channels: int
    transform: Callable[[np.ndarray], np.ndarray]
    description: str
    channel_names: tuple[str, ...] = ()
    display_range: tuple[float, float] | None = (0.0, 1.0)
    frequency: bool = False
    constancy: str = "none"
    base: str | None = None

    def channel_name(self, k: int) -> str:
        """Channel ``k``'s name (``c{k}`` when the spec names none)."""
        return self.channel_names[k] if k < len(self.channel_names) else f"c{k}"


# The only per-view code in the project: everything else looks views up here.
VIEWS: dict[str, ViewSpec] = {
    "rgb": ViewSpec("rgb", 3, to_rgb, "RGB scaled to [0, 1]", ("R", "G", "B")),
    "hsv": ViewSpec("hsv", 3, to_hsv, "OpenCV HSV, hue/180, saturation/255, value/255", ("H", "S", "V")),
    "fft": ViewSpec("fft", 3, to_fft, "per-channel centred log-magnitude spectrum, z-scored per image",
                    ("R spectrum", "G spectrum", "B spectrum"), display_range=None, frequency=True),
    # Options, not defaults: unmeasured on this data until experiments/RESULTS.md has their rows.
    "lab": ViewSpec("lab", 3, to_lab, "OpenCV CIE L*a*b* (8-bit), every channel / 255", ("L*", "a*", "b*")),
    "ycrcb": ViewSpec("ycrcb", 3, to_ycrcb, "OpenCV YCrCb (BT.601, 8-bit), every channel / 255", ("Y", "Cr", "Cb")),
    # Defaults since 2026-12-06 (see DEFAULT_VIEWS).
    "rgb_sog": ViewSpec("rgb_sog", 3, to_rgb_sog,
                        "Shades-of-Gray colour constancy (p = 6) of the branch input (after any window), then RGB / 255",
                        ("R", "G", "B"), constancy="shades_of_gray", base="rgb"),
    "hsv_sog": ViewSpec("hsv_sog", 3, to_hsv_sog,
                        "Shades-of-Gray colour constancy (p = 6) of the branch input (after any window), then the hsv view",
                        ("H", "S", "V"), constancy="shades_of_gray", base="hsv"),
}

# The design's three views: every default ensemble has them, and a run that holds only them
# still fuses without --views.
DESIGN_VIEWS: tuple[str, ...] = ("rgb", "hsv", "fft")
# What `train --view all` trains and `fuse` fuses unless told otherwise: the design's three plus
# the colour-normalised twins of the colour views, which scored higher on the ISIC 2017
# validation images under both the in-source and the leave-one-source-out protocol, with the
# HAM10000 validation part unchanged (experiments/RESULTS.md, "Shades-of-Gray twins").
DEFAULT_VIEWS: tuple[str, ...] = DESIGN_VIEWS + ("rgb_sog", "hsv_sog")


def apply_view(view: str, images: np.ndarray) -> np.ndarray:
    """Apply the named view to one image or a batch.

    Args:
        view: a key of ``VIEWS``.
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).

    Returns:
        float32 view array of the same shape.

    Raises:
        KeyError: if ``view`` is not one of ``VIEWS``.
    """
    try:
        spec = VIEWS[view]
    except KeyError:
        raise KeyError(f"unknown view {view!r}; choose one of {sorted(VIEWS)}") from None
    return spec.transform(images)
