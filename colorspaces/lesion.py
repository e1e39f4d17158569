"""A fast lesion localiser for lesion-centred input: NumPy and OpenCV only, no model.

Recipe, on a small squashed-to-square thumbnail of the image (the geometry every image has
once ``resize_image`` squashes it): a colour-distance-from-skin map (the Euclidean distance in
CIE L*a*b* to the median colour of a ring of skin just inside the image border), blurred,
thresholded by Otsu; the dark vignette corners of dermoscopes (outside the inscribed circle,
and very dark) are ignored; connected components touching the border are dropped unless
nothing else is left; the largest remaining component's bounding box, grown by ``margin``
times its side on every side and made square, is the crop. When no plausible lesion is found
(no component, or one too small or covering nearly all of the image) the central
``FALLBACK_FRACTION`` of the image is used instead, and the reason is returned.

The box is square in the squashed frame, so the crop keeps the original image's aspect
ratio; squashing it to the branch's input then gives the same geometry as squashing the
whole image, only magnified on the lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LESION_CROPS = ("none", "box")
# Names the recipe below; decoded-image caches of lesion crops are keyed by it: change it with the recipe.
LESION_RECIPE = "lesion-box/lab-skin-distance-otsu/v1"
FALLBACK_FRACTION = 0.8  # the central share of each side kept when no lesion is found
_THUMB = 128  # side of the thumbnail the localiser works on
_MIN_AREA, _MAX_AREA = 0.003, 0.9  # plausible lesion area, as a share of the image


@dataclass(frozen=True)
class LesionBox:
    """Where the lesion crop is, as fractions of the image's height and width (a square once squashed).

    Attributes:
        top, left: the crop's top-left corner, fractions in [0, 1).
        side: the crop's side, a fraction of the height and of the width, in (0, 1].
        reason: "" when a lesion was found, else why the central fallback was used.
    """

    top: float
    left: float
    side: float
    reason: str = ""

    @property
    def found(self) -> bool:
        """Whether a lesion was found (False: the central fallback)."""
        return not self.reason

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)`` of the crop in an image of ``height`` x ``width``, at least 1 pixel each way."""
        r0, c0 = int(round(self.top * height)), int(round(self.left * width))
        r1 = max(r0 + 1, min(height, int(round((self.top + self.side) * height))))
        c1 = max(c0 + 1, min(width, int(round((self.left + self.side) * width))))
        return r0, r1, c0, c1


def _fallback(reason: str) -> LesionBox:
    start = (1.0 - FALLBACK_FRACTION) / 2
    return LesionBox(start, start, FALLBACK_FRACTION, reason)


def _check(image: np.ndarray, margin: float) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"the lesion localiser takes one RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"lesion crop margin must be in [0, 1], got {margin}")
    return image


def locate_lesion(image: np.ndarray, margin: float = 0.15) -> LesionBox:
    """The lesion crop of one RGB uint8 image (H, W, 3): its box, or the central fallback with the reason.

    Deterministic; about a millisecond per image. ``margin``: context added on each side, as a
    fraction of the lesion box's side (0.15: the box grows by 30%).
    """
    image = _check(image, margin)
    n = _THUMB
    thumb = cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(cv2.GaussianBlur(thumb, (0, 0), 2.0), cv2.COLOR_RGB2LAB).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    radius = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2)
    # Dermoscope vignettes: very dark pixels in the corners are the lens, not skin or lesion.
    inside = ~((radius > 0.95) & (lab[..., 0] < 60))
    ring = (radius > 0.75) & (radius < 0.95) & inside
    if ring.sum() < 20:
        return _fallback("no skin visible near the border to compare the lesion with")
    skin = np.median(lab[ring], axis=0)
    distance = np.sqrt(((lab - skin) ** 2).sum(axis=-1))
    distance[~inside] = 0.0
    scaled = np.clip(distance * (255.0 / max(float(distance.max()), 1e-6)), 0, 255).astype(np.uint8)
    threshold, mask = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if distance.max() < 8.0:  # a near-uniform image: Otsu would split noise
        return _fallback("no region differs from the skin colour")
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return _fallback("no region differs from the skin colour")
    comps = range(1, count)
    x, y, w, h, area = (stats[:, k] for k in range(5))
    touching = {c for c in comps if x[c] == 0 or y[c] == 0 or x[c] + w[c] == n or y[c] + h[c] == n}
    # A lesion larger than the field of view touches the border: keep border regions only
    # when nothing else is plausible.
    inner = [c for c in comps if c not in touching and area[c] >= _MIN_AREA * n * n]
    candidates = inner or [c for c in comps if area[c] >= _MIN_AREA * n * n]
    if not candidates:
        return _fallback("every region is too small to be the lesion")
    best = max(candidates, key=lambda c: area[c])
    if area[best] > _MAX_AREA * n * n:
        return _fallback("the region covers nearly the whole image")
    side = max(w[best], h[best]) * (1 + 2 * margin)
    side = min(float(n), max(side, 0.2 * n))  # at least a fifth of the image: keep some context
    cy, cx = y[best] + h[best] / 2, x[best] + w[best] / 2
    top = float(np.clip(cy - side / 2, 0, n - side))
    left = float(np.clip(cx - side / 2, 0, n - side))
    return LesionBox(top / n, left / n, side / n)


def crop_to_lesion(image_rgb_uint8: np.ndarray, margin: float = 0.15) -> np.ndarray:
    """The lesion-centred crop of one decoded image, to be resized (squashed) to the branch input after.

    Contract, for every inference path (the one preprocessing: decode -> crop_to_lesion -> resize
    -> checks) and for training alike:

    * input: the decoded RGB uint8 image (H, W, 3) at its own resolution, before any resize;
    * output: RGB uint8 (h, w, 3), a copy of a window of it with h/H == w/W up to rounding (a square
      once squashed), covering the lesion's bounding box plus ``margin`` x its side on each side; when
      no lesion is found, the central ``FALLBACK_FRACTION`` of each side (``locate_lesion`` says why);
    * deterministic, never raises for a valid image; ``margin`` is ``BranchConfig.lesion_margin``.

    Raises:
        ValueError: if the array is not one RGB uint8 image or the margin is not in [0, 1].
    """
    image = _check(image_rgb_uint8, margin)
    r0, r1, c0, c1 = locate_lesion(image, margin).pixels(*image.shape[:2])
    return np.ascontiguousarray(image[r0:r1, c0:c1])
