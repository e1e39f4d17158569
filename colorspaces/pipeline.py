"""The inference preprocessing, in NumPy only: from an image source to checked images at the load size
(``prepare_image``), then per branch colour constancy, test-time windows and the view (``view_inputs``).

Every scoring path calls these: the Keras engine, the exported ONNX/TFLite runtime (which must not
import TensorFlow), the server, Ray actors and ``models.branch.branch_inputs``, so a branch sees the
same arrays whichever runtime scores it. A bundle's recipe is one ``Preprocess`` value, read from
its manifest and branch configs or from an export's ``preprocess.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from colorspaces.constancy import apply_constancy
from colorspaces.crops import sliding_windows
from colorspaces.image import read_image, resize_image
from colorspaces.lesion import crop_to_lesion
from colorspaces.quality import image_checks
from colorspaces.views import VIEWS, apply_view


@dataclasses.dataclass(frozen=True)
class BranchRecipe:
    """What one branch does to a prepared image: colour constancy, windows, then its view."""

    view: str
    color_constancy: str = "none"
    crop_stride: int = 0

    @property
    def channels(self) -> int:
        """Input channels of the branch, from the view spec."""
        return VIEWS[self.view].channels


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A bundle's preprocessing recipe: the sides images are loaded and scored at, and each branch's steps.

    Attributes:
        image_size: the branches' input side.
        load_size: the side every image is resized to (> ``image_size``: test-time windows).
        branches: one ``BranchRecipe`` per branch, in member order.
        lesion_margin: with lesion-centred input (``BranchConfig.lesion_crop`` "box"), the margin every
            decoded image is cropped to its located lesion with (``colorspaces.lesion.crop_to_lesion``)
            before the resize; None: the whole image.
    """

    image_size: int
    load_size: int
    branches: tuple[BranchRecipe, ...] = ()
    lesion_margin: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocess":
        """The recipe from ``preprocess.json`` (or a manifest plus branch configs as dicts); unknown keys ignored."""
        names = {f.name for f in dataclasses.fields(BranchRecipe)}
        branches = tuple(BranchRecipe(**{k: v for k, v in b.items() if k in names}) for b in values.get("branches", ()))
        margin = values.get("lesion_margin")  # absent in exports written before lesion crops: none
        return cls(int(values["image_size"]), int(values.get("load_size", values["image_size"])), branches,
                   None if margin is None else float(margin))

    def empty_batch(self) -> np.ndarray:
        """An RGB uint8 batch of no images at ``load_size``."""
        return np.zeros((0, self.load_size, self.load_size, 3), np.uint8)

    def branch_inputs(self, batch: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """``view_inputs`` of every branch for a prepared batch, in member order.

        The same arrays as calling ``view_inputs`` branch by branch, but work that branches share is
        done once per batch: the colour constancy and windows of branches with the same settings, and
        the colour-constancy step of views built on another view (the default's rgb_sog and hsv_sog
        both start from one Shades-of-Gray image).
        """
        batch = np.asarray(batch)
        windows: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        corrected: dict[tuple[str, int, str], np.ndarray] = {}
        out = []
        for b in self.branches:
            key = (b.color_constancy, b.crop_stride)
            if key not in windows:
                windows[key] = _windows(batch, self.image_size, b.color_constancy, b.crop_stride)
            wins, k = windows[key]
            spec = VIEWS.get(b.view)
            if spec is None or spec.base is None:
                x = apply_view(b.view, wins)  # an unknown view raises apply_view's error
            else:
                step = key + (spec.constancy,)
                if step not in corrected:
                    corrected[step] = apply_constancy(spec.constancy, wins)
                x = apply_view(spec.base, corrected[step])
            out.append((np.asarray(x, dtype=np.float32), k))
        return out


def prepare_image(source: Any, recipe: Preprocess) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read one image, check it and resize it for the branches: the one image preparation of inference.

    The image-level checks (``colorspaces.quality.image_checks``) look at the decoded image at its
    own size and shape, before the resize squashes it to a square. A recipe with a ``lesion_margin``
    then crops the image to its located lesion, exactly as training's decoding did.

    Args:
        source: a path, a PIL image or an array (anything ``read_image`` takes).
        recipe: the bundle's ``Preprocess``.

    Returns:
        ``(image, checks)``: RGB uint8 (load_size, load_size, 3) and the failed checks' reasons.

    Raises:
        ImageError: if the image cannot be read (``MissingImageError`` for a missing path).
    """
    image = read_image(source)
    checks = image_checks(image)
    if recipe.lesion_margin is not None:
        image = crop_to_lesion(image, recipe.lesion_margin)
    return resize_image(image, recipe.load_size), checks


def prepare_images(sources: Sequence[Any], recipe: Preprocess) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """``prepare_image`` of each source, stacked: ``(batch (N, L, L, 3), checks per image)``.

    Raises:
        ImageError: naming the first image that cannot be read.
    """
    prepared = [prepare_image(s, recipe) for s in sources]
    if not prepared:
        return recipe.empty_batch(), []
    return np.stack([img for img, _ in prepared]), [checks for _, checks in prepared]


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
    batch, k = _windows(np.asarray(images), image_size, constancy, crop_stride)
    return np.asarray(apply_view(view, batch), dtype=np.float32), k


def _windows(images: np.ndarray, image_size: int, constancy: str, crop_stride: int) -> tuple[np.ndarray, int]:
    """Colour constancy on the whole images, then the test-time windows when they are larger than a branch input."""
    batch = apply_constancy(constancy, images)
    if batch.shape[1] > image_size:
        return sliding_windows(batch, image_size, crop_stride)
    return batch, 1


def mean_over_windows(proba: np.ndarray, k: int) -> np.ndarray:
    """Per-image mean of window-major scores: (k·N, ...) from ``view_inputs`` → (N, ...)."""
    return proba.reshape(k, len(proba) // k, *proba.shape[1:]).mean(axis=0)

