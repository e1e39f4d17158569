"""Cheap image-level checks that tell, before any network runs, that an input is no dermoscopic photograph.

They look at the decoded image at its own size and shape (before ``resize_image`` squashes it
to a square), so a panorama or a thumbnail is named as such. Each failed check is a named
reason; the feature-level gate (``ensemble.ood``) catches what they cannot, such as an
ordinary colour photograph.

The limits were set with a wide margin against 10,052 ISIC/HAM10000 dermoscopic images (JPEG,
150 px short side): the smallest 99th-percentile pixel chroma among them was 19 grey levels
(pale skin with a small lesion has a low *mean* chroma, down to 4, so the mean is not used),
and the smallest luminance standard deviation was 5.3.
"""

from __future__ import annotations

import cv2
import numpy as np

from colorspaces.image import validate_image

MIN_SIDE = 32  # px: below this the branches see upscaled blur, not a lesion
MAX_ASPECT = 3.0  # long side / short side; dermoscopy is square to 4:3 (squashed to 1:1 for the branches)
MIN_CHROMA = 8.0  # 99th percentile of max(R,G,B) - min(R,G,B), grey levels: a grey image has ~0
MIN_LUMA_STD = 3.0  # grey levels: a blank or solid-colour image
_CHECK_SIDE = 256  # chroma and contrast are measured on a sample of at most this many pixels a side

#: The reasons ``image_checks`` can return, with what each means (for help texts and notes).
REASONS = {
    "too_small": f"short side under {MIN_SIDE} px",
    "extreme_aspect_ratio": f"long side over {MAX_ASPECT:g}x the short side",
    "not_colour": f"greyscale or nearly so (99th-percentile chroma under {MIN_CHROMA:g})",
    "nearly_uniform": f"almost no contrast (luminance standard deviation under {MIN_LUMA_STD:g})",
}


def image_checks(image: np.ndarray) -> tuple[str, ...]:
    """The image-level reasons why ``image`` is not a dermoscopic photograph; empty when none applies.

    Args:
        image: RGB uint8 (H, W, 3) as ``read_image`` returns it, at its original size.

    Returns:
        Keys of ``REASONS``, in that order.
    """
    image = validate_image(image)
    h, w = image.shape[:2]
    reasons = []
    if min(h, w) < MIN_SIDE:
        reasons.append("too_small")
    if max(h, w) > MAX_ASPECT * min(h, w):
        reasons.append("extreme_aspect_ratio")
    # A strided sample (every step-th pixel), not a resize: a 12-megapixel photo costs what a 256-px one
    # does, and pixel noise is kept rather than averaged away (a faithful variance).
    step = -(-max(h, w) // _CHECK_SIDE)
    image = np.ascontiguousarray(image[::step, ::step])
    # Per-channel maximum/minimum: the same values as max(axis=1) on (N, 3), 25x faster (a reduction over
    # an axis of length 3 is slow in NumPy), which mattered for the server's per-request cost.
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    chroma = np.maximum(np.maximum(r, g), b).astype(np.int16) - np.minimum(np.minimum(r, g), b)
    if np.percentile(chroma, 99) < MIN_CHROMA:
        reasons.append("not_colour")
    if cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).std() < MIN_LUMA_STD:
        reasons.append("nearly_uniform")
    return tuple(reasons)
