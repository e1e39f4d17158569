"""Fusion of branch probabilities, the ensemble bundle, the inference engine and the public ``predict`` API.

Names are imported on first use (PEP 562), so ``import ensemble.fusion`` (scikit-learn only)
does not pull in Keras or TensorFlow: a fusion object can be fitted or unpickled without them.
"""

from __future__ import annotations

from colorspaces.lazy import lazy_attributes

_EXPORTS = {
    "AverageFusion": "ensemble.fusion",
    "StackingFusion": "ensemble.fusion",
    "FUSION_METHODS": "ensemble.fusion",
    "FusionEstimator": "ensemble.fusion",
    "fusion_class": "ensemble.fusion",
    "make_fusion": "ensemble.fusion",
    "Ensemble": "ensemble.engine",
    "OODGate": "ensemble.ood",
    "load_ensemble": "ensemble.bundle",
    "save_ensemble": "ensemble.bundle",
    "clear_cache": "ensemble.api",
    "load": "ensemble.api",
    "predict": "ensemble.api",
    "predict_proba": "ensemble.api",
    "predict_details": "ensemble.api",
    "predict_details_batch": "ensemble.api",
    "explain": "ensemble.api",
    "Explanation": "ensemble.api",
    "PredictionDetails": "ensemble.details",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes("ensemble", _EXPORTS)
