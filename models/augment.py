"""Random augmentation of RGB uint8 training batches; training only, never used at inference."""

from __future__ import annotations

import cv2
import numpy as np

from colorspaces.crops import dihedral
from models.branch import BranchConfig


def augment_batch(images: np.ndarray, rng: np.random.Generator, config: BranchConfig | None = None) -> np.ndarray:
    """Random augmentation of RGB uint8 training images (never used at inference).

    Always: random 90° rotations and horizontal flips (a lesion has no canonical orientation).
    With a config that asks for them: a small random rotation and zoom (``rotate_degrees``,
    ``scale_jitter``) and brightness, contrast and hue jitter (``color_jitter``). They are
    applied to the RGB image before the view, so each view sees the change it would see in a
    real photograph.

    Args:
        images: RGB uint8 (N, S, S, 3), square (the rotations keep the shape).
        rng: the batch's random generator (training seeds it per epoch and batch).
        config: the branch config whose ``rotate_degrees``, ``scale_jitter`` and
            ``color_jitter`` apply; None for rotations and flips only.

    Returns:
        RGB uint8 of the same shape.
    """
    out = np.empty_like(images)
    ks = rng.integers(0, 4, size=len(images))
    flips = rng.random(len(images)) < 0.5
    # The same 8 symmetries test-time averaging uses: k-th rotation, then a flip for k + 4.
    for i, k in enumerate(ks + 4 * flips):
        out[i] = dihedral(images[i : i + 1], int(k))[0]
    if config is not None and (config.rotate_degrees > 0 or config.scale_jitter > 0):
        out = _affine(out, rng, config.rotate_degrees, config.scale_jitter)
    if config is not None and config.color_jitter > 0:
        out = _color_jitter(out, rng, config.color_jitter)
    return out


def _affine(images: np.ndarray, rng: np.random.Generator, degrees: float, scale: float) -> np.ndarray:
    n, h, w = images.shape[:3]
    angles = rng.uniform(-degrees, degrees, n)
    scales = rng.uniform(1 - scale, 1 + scale, n)
    out = np.empty_like(images)
    for i in range(n):
        m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), float(angles[i]), float(scales[i]))
        out[i] = cv2.warpAffine(images[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def _color_jitter(images: np.ndarray, rng: np.random.Generator, j: float) -> np.ndarray:
    n = len(images)
    brightness = rng.uniform(-64 * j, 64 * j, n).astype(np.float32)
    contrast = rng.uniform(1 - j, 1 + j, n).astype(np.float32)
    hue = np.rint(rng.uniform(-30 * j, 30 * j, n)).astype(np.int16)
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]
    x = np.clip(x, 0, 255).round().astype(np.uint8)
    out = np.empty_like(x)
    for i in range(n):
        hsv = cv2.cvtColor(x[i], cv2.COLOR_RGB2HSV)
        # OpenCV's 8-bit hue runs 0-179: turn it modulo 180 so red stays next to red.
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue[i]) % 180).astype(np.uint8)
        out[i] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out
