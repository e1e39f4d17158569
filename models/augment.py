"""Random augmentation of RGB uint8 training batches; training only, never used at inference."""

from __future__ import annotations

import cv2
import numpy as np

from colorspaces.crops import dihedral
from models.branch import BranchConfig


def augment_batch(images: np.ndarray, rng: np.random.Generator, config: BranchConfig | None = None) -> np.ndarray:
    """Random augmentation of RGB uint8 training images (never used at inference).

    Always: random 90° rotations and horizontal flips (a lesion has no canonical orientation).
    With a config that asks for them: a random resized crop (``resized_crop``), a small random rotation and zoom (``rotate_degrees``,
    ``scale_jitter``), brightness, contrast and hue jitter (``color_jitter``) and the camera
    and pipeline changes of another clinic (``acquisition``, see :func:`acquisition_shift`). They are
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
    if config is not None and config.resized_crop > 0:
        out = resized_crops(out, rng, config.resized_crop)
    if config is not None and (config.rotate_degrees > 0 or config.scale_jitter > 0):
        out = _affine(out, rng, config.rotate_degrees, config.scale_jitter)
    if config is not None and config.color_jitter > 0:
        out = _color_jitter(out, rng, config.color_jitter)
    if config is not None and config.acquisition > 0:
        out = acquisition_shift(out, rng, config.acquisition)
    return out


def mixup(images: np.ndarray, y: np.ndarray, weights: np.ndarray, rng: np.random.Generator,
          alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixup (Zhang et al., 2018): each image blended with a random partner from the same batch.

    Image i becomes ``l_i * x_i + (1 - l_i) * x_p(i)`` with ``l_i ~ Beta(alpha, alpha)`` and ``p`` a
    random permutation of the batch. Its loss is the blend of the two images' weighted losses,
    ``l_i w_i BCE(y_i) + (1 - l_i) w_p BCE(y_p)``; binary cross-entropy is linear in the label, so
    that is one weighted loss ``W BCE(t)`` with ``W = l_i w_i + (1 - l_i) w_p`` and the soft label
    ``t = (l_i w_i y_i + (1 - l_i) w_p y_p) / W`` (with equal weights, simply the blended label; with
    class weights, a melanoma's larger weight still counts in a blended pair). Training only.

    Args:
        images: RGB uint8 (N, S, S, 3).
        y: labels (N,), 0 or 1.
        weights: loss weights (N,), >= 0.
        rng: the batch's random generator.
        alpha: the Beta distribution's parameter, > 0 (small: most blends stay close to one image).

    Returns:
        ``(images, labels, weights)``: RGB uint8, and float32 soft labels ``t`` and weights ``W``.
    """
    n = len(images)
    lam = rng.beta(alpha, alpha, n).astype(np.float32)
    partner = rng.permutation(n)
    x = lam[:, None, None, None] * images.astype(np.float32) + (1 - lam[:, None, None, None]) * images[partner]
    y, w = np.asarray(y, np.float32), np.asarray(weights, np.float32)
    total = lam * w + (1 - lam) * w[partner]
    positive = lam * w * y + (1 - lam) * (w * y)[partner]
    # Two weightless images (e.g. follow-up nevi left out) keep a weight of 0: their label is moot.
    labels = np.where(total > 0, positive / np.where(total > 0, total, 1), lam * y + (1 - lam) * y[partner])
    return np.clip(x + 0.5, 0, 255).astype(np.uint8), labels.astype(np.float32), total.astype(np.float32)


def resized_crops(images: np.ndarray, rng: np.random.Generator, r: float) -> np.ndarray:
    """Random resized crops: per image, a square window of a uniform 1 - ``r`` to 1 of the area, placed
    uniformly, resized back to the full side (scale augmentation: lesions seen at several zooms)."""
    n, side = len(images), images.shape[1]
    areas = rng.uniform(1.0 - r, 1.0, n)
    out = np.empty_like(images)
    for i in range(n):
        k = max(2, min(side, int(round(side * np.sqrt(areas[i])))))
        top, left = rng.integers(0, side - k + 1, 2)
        window = images[i, top : top + k, left : left + k]
        out[i] = window if k == side else cv2.resize(window, (side, side), interpolation=cv2.INTER_LINEAR)
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


def acquisition_shift(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random changes a different camera, clinic or image pipeline makes, each image on its own.

    What differs between dermoscopy sources is mostly acquisition, not anatomy: compression,
    optics and resampling, tone curve, white balance, and how images were resized (HAM10000 is
    4:3, ISIC 2017 was squashed to 1:1). With ``strength`` s in (0, 1], each image gets, with
    probability 1/2 each:

    * JPEG re-encoding at quality uniform in [95 - 65 s, 95];
    * a Gaussian blur (sigma up to 1.5 s px) or, as often, downscaling by up to 1 - 0.6 s and back;
    * gamma exp(u), u uniform in ±0.35 s;
    * white balance: per-channel gains exp(N(0, 0.08 s)), then a colour temperature shift t
      uniform in ±0.15 s (red × (1 + t), blue × (1 - t));
    * an aspect squash: a central band of 1 - 0.25 s to 1 of the width (or height) stretched back
      to the square, as a 4:3 image squashed to 1:1 looks.

    Args:
        images: RGB uint8 (N, S, S, 3).
        rng: the batch's random generator.
        strength: s in (0, 1].

    Returns:
        RGB uint8 of the same shape.
    """
    n, h, w = images.shape[:3]
    out = images.copy()
    for i in range(n):
        img = out[i]
        if rng.random() < 0.5:
            img = _squash(img, rng, strength)
        if rng.random() < 0.5:
            if rng.random() < 0.5:
                img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.3, 0.3 + 1.2 * strength)))
            else:
                f = float(rng.uniform(1 - 0.6 * strength, 1.0))
                small = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
                img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        x = img.astype(np.float32) / 255.0
        if rng.random() < 0.5:
            x = x ** np.exp(rng.uniform(-0.35 * strength, 0.35 * strength))
        if rng.random() < 0.5:
            gains = np.exp(rng.normal(0.0, 0.08 * strength, 3))
            t = rng.uniform(-0.15 * strength, 0.15 * strength)
            x = x * (gains * np.array([1 + t, 1.0, 1 - t]))
        img = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            quality = int(rng.uniform(95 - 65 * strength, 95))
            ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
        out[i] = img
    return out


def _squash(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    h, w = img.shape[:2]
    keep = float(rng.uniform(1 - 0.25 * strength, 1.0))
    if rng.random() < 0.5:
        k = max(1, round(w * keep))
        band = img[:, (w - k) // 2 : (w - k) // 2 + k]
    else:
        k = max(1, round(h * keep))
        band = img[(h - k) // 2 : (h - k) // 2 + k]
    return cv2.resize(band, (w, h), interpolation=cv2.INTER_LINEAR)
