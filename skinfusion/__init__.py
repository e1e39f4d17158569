"""skinfusion: melanoma vs. benign nevus from RGB, HSV and FFT views of dermoscopic images.

The public facade. ``from skinfusion import predict`` gives the fused melanoma probability of
one image; ``predict_proba`` scores many; ``predict_details`` (and ``predict_details_batch``) add
the branch probabilities, the decision and the out-of-distribution verdict; ``explain`` adds a
Grad-CAM heat map per branch. All load a run's bundle once (see ``ensemble.api``).
Attributes are imported on first use, so ``import skinfusion`` stays cheap for data-only code.
"""

from __future__ import annotations

from colorspaces.lazy import lazy_attributes

_EXPORTS = {
    "predict": "ensemble.api",
    "predict_proba": "ensemble.api",
    "predict_details": "ensemble.api",
    "predict_details_batch": "ensemble.api",
    "explain": "ensemble.api",
    "Explanation": "ensemble.api",
    "PredictionDetails": "ensemble.engine",
    "load": "ensemble.api",
    "clear_cache": "ensemble.api",
    "Ensemble": "ensemble.engine",
    "BranchConfig": "models.branch",
    "VIEWS": "colorspaces.views",
    "ImageError": "colorspaces.image",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes("skinfusion", _EXPORTS)
