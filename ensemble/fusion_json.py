"""The fusion as plain JSON: ``fusion_spec`` writes a fitted estimator's parameters, ``JsonFusion`` applies them.

An export (``ensemble.export``) carries its fusion this way instead of ``fusion.joblib``, so loading
it unpickles nothing; ``JsonFusion`` is NumPy only (``ensemble.metadata`` encodes the metadata), so
the runtime needs neither scikit-learn nor TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

WEIGHT_SUM_TOLERANCE = 1e-6  # AverageFusion and SelectionFusion normalise their weights to sum to 1
CLIP = 1e-6  # ensemble.fusion clips member probabilities away from 0 and 1 before the logit


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool): what every number in the JSON files must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fusion_spec(fusion, views: Sequence[str]) -> dict[str, Any]:
    """The fitted fusion as plain JSON parameters (``JsonFusion`` applies them).

    Raises:
        ValueError: for a fusion whose computation JSON cannot express (another estimator class).
    """
    from ensemble.fusion import AverageFusion, StackingFusion  # scikit-learn: the writer's, not the runtime's

    offset = float(getattr(fusion, "logit_offset_", 0.0))
    if isinstance(fusion, AverageFusion):  # mean, and select (a weighted mean of the picked members)
        return {"kind": "weighted_mean", "weights": [float(w) for w in fusion.weights_], "logit_offset": offset,
                "members": list(views), "rule": "p = P @ weights"}
    if isinstance(fusion, StackingFusion):
        lr = fusion.final_estimator_
        if lr.coef_.shape[0] != 1:
            raise ValueError(f"cannot export a stacker with {lr.coef_.shape[0]} output rows; expected a binary one")
        enc = getattr(fusion, "encoder_", None)
        meta = {"fields": list(fusion.metadata_), "sites": list(enc.sites_) if enc is not None else [],
                "features": enc.feature_names if enc is not None else [],
                "encoding": "age: (age - 50) / 20 and an age_unknown flag; sex: male, female flags; site: one flag "
                            "per listed site and site_unknown (ensemble.metadata.MetadataEncoder)"}
        return {"kind": "logistic", "coef": [float(c) for c in lr.coef_.ravel()], "intercept": float(lr.intercept_[0]),
                "clip": CLIP, "logit_offset": offset, "members": list(views), "metadata": meta,
                "rule": "p = sigmoid(logit(clip(P, clip, 1 - clip)) @ coef[:members] + metadata @ coef[members:] "
                        "+ intercept)"}
    raise ValueError(f"cannot export a {type(fusion).__name__} fusion: only mean/select (weighted mean) and stack "
                     "(logistic regression) can be written as JSON; re-fuse the run with one of them")


class JsonFusion:
    """The fusion of an export, from ``fusion.json``: a weighted mean or a logistic stacker, in NumPy.

    ``{"kind": "weighted_mean", "weights": [...]}``: p = P @ w. ``{"kind": "logistic", "coef": [...],
    "intercept": b, "clip": 1e-6, "metadata": {"fields": [...], "sites": [...]}}``: p =
    sigmoid(logit(clip(P)) @ coef[:m] + encode(meta) @ coef[m:] + b). Both then add
    ``logit_offset`` to the log-odds (the label-shift correction of ``skinfusion adapt``).
    """

    def __init__(self, spec: dict[str, Any], n_members: int, where: str):
        def bad(what: str) -> ValueError:
            return ValueError(f"{where}: damaged, {what}; re-export the run (skinfusion export)")

        self.kind = spec.get("kind")
        self.offset = spec.get("logit_offset", 0.0)
        if not finite_number(self.offset):
            raise bad(f"'logit_offset' must be a number, got {self.offset!r}")
        self.fields: tuple[str, ...] = ()
        self.encoder = None
        if self.kind == "weighted_mean":
            w = spec.get("weights")
            if not (isinstance(w, list) and len(w) == n_members and all(finite_number(v) and v >= 0 for v in w)):
                raise bad(f"'weights' must be {n_members} non-negative numbers, got {w!r}")
            if abs(sum(w) - 1.0) > WEIGHT_SUM_TOLERANCE:
                raise bad(f"'weights' must sum to 1 (a weighted mean), they sum to {sum(w):.6g}")
            self.weights = np.asarray(w, np.float64)
        elif self.kind == "logistic":
            from ensemble.metadata import MetadataEncoder  # numpy only

            meta = spec.get("metadata") or {}
            fields = meta.get("fields", []) if isinstance(meta, dict) else None
            sites = meta.get("sites") if isinstance(meta, dict) else None
            if not isinstance(fields, list):
                raise bad(f"'metadata' must hold 'fields' (and 'sites'), got {meta!r}")
            if fields:
                if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
                    raise bad(f"'metadata' must list the known 'sites', got {sites!r}")
                try:
                    self.encoder = MetadataEncoder(fields)
                except ValueError as exc:
                    raise bad(f"'metadata.fields': {exc}") from None
                self.encoder.sites_ = list(sites)
                self.fields = self.encoder.fields
            width = n_members + (len(self.encoder.feature_names) if self.encoder else 0)
            coef, b, clip = spec.get("coef"), spec.get("intercept"), spec.get("clip", CLIP)
            if not (isinstance(coef, list) and len(coef) == width and all(finite_number(v) for v in coef)):
                raise bad(f"'coef' must be {width} numbers, got {coef!r}")
            if not finite_number(b) or not finite_number(clip):
                raise bad("'intercept' and 'clip' must be numbers")
            self.coef, self.intercept, self.clip = np.asarray(coef, np.float64), float(b), float(clip)
        else:
            raise bad(f"unknown fusion kind {self.kind!r} (known: weighted_mean, logistic)")

    @property
    def sites(self) -> list[str] | None:
        """The body sites the stacker knows, or None without site metadata."""
        return getattr(self.encoder, "sites_", None) if self.encoder and "site" in self.fields else None

    known_sites = sites

    def predict_proba(self, P: np.ndarray, meta: Sequence[dict | None] | None = None) -> np.ndarray:
        """(n, 2) class probabilities [nevus, melanoma], as a fusion estimator's ``predict_proba``."""
        p = self(P, meta)
        return np.column_stack([1.0 - p, p])

    def __call__(self, P: np.ndarray, meta: Sequence[dict | None] | None = None) -> np.ndarray:
        """Fused melanoma probabilities (n,) of a member matrix (n × branches)."""
        P = np.asarray(P, np.float64)
        if self.kind == "weighted_mean":
            p = P @ self.weights
        else:
            Pc = np.clip(P, self.clip, 1.0 - self.clip)
            z = np.log(Pc) - np.log1p(-Pc)
            if self.encoder is not None:
                if meta is None:
                    raise ValueError(f"this ensemble fuses metadata ({', '.join(self.fields)}): pass one metadata "
                                     "dict per image (an empty dict or None values for unknown)")
                if len(meta) != len(P):
                    raise ValueError(f"got {len(meta)} metadata entries for {len(P)} images")
                z = np.hstack([z, self.encoder.transform(list(meta))])
            p = 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))
        if self.offset:
            odds = math.exp(self.offset)  # ensemble.priors.shift_proba, written out
            p = p * odds / (p * odds + (1.0 - p))
        return p
