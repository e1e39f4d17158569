"""The fusion as plain JSON, applied in NumPy: one rule class per exportable fusion, and ``JsonFusion``.

Each fusion estimator writes its own spec (``FusionEstimator.to_spec`` in ``ensemble.fusion``) with the
``kind`` of the rule here that applies it; ``RULES`` maps a kind to its rule. An export
(``ensemble.export``) carries its fusion this way instead of ``fusion.joblib``, so loading it unpickles
nothing; the rules are NumPy only (``ensemble.metadata`` encodes the metadata), so the runtime needs
neither scikit-learn nor TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ensemble.metadata import MetadataEncoder

WEIGHT_SUM_TOLERANCE = 1e-6  # AverageFusion and SelectionFusion normalise their weights to sum to 1
CLIP = 1e-6  # ensemble.fusion clips member probabilities away from 0 and 1 before the logit


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool): what every number in the JSON files must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class WeightedMeanRule:
    """``{"kind": "weighted_mean", "weights": [...]}``: p = P @ w (written by ``AverageFusion``, ``SelectionFusion``)."""

    kind = "weighted_mean"
    encoder: MetadataEncoder | None = None

    def __init__(self, spec: dict[str, Any], n_members: int, bad: Callable[[str], ValueError]):
        w = spec.get("weights")
        if not (isinstance(w, list) and len(w) == n_members and all(finite_number(v) and v >= 0 for v in w)):
            raise bad(f"'weights' must be {n_members} non-negative numbers, got {w!r}")
        if abs(sum(w) - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise bad(f"'weights' must sum to 1 (a weighted mean), they sum to {sum(w):.6g}")
        self.weights = np.asarray(w, np.float64)

    @staticmethod
    def spec(weights: Sequence[float], views: Sequence[str]) -> dict[str, Any]:
        """The JSON parameters of a weighted mean."""
        return {"kind": WeightedMeanRule.kind, "weights": [float(w) for w in weights], "members": list(views),
                "rule": "p = P @ weights"}

    def __call__(self, P: np.ndarray, meta: Sequence[dict | None] | None) -> np.ndarray:
        return P @ self.weights


class LogisticRule:
    """``{"kind": "logistic", "coef": [...], "intercept": b, "clip": 1e-6, "metadata": {"fields": [...], "sites":
    [...]}}``: p = sigmoid(logit(clip(P)) @ coef[:m] + encode(meta) @ coef[m:] + b) (written by ``StackingFusion``)."""

    kind = "logistic"

    def __init__(self, spec: dict[str, Any], n_members: int, bad: Callable[[str], ValueError]):
        meta = spec.get("metadata") or {}
        fields = meta.get("fields", []) if isinstance(meta, dict) else None
        sites = meta.get("sites") if isinstance(meta, dict) else None
        if not isinstance(fields, list):
            raise bad(f"'metadata' must hold 'fields' (and 'sites'), got {meta!r}")
        self.encoder = None
        if fields:
            if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
                raise bad(f"'metadata' must list the known 'sites', got {sites!r}")
            try:
                self.encoder = MetadataEncoder(fields)
            except ValueError as exc:
                raise bad(f"'metadata.fields': {exc}") from None
            self.encoder.sites_ = list(sites)
        width = n_members + (len(self.encoder.feature_names) if self.encoder else 0)
        coef, b, clip = spec.get("coef"), spec.get("intercept"), spec.get("clip", CLIP)
        if not (isinstance(coef, list) and len(coef) == width and all(finite_number(v) for v in coef)):
            raise bad(f"'coef' must be {width} numbers, got {coef!r}")
        if not finite_number(b) or not finite_number(clip):
            raise bad("'intercept' and 'clip' must be numbers")
        self.coef, self.intercept, self.clip = np.asarray(coef, np.float64), float(b), float(clip)

    @staticmethod
    def spec(coef: Sequence[float], intercept: float, views: Sequence[str],
             encoder: MetadataEncoder | None) -> dict[str, Any]:
        """The JSON parameters of a logistic stacker on the members' log-odds (and ``encoder``'s metadata)."""
        meta = {"fields": list(encoder.fields) if encoder is not None else [],
                "sites": list(encoder.sites_) if encoder is not None else [],
                "features": encoder.feature_names if encoder is not None else [],
                "encoding": "age: (age - 50) / 20 and an age_unknown flag; sex: male, female flags; site: one flag "
                            "per listed site and site_unknown (ensemble.metadata.MetadataEncoder)"}
        return {"kind": LogisticRule.kind, "coef": [float(c) for c in coef], "intercept": float(intercept),
                "clip": CLIP, "members": list(views), "metadata": meta,
                "rule": "p = sigmoid(logit(clip(P, clip, 1 - clip)) @ coef[:members] + metadata @ coef[members:] "
                        "+ intercept)"}

    def __call__(self, P: np.ndarray, meta: Sequence[dict | None] | None) -> np.ndarray:
        Pc = np.clip(P, self.clip, 1.0 - self.clip)
        z = np.log(Pc) - np.log1p(-Pc)
        if self.encoder is not None:
            if meta is None:
                raise ValueError(f"this ensemble fuses metadata ({', '.join(self.encoder.fields)}): pass one metadata "
                                 "dict per image (an empty dict or None values for unknown)")
            if len(meta) != len(P):
                raise ValueError(f"got {len(meta)} metadata entries for {len(P)} images")
            z = np.hstack([z, self.encoder.transform(list(meta))])
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))


# The exportable fusion rules by the ``kind`` their specs carry.
RULES: dict[str, type] = {rule.kind: rule for rule in (WeightedMeanRule, LogisticRule)}


def fusion_spec(fusion, views: Sequence[str]) -> dict[str, Any]:
    """The fitted fusion as plain JSON parameters (``JsonFusion`` applies them): the estimator's own ``to_spec``.

    Raises:
        ValueError: for a fusion whose computation JSON cannot express.
    """
    spec = fusion.to_spec(views) if hasattr(fusion, "to_spec") else None
    if spec is None:
        raise ValueError(f"cannot export a {type(fusion).__name__} fusion: only fusions with a JSON rule "
                         f"({', '.join(RULES)}) can be written as JSON; re-fuse the run with one of them")
    return {**spec, "logit_offset": float(getattr(fusion, "logit_offset_", 0.0))}


class JsonFusion:
    """The fusion of an export, from ``fusion.json``: its ``RULES`` entry, then ``logit_offset`` added to the
    log-odds (the label-shift correction of ``skinfusion adapt``)."""

    def __init__(self, spec: dict[str, Any], n_members: int, where: str):
        def bad(what: str) -> ValueError:
            return ValueError(f"{where}: damaged, {what}; re-export the run (skinfusion export)")

        self.kind = spec.get("kind")
        self.offset = spec.get("logit_offset", 0.0)
        if not finite_number(self.offset):
            raise bad(f"'logit_offset' must be a number, got {self.offset!r}")
        if self.kind not in RULES:
            raise bad(f"unknown fusion kind {self.kind!r} (known: {', '.join(RULES)})")
        self.rule = RULES[self.kind](spec, n_members, bad)
        self.encoder = self.rule.encoder
        self.fields: tuple[str, ...] = self.encoder.fields if self.encoder is not None else ()

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
        p = self.rule(np.asarray(P, np.float64), meta)
        if self.offset:
            odds = math.exp(self.offset)  # ensemble.priors.shift_proba, written out
            p = p * odds / (p * odds + (1.0 - p))
        return p
