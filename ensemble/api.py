"""The public prediction API over a cached bundle: ``predict``, ``predict_proba``, ``predict_details`` and ``explain``."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ensemble.runtime import ExportedEnsemble, is_export_dir

if TYPE_CHECKING:
    from ensemble.engine import Ensemble, PredictionDetails

# The Keras bundle (ensemble.bundle, ensemble.engine, models.gradcam) is imported when a run needs
# it, not here: predicting with an ONNX or TFLite export (ensemble.runtime) must not load TensorFlow.
_CACHE: dict[str, Ensemble | ExportedEnsemble] = {}
_LOCK = threading.Lock()
RUN_ENV = "SKINFUSION_RUN"


def load(run: str | os.PathLike | None = None) -> Ensemble | ExportedEnsemble:
    """Load (once) and return the ensemble of a run; later calls reuse the cached bundle.

    Args:
        run: run directory or ensemble directory, or an export directory written by
            ``skinfusion export`` (loaded with onnxruntime or LiteRT, without TensorFlow);
            defaults to ``$SKINFUSION_RUN``.

    Raises:
        ValueError: if no run is given and ``$SKINFUSION_RUN`` is unset.
        FileNotFoundError: if the bundle is missing (see ``load_ensemble`` for more).
    """
    if run is None:
        run = os.environ.get(RUN_ENV)
        if not run:
            raise ValueError(f"no run given: pass run=RUN_DIR or set ${RUN_ENV}")
    key = str(Path(run).resolve())
    with _LOCK:
        if key not in _CACHE:
            if is_export_dir(key):
                _CACHE[key] = ExportedEnsemble(key)
            else:
                from ensemble.bundle import load_ensemble

                _CACHE[key] = load_ensemble(key)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded bundle (for example after retraining a run in place)."""
    with _LOCK:
        _CACHE.clear()


def predict_proba(images: Sequence[Any], run: str | os.PathLike | None = None, batch_size: int = 64,
                  tta: bool = False, metadata: Sequence[dict | None] | None = None) -> np.ndarray:
    """Fused melanoma probabilities for a sequence of images, in input order.

    Args:
        images: paths, RGB uint8 H×W×3 arrays, or PIL images (mixed is fine).
        run: run directory; defaults to ``$SKINFUSION_RUN``.
        batch_size: images per forward pass.
        tta: average the fused probability over the 8 rotations and flips of each image
            (about 8× the compute of one pass).
        metadata: for a run fused with metadata (``skinfusion fuse --metadata``), one dict per
            image, e.g. ``{"age": 60, "sex": "female", "site": "back"}``; missing keys, ``None``
            or a ``None`` entry mean unknown. Ignored by runs fused from images only.

    Returns:
        float64 array of shape (len(images),) with values in [0, 1].

    Raises:
        colorspaces.ImageError: naming the image that cannot be read.
        ValueError: if the run fuses metadata and ``metadata`` is not given, or its length differs.
    """
    if isinstance(images, (str, os.PathLike, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        raise TypeError("predict_proba takes a sequence of images; use predict(image) for one image")
    return load(run).predict_proba(list(images), batch_size=batch_size, tta=tta,
                                   metadata=None if metadata is None else list(metadata))


def predict(image: Any, run: str | os.PathLike | None = None, tta: bool = False,
            metadata: dict | None = None) -> float:
    """Melanoma probability for one image.

    Args:
        image: a path, an RGB uint8 H×W×3 array, or a PIL image.
        run: run directory; defaults to ``$SKINFUSION_RUN``.
        tta: average over the 8 rotations and flips of the image.
        metadata: for a run fused with metadata, the image's ``{"age", "sex", "site"}`` (any
            of them may be missing or ``None``); ignored by runs fused from images only.

    Returns:
        The fused melanoma probability, a float in [0, 1].

    Raises:
        colorspaces.ImageError: if the image cannot be read (``MissingImageError`` for a missing path).
        ValueError: if the run fuses metadata and ``metadata`` is not given.
    """
    return float(load(run).predict_proba([image], tta=tta, metadata=None if metadata is None else [metadata])[0])


def predict_details(image: Any, run: str | os.PathLike | None = None, tta: bool = False,
                    metadata: dict | None = None) -> PredictionDetails:
    """Everything the ensemble says about one image, including whether it looks like its training data.

    Args:
        image, run, tta, metadata: as for ``predict``.

    Returns:
        A ``PredictionDetails``: ``melanoma_probability`` (what ``predict`` returns),
        ``branch_probabilities``, ``decision`` ("melanoma"/"nevus" at the validation threshold),
        ``in_distribution_score`` (the share of in-distribution validation images at least as
        atypical, 1 = most typical; None for a run fused without a gate), ``out_of_distribution``
        (True, False, or None when unknown), ``ood_reasons`` and ``ood_distance``. ``as_dict()``
        gives it as JSON-ready data.

    Raises:
        colorspaces.ImageError: if the image cannot be read.
        ValueError: if the run fuses metadata and ``metadata`` is not given.
    """
    return load(run).details([image], tta=tta, metadata=None if metadata is None else [metadata])[0]


def predict_details_batch(images: Sequence[Any], run: str | os.PathLike | None = None, batch_size: int = 64,
                          tta: bool = False, metadata: Sequence[dict | None] | None = None) -> list[PredictionDetails]:
    """``predict_details`` for a sequence of images, in input order (arguments as for ``predict_proba``).

    Raises:
        colorspaces.ImageError: naming the first image that cannot be read.
        ValueError: if the run fuses metadata and ``metadata`` is missing or its length differs.
    """
    if isinstance(images, (str, os.PathLike, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        raise TypeError("predict_details_batch takes a sequence of images; use predict_details(image) for one image")
    return load(run).details(list(images), batch_size=batch_size, tta=tta,
                             metadata=None if metadata is None else list(metadata))


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``explain`` returns: one image's prediction and a Grad-CAM heat map per branch.

    Attributes:
        details: the prediction, as ``predict_details`` gives it (``melanoma_probability`` is
            what ``predict`` returns; ``branch_probabilities`` what ``Ensemble.member_proba_batch`` gives).
        threshold: the bundle's decision threshold.
        image: the RGB uint8 image as the branches saw it (resized to the bundle's ``load_size``).
        heatmaps: view → float64 map in [0, 1] (1 = the strongest melanoma evidence; all 0 when
            nothing raised that branch's melanoma logit). A spatial view's map lies over ``image``;
            a frequency view's (fft) over its spectrum, ``views[view]`` (centre = low frequencies).
        views: view → the float32 view array the map lies over (H × W × C).
        frequency_views: the views whose axes are frequencies, not positions.
    """

    details: PredictionDetails
    threshold: float
    image: np.ndarray
    heatmaps: dict[str, np.ndarray]
    views: dict[str, np.ndarray]
    frequency_views: tuple[str, ...]

    @property
    def melanoma_probability(self) -> float:
        """The fused melanoma probability, as ``predict`` returns it."""
        return self.details.melanoma_probability

    @property
    def branch_probabilities(self) -> dict[str, float]:
        """Each branch's melanoma probability, by view."""
        return self.details.branch_probabilities


def _need_keras(ens, what: str) -> None:
    """Refuse an exported bundle where only the Keras models can answer (Grad-CAM needs gradients)."""
    if isinstance(ens, ExportedEnsemble):
        raise ValueError(f"{ens.path}: an exported ({ens.format}) bundle has no gradients, so it cannot {what}; "
                         f"use the run it was exported from ({ens.manifest['source']['run']})")


def explain_with(ens: Ensemble, image: Any, metadata: dict | None = None,
                 reasons: Sequence[str] | None = None) -> Explanation:
    """``explain`` with an already loaded ensemble (arguments as for ``explain``).

    ``reasons``: given, ``image`` is already an RGB uint8 array at ``ens.load_size`` and these are
    its image-level OOD reasons, checked on the original (as ``serve`` decodes and shrinks uploads).
    """
    _need_keras(ens, "explain")
    from colorspaces.views import VIEWS
    from models.gradcam import explain_branch

    if reasons is None:
        batch, reasons = ens.prepare_checked([image])
    else:
        batch, reasons = np.asarray(image, np.uint8)[None], [tuple(reasons)]
    # The same scoring call predict() makes (no TTA), so the numbers are predict's own.
    scores = ens.score_details(batch, meta=None if metadata is None else [metadata], reasons=reasons)
    heatmaps, views = {}, {}
    for model, config in zip(ens.models, ens.configs):
        heat, view = explain_branch(config, model, batch)
        heatmaps[config.view], views[config.view] = heat[0], view[0]
    return Explanation(scores.row(0, ens.views, ens.threshold), ens.threshold, batch[0], heatmaps, views,
                       tuple(v for v in ens.views if v in VIEWS and VIEWS[v].frequency))


def explain(image: Any, run: str | os.PathLike | None = None, metadata: dict | None = None) -> Explanation:
    """Grad-CAM of every branch for one image, with the probabilities ``predict`` gives.

    Each branch's map is taken at its last convolution, for the gradient of its melanoma logit,
    with BatchNorm in inference mode; with sliding-window crops the windows' maps are averaged
    back into the image (see ``models.gradcam``). No TTA: the map explains the image as given.

    Args:
        image: a path, an RGB uint8 H×W×3 array, or a PIL image.
        run: run directory; defaults to ``$SKINFUSION_RUN``.
        metadata: as for ``predict``.

    Returns:
        An ``Explanation`` (``heatmaps``, ``views``, ``melanoma_probability``, ``branch_probabilities``).

    Raises:
        colorspaces.ImageError: if the image cannot be read.
        ValueError: if the run fuses metadata and ``metadata`` is not given.
    """
    return explain_with(load(run), image, metadata)
