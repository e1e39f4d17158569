"""Fusion estimators over the member-probability matrix ``P`` (n_images × n_branches)."""

from __future__ import annotations

import copy

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.utils.validation import check_is_fitted

from ensemble.fusion_json import LogisticRule, WeightedMeanRule
from ensemble.metadata import MetadataEncoder, parse_fields
from ensemble.priors import shift_proba

_CLIP = 1e-6


def check_member_proba(P, n_members: int | None = None) -> np.ndarray:
    """Validate a member-probability matrix.

    Args:
        P: array-like (n_images, n_members) of probabilities.
        n_members: expected number of columns, if known.

    Returns:
        ``P`` as a float64 array.

    Raises:
        ValueError: if ``P`` is not 2-D, has the wrong width, or holds values outside [0, 1] or NaN.
    """
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] == 0:
        raise ValueError(f"P must be a non-empty 2-D array (n_images, n_members), got shape {P.shape}")
    if n_members is not None and P.shape[1] != n_members:
        raise ValueError(f"P has {P.shape[1]} member columns, expected {n_members}")
    if not np.all(np.isfinite(P)) or P.min() < 0.0 or P.max() > 1.0:
        raise ValueError("P must hold finite probabilities in [0, 1]")
    return P


def _logit(P: np.ndarray) -> np.ndarray:
    P = np.clip(P, _CLIP, 1.0 - _CLIP)
    return np.log(P) - np.log1p(-P)


class FusionEstimator(ClassifierMixin, BaseEstimator):
    """What a fusion method registered in ``FUSION_METHODS`` provides; the fuse workflow asks it, not its name.

    Class attributes (capabilities):
        supports_metadata: the constructor takes ``metadata`` (fields of
            ``ensemble.metadata.METADATA_FIELDS``), and ``fit``/``predict_proba`` then take
            ``meta``, one dict per image.
        supports_folds: it learns from labels, so it can be fitted on out-of-fold
            probabilities of the training split (``skinfusion fuse --folds K``).

    After ``fit(P, y, meta=None)`` (which returns self) an estimator has ``n_features_in_``,
    ``classes_``, ``metadata_`` (the fields it fuses; ``()`` for images only) and
    ``held_out_proba_``: fused melanoma probabilities of the fitting rows that no fitted
    parameter was chosen on, on which the decision threshold is chosen. ``predict_proba(P,
    meta=None)`` returns (n, 2) [nevus, melanoma] and ``describe(views)`` what the fit
    learnt, per feature, for logs and the manifest.

    ``logit_offset_`` (0 unless set by ``with_logit_offset``) is added to the fused log-odds in
    ``predict_proba``: the label-shift correction of ``skinfusion adapt``.

    ``to_spec(views)`` writes the fitted estimator as the JSON of a NumPy rule of
    ``ensemble.fusion_json.RULES`` (what ``skinfusion export`` ships), or None when none expresses it.
    """

    supports_metadata = False
    supports_folds = False
    # Class attributes, so fusions pickled before metadata or adaptation existed read as images
    # only and unshifted.
    metadata_: tuple[str, ...] = ()
    logit_offset_: float = 0.0

    def with_logit_offset(self, offset: float) -> FusionEstimator:
        """A copy whose fused probability is ``sigmoid(logit p + offset)``: a prior correction.

        The shift is monotone, so rankings and AUC are unchanged; only calibration and the
        meaning of a fixed threshold move. ``held_out_proba_`` (the source validation fit) is kept.
        """
        new = copy.deepcopy(self)
        new.logit_offset_ = float(offset)
        return new

    def _shifted(self, proba: np.ndarray) -> np.ndarray:
        """(n, 2) class probabilities with ``logit_offset_`` applied to the melanoma column."""
        offset = float(getattr(self, "logit_offset_", 0.0))
        if offset == 0.0:
            return proba  # bit-identical to fusions from before the offset existed
        p = shift_proba(proba[:, 1], offset)
        return np.column_stack([1.0 - p, p])

    @property
    def known_sites(self) -> list[str] | None:
        """The body sites a metadata fusion was fitted on (others count as unknown); None without site metadata."""
        return getattr(getattr(self, "encoder_", None), "sites_", None)

    def predict(self, P, threshold: float = 0.5, meta=None) -> np.ndarray:
        """Return 1 (melanoma) where the fused probability is at least ``threshold``."""
        return (self.predict_proba(P, meta)[:, 1] >= threshold).astype(int)

    def describe(self, views) -> dict[str, float]:
        """The fitted weight of each feature, named by ``views`` (the members, in order)."""
        raise NotImplementedError

    def to_spec(self, views) -> dict | None:
        """The fitted fusion as the JSON of an ``ensemble.fusion_json`` rule; None: it cannot be exported."""
        return None


class AverageFusion(FusionEstimator):
    """Fused probability = (weighted) mean of the member probabilities.

    It learns nothing from labels, so its fused probabilities on the fitting rows are
    already held out (``held_out_proba_``).

    Args:
        weights: optional non-negative weight per member; equal weights when None.
    """

    def __init__(self, weights=None):
        self.weights = weights

    def fit(self, P, y=None, meta=None):
        """Record the member count and normalised weights; ``y`` and ``meta`` are ignored. Returns self."""
        P = check_member_proba(P)
        self.n_features_in_ = P.shape[1]
        self.classes_ = np.array([0, 1])
        w = np.ones(P.shape[1]) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (P.shape[1],) or np.any(w < 0) or w.sum() == 0:
            raise ValueError(f"weights must be {P.shape[1]} non-negative numbers with a positive sum, got {self.weights!r}")
        self.weights_ = w / w.sum()
        self.held_out_proba_ = P @ self.weights_
        return self

    def predict_proba(self, P, meta=None) -> np.ndarray:
        """Return (n, 2) class probabilities [nevus, melanoma]; ``meta`` is ignored (images only)."""
        check_is_fitted(self, "weights_")
        p = check_member_proba(P, self.n_features_in_) @ self.weights_
        return self._shifted(np.column_stack([1.0 - p, p]))

    def describe(self, views) -> dict[str, float]:
        """The normalised weight of each member."""
        check_is_fitted(self, "weights_")
        return dict(zip(views, self.weights_.round(3).tolist()))

    def to_spec(self, views) -> dict:
        """The weights as a ``weighted_mean`` rule (``ensemble.fusion_json.WeightedMeanRule``)."""
        check_is_fitted(self, "weights_")
        return WeightedMeanRule.spec(self.weights_, views)


class StackingFusion(FusionEstimator):
    """Logistic regression on the members' log-odds, fitted on held-out member probabilities.

    Fit it only on probabilities the branches did not train on (their validation split):
    members are overconfident on their own training images, and a stacker fitted there
    learns to trust them too much.

    Args:
        C: inverse regularisation strength of the logistic regression.
        cv: folds for the out-of-fold fused probabilities (``oof_proba_``) used to pick a
            decision threshold without reusing the stacker's own fit.
        random_state: seed for the fold assignment.
        metadata: per-image metadata fields (of ``ensemble.metadata.METADATA_FIELDS``) added
            as features next to the members' log-odds; ``fit`` and ``predict_proba`` then
            need ``meta``, one dict per image.
    """

    supports_metadata = True
    supports_folds = True

    def __init__(self, C: float = 1.0, cv: int = 5, random_state: int = 0, metadata=()):
        self.C = C
        self.cv = cv
        self.random_state = random_state
        self.metadata = metadata

    def _features(self, P: np.ndarray, meta) -> np.ndarray:
        Z = _logit(P)
        if not self.metadata_:
            return Z
        if meta is None:
            raise ValueError(f"this stacker fuses metadata ({', '.join(self.metadata_)}): pass one metadata dict "
                             "per image (an empty dict or None values for unknown)")
        meta = list(meta)
        if len(meta) != len(P):
            raise ValueError(f"got {len(meta)} metadata entries for {len(P)} images")
        return np.hstack([Z, self.encoder_.transform(meta)])

    def fit(self, P, y, meta=None):
        """Fit the stacker on held-out member probabilities ``P``, labels ``y`` (and ``meta``). Returns self."""
        P = check_member_proba(P)
        y = np.asarray(y).astype(int)
        if y.shape != (P.shape[0],):
            raise ValueError(f"y has shape {y.shape}, expected ({P.shape[0]},)")
        counts = np.bincount(y, minlength=2)
        if len(counts) > 2 or counts.min() < 2:
            raise ValueError(f"stacking needs binary labels with at least 2 of each class, got counts {counts.tolist()}")
        self.n_features_in_ = P.shape[1]
        self.classes_ = np.array([0, 1])
        self.metadata_ = parse_fields(self.metadata)
        if self.metadata_:
            if meta is None:
                raise ValueError(f"metadata={self.metadata_!r} needs meta, one dict per image, to fit")
            self.encoder_ = MetadataEncoder(self.metadata_).fit(list(meta))
        Z = self._features(P, meta)
        make = lambda: LogisticRegression(C=self.C, max_iter=1000)  # noqa: E731
        self.final_estimator_ = make().fit(Z, y)
        folds = StratifiedKFold(n_splits=min(self.cv, int(counts.min())), shuffle=True, random_state=self.random_state)
        self.oof_proba_ = cross_val_predict(make(), Z, y, cv=folds, method="predict_proba")[:, 1]
        return self

    @property
    def held_out_proba_(self) -> np.ndarray:
        """The cross-validated fused probabilities of the fitting rows (``oof_proba_``)."""
        check_is_fitted(self, "oof_proba_")
        return self.oof_proba_

    def predict_proba(self, P, meta=None) -> np.ndarray:
        """Return (n, 2) class probabilities [nevus, melanoma]; ``meta`` is needed when fitted with metadata."""
        check_is_fitted(self, "final_estimator_")
        Z = self._features(check_member_proba(P, self.n_features_in_), meta)
        return self._shifted(self.final_estimator_.predict_proba(Z))

    def weights(self, views) -> dict[str, float]:
        """The fitted log-odds weight of each feature (the members named by ``views``, then metadata)."""
        check_is_fitted(self, "final_estimator_")
        names = list(views) + (self.encoder_.feature_names if self.metadata_ else [])
        return dict(zip(names, self.final_estimator_.coef_.ravel().round(3).tolist()))

    def describe(self, views) -> dict[str, float]:
        """The fitted log-odds weights (see ``weights``)."""
        return self.weights(views)

    def to_spec(self, views) -> dict:
        """The stacker as a ``logistic`` rule (``ensemble.fusion_json.LogisticRule``).

        Raises:
            ValueError: for a final estimator with more than one row of coefficients.
        """
        check_is_fitted(self, "final_estimator_")
        lr = self.final_estimator_
        if lr.coef_.shape[0] != 1:
            raise ValueError(f"cannot export a stacker with {lr.coef_.shape[0]} output rows; expected a binary one")
        return LogisticRule.spec(lr.coef_.ravel(), lr.intercept_[0], views, getattr(self, "encoder_", None))


class SelectionFusion(AverageFusion):
    """Greedy forward ensemble selection (Caruana et al. 2004): a weighted mean of the members that earn their place.

    ``fit`` picks members with replacement by validation AUC (``ensemble.selection``); a member
    never picked gets weight 0, one picked twice counts twice. The selection learns from labels,
    so the threshold's probabilities (``held_out_proba_``) are cross-fitted: each fold's images
    are fused with weights selected on the other folds.

    Args:
        rounds: additions after the first member.
        cv: folds for ``held_out_proba_``.
        random_state: seed of the fold assignment.
    """

    supports_folds = True

    def __init__(self, rounds: int = 20, cv: int = 5, random_state: int = 0):
        self.rounds = rounds
        self.cv = cv
        self.random_state = random_state

    def fit(self, P, y, meta=None):
        """Select member weights on ``P`` and labels ``y`` (``meta`` is ignored). Returns self."""
        from ensemble.selection import greedy_selection

        P = check_member_proba(P)
        y = np.asarray(y).astype(int)
        counts = np.bincount(y, minlength=2)
        if y.shape != (P.shape[0],) or len(counts) > 2 or counts.min() < 2:
            raise ValueError(f"selection needs binary labels with at least 2 of each class, got counts {counts.tolist()}")
        self.n_features_in_ = P.shape[1]
        self.classes_ = np.array([0, 1])
        self.weights_ = greedy_selection(P, y, self.rounds)
        held = np.empty(len(y))
        folds = StratifiedKFold(n_splits=min(self.cv, int(counts.min())), shuffle=True, random_state=self.random_state)
        for fit_rows, out_rows in folds.split(P, y):
            held[out_rows] = P[out_rows] @ greedy_selection(P[fit_rows], y[fit_rows], self.rounds)
        self.held_out_proba_ = held
        return self


# The one table of fusion methods: a new method is a FusionEstimator subclass added here.
FUSION_METHODS: dict[str, type[FusionEstimator]] = {"mean": AverageFusion, "stack": StackingFusion,
                                                    "select": SelectionFusion}


def fusion_class(method: str) -> type[FusionEstimator]:
    """The registered estimator class of a fusion method.

    Raises:
        KeyError: if ``method`` is not one of ``FUSION_METHODS``.
    """
    try:
        return FUSION_METHODS[method]
    except KeyError:
        raise KeyError(f"unknown fusion method {method!r}; choose one of {sorted(FUSION_METHODS)}") from None


def methods_that(capability: str) -> list[str]:
    """The registered methods whose estimator has ``capability`` (e.g. ``"supports_folds"``), sorted."""
    return sorted(m for m, cls in FUSION_METHODS.items() if getattr(cls, capability, False))


def make_fusion(method: str, metadata=()) -> FusionEstimator:
    """Create an unfitted fusion estimator by name, with ``metadata`` fields if its class supports them.

    Raises:
        KeyError: if ``method`` is not one of ``FUSION_METHODS``.
        ValueError: if metadata is asked of a method that cannot use it.
    """
    cls = fusion_class(method)
    fields = parse_fields(metadata)
    if not fields:
        return cls()
    if not cls.supports_metadata:
        raise ValueError(f"metadata fusion needs --method {' or '.join(methods_that('supports_metadata'))} "
                         f"(got --method {method})")
    return cls(metadata=fields)
