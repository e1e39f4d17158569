"""Optional colour-constancy preprocessing, applied to RGB uint8 images before any view."""

from __future__ import annotations

from typing import Callable

import numpy as np


def shades_of_gray(images: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; Barata et al. 2015 for dermoscopy).

    Each image's illuminant is estimated per channel as the Minkowski p-norm mean of its pixels,
    e_c = (mean(I_c^p))^(1/p), and each channel is scaled by mean(e) / e_c, so the estimated
    illuminant becomes grey. p = 1 is Grey-World, p → ∞ is max-RGB; p = 6 is the value Barata
    et al. found best on dermoscopy images.

    Args:
        images: RGB uint8, (H, W, 3) or (N, H, W, 3).
        p: the Minkowski norm.

    Returns:
        RGB uint8 of the same shape (clipped to 0–255).
    """
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    x = batch.astype(np.float32)
    # Normalise to [0, 1] before the power, so p = 6 does not overflow float32.
    e = np.power(np.mean(np.power(x / 255.0, p), axis=(1, 2)), 1.0 / p)  # (N, 3)
    gains = e.mean(axis=1, keepdims=True) / np.maximum(e, 1e-6)
    out = np.clip(x * gains[:, None, None, :], 0, 255).round().astype(np.uint8)
    return out[0] if single else out


def _identity(images: np.ndarray) -> np.ndarray:
    return images


CONSTANCY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": _identity,
    "shades_of_gray": shades_of_gray,
}


def apply_constancy(method: str, images: np.ndarray) -> np.ndarray:
    """Apply the named colour-constancy method (a key of ``CONSTANCY``) to RGB uint8 images.

    Raises:
        KeyError: if ``method`` is unknown.
    """
    try:
        fn = CONSTANCY[method]
    except KeyError:
        raise KeyError(f"unknown colour constancy {method!r}; choose one of {sorted(CONSTANCY)}") from None
    return fn(images)
