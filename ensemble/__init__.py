"""Fusion of branch probabilities, the ensemble bundle, and the public ``predict`` API."""

from ensemble.api import clear_cache, load, predict, predict_proba
from ensemble.bundle import Ensemble, load_ensemble, save_ensemble
from ensemble.fusion import FUSION_METHODS, AverageFusion, StackingFusion, make_fusion

__all__ = [
    "AverageFusion",
    "Ensemble",
    "FUSION_METHODS",
    "StackingFusion",
    "clear_cache",
    "load",
    "load_ensemble",
    "make_fusion",
    "predict",
    "predict_proba",
    "save_ensemble",
]
