"""Square-image geometry: sliding-window crops (random in training, a grid at test time) and the 8 symmetries.

A branch trained with crops sees ``size``×``size`` windows of an image resized to a larger
``load`` side (``BranchConfig.crop_scale``). At test time the same magnification is kept:
the image is resized to ``load`` and the probabilities of a regular grid of windows are
averaged. Crops are always cut from images already assigned to a split, batch by batch, so
no crop can carry one split's pixels into another.
"""

from __future__ import annotations

import numpy as np


def window_offsets(load: int, size: int, stride: int = 0) -> list[int]:
    """Top-left offsets along one axis of the test-time windows, first and last window included.

    Args:
        load: side of the resized image.
        size: side of a window (the branch input).
        stride: pixels between windows; 0 means ``(load - size) // 2`` (three windows per axis).

    Raises:
        ValueError: if ``size > load`` or ``stride < 0``.
    """
    if size > load:
        raise ValueError(f"window side {size} exceeds the image side {load}")
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    span = load - size
    if span == 0:
        return [0]
    step = stride or max(1, span // 2)
    offsets = list(range(0, span + 1, step))
    if offsets[-1] != span:
        offsets.append(span)  # the far edge is always covered
    return offsets


def sliding_windows(batch: np.ndarray, size: int, stride: int = 0) -> tuple[np.ndarray, int]:
    """All test-time windows of a square batch (N, L, L, C).

    Returns:
        ``(windows, k)``: windows of shape (k·N, size, size, C), window-major (the first N are
        window 0 of every image), and k the number of windows per image.
    """
    offsets = window_offsets(batch.shape[1], size, stride)
    wins = [batch[:, r : r + size, c : c + size] for r in offsets for c in offsets]
    return np.ascontiguousarray(np.concatenate(wins)), len(wins)


def random_crops(batch: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly placed ``size``×``size`` window per image of a square batch (N, L, L, C)."""
    n, load = len(batch), batch.shape[1]
    if size > load:
        raise ValueError(f"crop side {size} exceeds the image side {load}")
    rows = rng.integers(0, load - size + 1, n)
    cols = rng.integers(0, load - size + 1, n)
    return np.stack([img[r : r + size, c : c + size] for img, r, c in zip(batch, rows, cols)]) if n else batch[:, :size, :size]


def centre_crop(batch: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``×``size`` window of each image of a square batch (N, L, L, C)."""
    start = (batch.shape[1] - size) // 2
    return batch[:, start : start + size, start : start + size]


# The 8 symmetries of the square, in the order ``dihedral`` numbers them: training augments with
# them and test-time averaging scores all of them.
DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "flip", "flip+rot90", "flip+rot180", "flip+rot270")


def dihedral(batch: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations/flips of a square image batch (N, S, S, C); k = 0 is the identity."""
    out = np.rot90(batch, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if k >= 4 else out)
