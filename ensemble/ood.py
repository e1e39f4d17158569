"""The out-of-distribution gate: is an image like the dermoscopic images the branches were trained on?

Two levels. Image-level checks (``colorspaces.quality``) name inputs that are no colour
photograph at a usable size, or that are rendered pages (text, charts, screenshots, a figure on a
white page). The feature-level gate measures, for each branch, the Mahalanobis
distance of the image's penultimate embedding (the pooled features the final Dense layer reads)
from the training images' embeddings, with a Ledoit–Wolf covariance, and combines the branches as

    score = sum_j (d_j - m_j) / s_j        (or max_j, see ``COMBINE_RULES``)

where m_j and s_j are the mean and standard deviation of branch j's distance over the training
images the gate was fitted on, each measured out of fold (``NORM_FOLDS``-fold cross-fitting): an
image's distance to a mean and covariance fitted on itself is biased low (by a lot when the images
are few for the embedding's width), and new images are never part of the fit. Standardising, rather
than summing squared distances, gives each branch one vote in units of its own spread: a squared
distance grows with the embedding's width and with how much the shrinkage changed the covariance,
so one branch would dominate.
The distance itself (not its square) is close to normal for typical images, so a mean and a
standard deviation describe it well.

The threshold is a percentile of the scores of the validation images (never seen by the fit), so
about that share of in-distribution images passes. ``in_distribution_score`` is the fraction of
validation images whose score is at least the image's: an empirical p-value in [0, 1], higher is
more typical; an image below the threshold has one above ``1 - percentile / 100``, roughly.

The gate's arrays are stored pickle-free in ``ood.npz`` and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import atomic_path

logger = logging.getLogger(__name__)

OOD_FILE = "ood.npz"
# Chosen leave-one-source-out (experiments/RESULTS.md, "A new clinic"): the highest percentile at
# which at least 97% of the generated non-dermoscopic images are still flagged in both held-out
# runs (100% and 97%); it flags 9.4% of a held-out clinic's validation dermoscopy (ISIC 2017)
# where the 95th percentile flagged 51%, and 0.5-0.7% of in-distribution test images.
DEFAULT_PERCENTILE = 99.5
EMBEDDING_LAYER = "gap"  # models.branch.build_branch: GlobalAveragePooling2D before dropout and the Dense output
FEATURE_REASON = "atypical_features"  # the gate's reason, next to colorspaces.quality.REASONS
MIN_IMAGES = 10  # fewer training or validation images than this give no usable covariance or percentile
NORM_FOLDS = 5  # cross-fitting folds for the distance normalisers
# How the standardised per-branch distances z_j = (d_j - m_j) / s_j become one score. "sum" gives
# each branch one vote in units of its own spread; "max" lets one branch that finds an image atypical
# decide alone. The default stays "sum": on Gaussian embeddings (dims 6/4/5, 99th percentile) with one
# branch of three shifted by one standard deviation the sum flagged 17% and the maximum 8%, and no
# trained run was at hand to show "max" better on real images (DOCNOTES-ood.md; compare both with `python -m experiments.ood_rules`). A manifest without a
# "combine" key was fitted with LEGACY_COMBINE; a gate whose rule is not the default says so once.
COMBINE_RULES = {
    "sum": "sum over branches of (Mahalanobis distance - training mean) / training std; Ledoit-Wolf covariance",
    "max": "maximum over branches of (Mahalanobis distance - training mean) / training std; Ledoit-Wolf covariance",
}
DEFAULT_COMBINE = "sum"
LEGACY_COMBINE = "sum"  # what a manifest without a "combine" key was fitted with
SCORE_RULE = COMBINE_RULES[DEFAULT_COMBINE]
P_VALUE_RULE = "fraction of validation images whose score is >= the image's (1 = most typical)"


def check_percentile(percentile: float) -> float:
    """The ``--ood-percentile`` as a float, or a ValueError saying what is accepted."""
    if not isinstance(percentile, (int, float)) or isinstance(percentile, bool) or not (
            math.isfinite(percentile) and 50.0 <= percentile <= 100.0):
        raise ValueError(f"--ood-percentile takes a percentile from 50 to 100 (e.g. 95 or 99: the share of "
                         f"in-distribution validation images that pass), got {percentile!r}")
    return float(percentile)


def embedding_layer(model) -> str:
    """Name of the layer whose output is a branch's embedding: ``gap``, else the one before the output layer."""
    names = [layer.name for layer in model.layers]
    return EMBEDDING_LAYER if EMBEDDING_LAYER in names else names[-2]


class OODGate:
    """A fitted feature-level gate over the branches' embeddings (see the module docstring).

    Args:
        means, precisions: per branch, the embedding mean (d,) and inverse covariance (d, d).
        dist_mean, dist_std: per branch, the mean and std of the (out-of-fold) training distances.
        val_scores: the validation images' scores (kept sorted, for ``in_distribution_score``).
        threshold: scores above it are out of distribution.
        percentile: the percentile of ``val_scores`` that ``threshold`` is.
        n_fit: how many training images the means and covariances were fitted on.
        layer: the layer whose output is the embedding (``embedding_layer``).
        combine: how the standardised branch distances become one score, a key of ``COMBINE_RULES``
            (``val_scores`` and ``threshold`` are in that rule's units).
    """

    def __init__(self, means: Sequence[np.ndarray], precisions: Sequence[np.ndarray], dist_mean: np.ndarray,
                 dist_std: np.ndarray, val_scores: np.ndarray, threshold: float, percentile: float,
                 n_fit: int = 0, layer: str = EMBEDDING_LAYER, combine: str = LEGACY_COMBINE):
        if combine not in COMBINE_RULES:
            raise ValueError(f"the OOD gate combines branches by one of {sorted(COMBINE_RULES)}, got {combine!r}")
        self.means = [np.asarray(m, np.float64) for m in means]
        self.precisions = [np.asarray(p, np.float64) for p in precisions]
        self.dist_mean = np.asarray(dist_mean, np.float64)
        self.dist_std = np.asarray(dist_std, np.float64)
        self.val_scores = np.sort(np.asarray(val_scores, np.float64))
        self.threshold = float(threshold)
        self.percentile = float(percentile)
        self.n_fit = int(n_fit)
        self.layer = layer
        self.combine = combine

    @property
    def dims(self) -> list[int]:
        """Embedding width of each branch."""
        return [len(m) for m in self.means]

    def distances(self, embeddings: Sequence[np.ndarray]) -> np.ndarray:
        """Per-branch Mahalanobis distances (n × branches) of per-branch embeddings (each n × d_j)."""
        cols = []
        for E, mu, prec in zip(embeddings, self.means, self.precisions):
            diff = np.asarray(E, np.float64) - mu
            cols.append(np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", diff, prec, diff), 0.0)))
        return np.stack(cols, axis=1) if cols else np.zeros((0, 0))

    def score(self, embeddings: Sequence[np.ndarray]) -> np.ndarray:
        """The combined score (n,): higher is less typical; above ``threshold`` is out of distribution."""
        z = (self.distances(embeddings) - self.dist_mean) / self.dist_std
        return z.max(axis=1) if self.combine == "max" else z.sum(axis=1)

    @property
    def note(self) -> str | None:
        """One line when the gate's rule is not the current default (refit with ``skinfusion fuse``), else None."""
        if self.combine == DEFAULT_COMBINE:
            return None
        return (f"this OOD gate combines its branches by {self.combine!r}, not by the current {DEFAULT_COMBINE!r}; "
                f"the image-level checks are current; re-run `skinfusion fuse` to refit it")

    def in_distribution_score(self, scores: np.ndarray) -> np.ndarray:
        """Empirical p-value of each score among the validation scores (1 = most typical)."""
        scores = np.asarray(scores, np.float64)
        above = len(self.val_scores) - np.searchsorted(self.val_scores, scores, side="left")
        return np.where(np.isnan(scores), np.nan, above / len(self.val_scores))

    def manifest_entry(self, sha256: str) -> dict[str, Any]:
        """What ``manifest.json`` records about the gate under its ``ood`` key."""
        return {"file": OOD_FILE, "sha256": sha256, "threshold": self.threshold, "percentile": self.percentile,
                "n_fit": self.n_fit, "n_val": len(self.val_scores), "layer": self.layer, "dims": self.dims,
                "combine": self.combine, "score": COMBINE_RULES[self.combine], "in_distribution_score": P_VALUE_RULE}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the arrays to ``path`` (an ``.npz``, no pickles), atomically."""
        arrays = {"dist_mean": self.dist_mean, "dist_std": self.dist_std, "val_scores": self.val_scores}
        for j, (mu, prec) in enumerate(zip(self.means, self.precisions)):
            arrays[f"mean_{j}"], arrays[f"precision_{j}"] = mu, prec
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: savez would append ".npz" to a path
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, entry: dict[str, Any], dims: Sequence[int], refuse: str) -> OODGate:
        """Read a gate written by ``save``, refusing pickles and checking every array against ``dims``.

        Args:
            path: the ``ood.npz``.
            entry: the manifest's ``ood`` record (threshold and percentile).
            dims: the embedding width of each branch of the loaded ensemble.
            refuse: what to do about a damaged file (the ``skinfusion fuse`` command).

        Raises:
            ValueError: naming the file, if it is not such an npz or does not fit the branches.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"cannot load {path}: {type(exc).__name__}: {exc}; {refuse}") from None
        b = len(dims)
        want = {"dist_mean": (b,), "dist_std": (b,), **{f"mean_{j}": (d,) for j, d in enumerate(dims)},
                **{f"precision_{j}": (d, d) for j, d in enumerate(dims)}}
        for key, shape in want.items():
            a = arrays.get(key)
            if a is None or a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all():
                got = "missing" if a is None else f"{a.dtype} {a.shape}"
                raise ValueError(f"{path}: damaged, {key!r} must be finite floats of shape {shape} for these "
                                 f"branches, got {got}; {refuse}")
        val = arrays.get("val_scores")
        if val is None or val.ndim != 1 or len(val) < 1 or val.dtype.kind != "f" or not np.isfinite(val).all():
            raise ValueError(f"{path}: damaged, 'val_scores' must be a non-empty vector of finite floats; {refuse}")
        if not (arrays["dist_std"] > 0).all():
            raise ValueError(f"{path}: damaged, 'dist_std' must be positive; {refuse}")
        combine = entry.get("combine", LEGACY_COMBINE)
        if combine not in COMBINE_RULES:
            raise ValueError(f"{path}: its manifest entry says the branches are combined by {combine!r}, which this "
                             f"skinfusion does not know ({sorted(COMBINE_RULES)}); {refuse}")
        gate = cls([arrays[f"mean_{j}"] for j in range(b)], [arrays[f"precision_{j}"] for j in range(b)],
                   arrays["dist_mean"], arrays["dist_std"], val, entry["threshold"], entry["percentile"],
                   entry.get("n_fit", 0), entry.get("layer", EMBEDDING_LAYER), combine)
        if gate.note:
            logger.warning("%s: %s", path, gate.note)
        return gate


def fit_gate(train_embeddings: Sequence[np.ndarray], val_embeddings: Sequence[np.ndarray],
             percentile: float = DEFAULT_PERCENTILE, layer: str = EMBEDDING_LAYER,
             combine: str = DEFAULT_COMBINE) -> OODGate:
    """Fit the gate on training embeddings and set its threshold on validation embeddings.

    Args:
        train_embeddings: per branch, the embeddings (n_fit × d_j) of training images.
        val_embeddings: per branch, the embeddings (n_val × d_j) of validation images.
        percentile: the percentile of validation scores that becomes the threshold.
        layer: the name of the embedding layer, for the record.
        combine: how branches are combined, a key of ``COMBINE_RULES``.

    Raises:
        ValueError: if the percentile is out of range or there are fewer than ``MIN_IMAGES`` images.
    """
    from sklearn.covariance import LedoitWolf

    percentile = check_percentile(percentile)
    n_fit, n_val = len(train_embeddings[0]), len(val_embeddings[0])
    if min(n_fit, n_val) < MIN_IMAGES:
        raise ValueError(f"the OOD gate needs at least {MIN_IMAGES} training and validation images, "
                         f"got {n_fit} and {n_val}")
    train = [np.asarray(E, np.float64) for E in train_embeddings]

    def fitted(rows: np.ndarray) -> OODGate:
        fits = [LedoitWolf().fit(E[rows]) for E in train]
        b = len(fits)
        return OODGate([f.location_ for f in fits], [f.precision_ for f in fits], np.zeros(b), np.ones(b),
                       np.zeros(1), 0.0, percentile, len(rows), layer, combine)

    gate = fitted(np.arange(n_fit))
    # Out-of-fold distances: what a new in-distribution image's distance looks like (seeded folds).
    order = np.random.default_rng(0).permutation(n_fit)
    oof = np.empty((n_fit, len(train)))
    for held in np.array_split(order, NORM_FOLDS):
        oof[held] = fitted(np.setdiff1d(order, held)).distances([E[held] for E in train])
    gate.dist_mean = oof.mean(axis=0)
    # A branch whose distances do not vary (a degenerate embedding) must not divide by zero.
    gate.dist_std = np.maximum(oof.std(axis=0), 1e-6)
    scores = gate.score(val_embeddings)
    gate.val_scores = np.sort(scores)
    gate.threshold = float(np.percentile(scores, percentile))
    return gate


@dataclasses.dataclass(frozen=True)
class OODScores:
    """The gate's verdict on a batch of images.

    Attributes:
        distance: the combined feature score (higher = less typical); NaN without a gate.
        in_distribution_score: the empirical p-value in [0, 1] (higher = more typical); 0 for an
            image that fails an image-level check; NaN without a gate.
        out_of_distribution: 1.0 (flagged), 0.0 (passed), NaN (unknown: no gate, no failed check).
        reasons: per image, the failed image-level checks and ``atypical_features`` when the
            feature score is above the threshold; empty when it passed.
    """

    distance: np.ndarray
    in_distribution_score: np.ndarray
    out_of_distribution: np.ndarray
    reasons: list[tuple[str, ...]]


def judge(gate: OODGate | None, embeddings: Sequence[np.ndarray] | None,
          image_reasons: Sequence[tuple[str, ...]]) -> OODScores:
    """Combine the image-level reasons of a batch with the gate's feature scores (if any)."""
    n, gated = len(image_reasons), gate is not None and embeddings is not None
    if not gated:
        distance = p = np.full(n, np.nan)
        atypical = np.zeros(n, bool)
    else:
        distance = gate.score(embeddings)
        p = gate.in_distribution_score(distance)
        atypical = distance > gate.threshold
    failed = np.array([bool(r) for r in image_reasons], bool)
    flagged = np.where(failed | atypical, 1.0, 0.0 if gated else np.nan)
    reasons = [tuple(r) + ((FEATURE_REASON,) if a else ()) for r, a in zip(image_reasons, atypical)]
    return OODScores(distance, np.where(failed & gated, 0.0, p), flagged, reasons)
