"""Cheap image-level checks that tell, before any network runs, that an input is no dermoscopic photograph.

They look at the decoded image at its own size and shape (before ``resize_image`` squashes it
to a square), so a panorama or a thumbnail is named as such. Each failed check is a named
reason; the feature-level gate (``ensemble.ood``) catches what they cannot, such as an
ordinary colour photograph.

The limits were set with a wide margin against 10,052 ISIC/HAM10000 dermoscopic images (JPEG,
150 px short side): the smallest 99th-percentile pixel chroma among them was 19 grey levels
(pale skin with a small lesion has a low *mean* chroma, down to 4, so the mean is not used),
and the smallest luminance standard deviation was 5.3.

Two checks catch rendered graphics (text pages, code, charts, diagrams, screenshots, a photo on a
white page), which are colourful and contrasty enough to pass the others and which the feature
gate passed half the time (issue 28). They rest on one fact: a camera's sensor noise and JPEG
leave no two neighbouring pixels of skin exactly equal over a large area, while rendered pages
are exactly uniform between their strokes.

Both count only page-like uniform colours: near-neutral (HSV saturation at most
``MAX_PAGE_SATURATION``: white, grey, cream) or dark (a dark theme). Skin and pigment are
saturated, so a flat patch of them (the synthetic lesions' noise-free interiors) is never a page.

* ``uniform_area``: the largest 4-connected region of one exact, page-like, not dark colour (a
  dermatoscope's black surround is uniform too) covers at least ``MAX_UNIFORM_AREA`` of the image.
* ``text_like``: at least ``MIN_SHARP_ON_FLAT`` of the pixels are a step of over ``SHARP_STEP``
  grey levels to a neighbour *and* touch a page-like uniform region covering at least
  ``MIN_BACKGROUND`` of the image (glyph and line edges on a flat background, dark themes included).

The limits come from a scan of the 10,052 dermoscopic images with the same quantities before the
page-like condition (which can only lower them): the largest uniform light region was at most
0.063 of an image on HAM10000 and 0.213 on one ISIC 2017 image (pale skin; 99.9th percentile of all
sources 0.08); the sharp-beside-flat share at most 0.00095 (hairs and rulers sit on textured skin).
With these limits no dermoscopic image and no seborrheic keratosis is flagged, and 94% of the
generated rendered images of the held-out part (``experiments.farood``) are.
Measured with ``python -m experiments.ood --checks-only`` (DOCNOTES-ood.md).
"""

from __future__ import annotations

import cv2
import numpy as np

from colorspaces.image import validate_image

MIN_SIDE = 32  # px: below this the branches see upscaled blur, not a lesion
MAX_ASPECT = 3.0  # long side / short side; dermoscopy is square to 4:3 (squashed to 1:1 for the branches)
MIN_CHROMA = 8.0  # 99th percentile of max(R,G,B) - min(R,G,B), grey levels: a grey image has ~0
MIN_LUMA_STD = 3.0  # grey levels: a blank or solid-colour image
MAX_UNIFORM_AREA = 0.25  # share of the sampled image in the largest exactly uniform, not dark region
MIN_SHARP_ON_FLAT = 0.0025  # share of sampled pixels on a sharp step beside an exactly uniform pixel
SHARP_STEP = 80  # grey levels between neighbouring pixels: a glyph's or a line's edge
MIN_BACKGROUND = 0.10  # share of the sampled image a uniform page-like region must cover to be a background
MAX_PAGE_SATURATION = 0.2  # HSV saturation (max - min) / max of a page-like colour: white, grey, cream
_DARK = 60  # grey level: below it, a uniform region may be the dermatoscope's black surround
_CHECK_SIDE = 256  # chroma and contrast are measured on a sample of at most this many pixels a side

#: The reasons ``image_checks`` can return, with what each means (for help texts and notes).
REASONS = {
    "too_small": f"short side under {MIN_SIDE} px",
    "extreme_aspect_ratio": f"long side over {MAX_ASPECT:g}x the short side",
    "not_colour": f"greyscale or nearly so (99th-percentile chroma under {MIN_CHROMA:g})",
    "nearly_uniform": f"almost no contrast (luminance standard deviation under {MIN_LUMA_STD:g})",
    "uniform_area": f"a large region of one exact colour (over {MAX_UNIFORM_AREA:.0%} of the image): a page, a "
                    f"screen or a border, not skin",
    "text_like": "sharp edges on a perfectly flat background: text, a chart, a diagram or a screenshot",
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
    hi = np.maximum(np.maximum(r, g), b)
    chroma = hi.astype(np.int16) - np.minimum(np.minimum(r, g), b)
    if np.percentile(chroma, 99) < MIN_CHROMA:
        reasons.append("not_colour")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if grey.std() < MIN_LUMA_STD:
        reasons.append("nearly_uniform")
    if min(grey.shape) >= 3:  # smaller samples have no neighbourhoods to compare (too_small has fired)
        reasons += _rendered(image, grey, hi, chroma)
    return tuple(reasons)


def _rendered(image: np.ndarray, grey: np.ndarray, hi: np.ndarray, chroma: np.ndarray) -> list[str]:
    """``uniform_area`` and ``text_like`` (see the module docstring) on the sampled image.

    ``hi`` and ``chroma`` are the per-pixel max(R, G, B) and max - min. Cheap bounds come first, so a
    photograph (almost no flat pixel) costs little more than the comparisons.
    """
    # A pixel is flat when it equals its right and its lower neighbour exactly, in all three channels;
    # adjacent flat pixels then share one colour, so a connected component of flat pixels is one
    # uniform region. Per channel, as above: a reduction over the axis of length 3 is slow.
    flat = np.ones((image.shape[0] - 1, image.shape[1] - 1), bool)
    for c in range(3):
        ch = image[..., c]
        flat &= (ch[:-1, 1:] == ch[:-1, :-1]) & (ch[1:, :-1] == ch[:-1, :-1])
    n_px = flat.size
    if flat.sum() < MIN_BACKGROUND * n_px:  # neither check can fire (both need that much uniform area)
        return []
    # Page-like colours: near-neutral (HSV saturation at most MAX_PAGE_SATURATION) or dark (a dark
    # theme). Skin and pigment are saturated, so a flat patch of them is never a page.
    g = grey[:-1, :-1]
    page = flat & (chroma[:-1, :-1] <= MAX_PAGE_SATURATION * hi[:-1, :-1])
    out = []
    light = page & (g > _DARK)
    if light.sum() >= MAX_UNIFORM_AREA * n_px:
        n, _, stats, _ = cv2.connectedComponentsWithStats(light.astype(np.uint8), connectivity=4)
        if stats[1:, cv2.CC_STAT_AREA].max() >= MAX_UNIFORM_AREA * n_px:
            out.append("uniform_area")
    # Text and graphics: sharp steps beside a page-like background that covers MIN_BACKGROUND of the
    # image (of any lightness: a dermatoscope's black surround is such a background, but skin beside
    # it is not rendered with glyph-sharp edges).
    candidate = (page | (flat & (g <= _DARK))).astype(np.uint8)
    gi = grey.astype(np.int16)
    sharp = np.maximum(np.abs(gi[:-1, 1:] - gi[:-1, :-1]), np.abs(gi[1:, :-1] - gi[:-1, :-1])) > SHARP_STEP
    kernel = np.ones((3, 3), np.uint8)
    if (sharp & cv2.dilate(candidate, kernel).astype(bool)).mean() < MIN_SHARP_ON_FLAT:
        return out  # an upper bound: the background is part of the candidate pixels
    n, labels, stats, _ = cv2.connectedComponentsWithStats(candidate, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= MIN_BACKGROUND * n_px
    keep[0] = False  # label 0 is everything that is not a candidate pixel
    if keep.any():
        background = keep[labels].astype(np.uint8)
        if (sharp & cv2.dilate(background, kernel).astype(bool)).mean() >= MIN_SHARP_ON_FLAT:
            out.append("text_like")
    return out
