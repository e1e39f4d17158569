"""Fusion of branch probabilities, the ensemble bundle, the inference engine and the public ``predict`` API.

Names are imported on first use (PEP 562), so ``import ensemble.fusion`` (scikit-learn only)
does not pull in Keras or TensorFlow: a fusion object can be fitted or unpickled without them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AverageFusion": "ensemble.fusion",
    "StackingFusion": "ensemble.fusion",
    "FUSION_METHODS": "ensemble.fusion",
    "make_fusion": "ensemble.fusion",
    "Ensemble": "ensemble.engine",
    "load_ensemble": "ensemble.bundle",
    "save_ensemble": "ensemble.bundle",
    "clear_cache": "ensemble.api",
    "load": "ensemble.api",
    "predict": "ensemble.api",
    "predict_proba": "ensemble.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
