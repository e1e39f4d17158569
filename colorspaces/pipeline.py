"""The inference preprocessing of one branch, in NumPy only: colour constancy, test-time windows, the view.

``models.branch.branch_inputs`` (Keras inference) and ``ensemble.runtime`` (the exported
ONNX/TFLite bundles, which must not import TensorFlow) both call ``view_inputs``, so a branch
sees the same arrays whichever runtime scores it.
"""

from __future__ import annotations

import numpy as np

from colorspaces.constancy import apply_constancy
from colorspaces.crops import sliding_windows
from colorspaces.views import apply_view


def view_inputs(images: np.ndarray, view: str, image_size: int, constancy: str = "none",
                crop_stride: int = 0) -> tuple[np.ndarray, int]:
    """The arrays a branch scores for a batch of images.

    Colour constancy sees the whole image, as in training, and only then is the image cut
    into the test-time windows (when it is larger than the branch input); each window then
    becomes the view.

    Args:
        images: RGB uint8 (N, L, L, 3) with L >= ``image_size``.
        view: a key of ``colorspaces.VIEWS``.
        image_size: the branch's input side.
        constancy: a key of ``colorspaces.CONSTANCY``.
        crop_stride: pixels between windows (0: a 3x3 grid); see ``colorspaces.crops.window_offsets``.

    Returns:
        ``(x, k)``: float32 view arrays (k·N, S, S, C), window-major (the first N are window 0
        of every image), and k the number of windows per image (1 without crops).
    """
    batch = apply_constancy(constancy, np.asarray(images))
    if batch.shape[1] > image_size:
        batch, k = sliding_windows(batch, image_size, crop_stride)
    else:
        k = 1
    return np.asarray(apply_view(view, batch), dtype=np.float32), k


def mean_over_windows(proba: np.ndarray, k: int) -> np.ndarray:
    """Per-image mean of window-major scores: (k·N, ...) from ``view_inputs`` → (N, ...)."""
    return proba.reshape(k, len(proba) // k, *proba.shape[1:]).mean(axis=0)
