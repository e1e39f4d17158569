"""skinfusion: melanoma vs. benign nevus from RGB, HSV and FFT views of dermoscopic images.

The public facade. ``from skinfusion import predict`` gives the fused melanoma probability of
one image; ``predict_proba`` scores many. Both load a run's bundle once (see ``ensemble.api``).
Attributes are imported on first use, so ``import skinfusion`` stays cheap for data-only code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "predict": "ensemble.api",
    "predict_proba": "ensemble.api",
    "load": "ensemble.api",
    "clear_cache": "ensemble.api",
    "Ensemble": "ensemble.engine",
    "BranchConfig": "models.branch",
    "VIEWS": "colorspaces.views",
    "ImageError": "colorspaces.image",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'skinfusion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
