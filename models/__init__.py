"""The branch CNN: its Keras graph, how to train it, and how to store it."""

from models.branch import BranchConfig, build_branch, predict_branch_proba, predict_images_proba
from models.store import library_versions, load_branch, save_branch
from models.train import fit_branch, training_batches, view_batches

__all__ = [
    "BranchConfig",
    "build_branch",
    "fit_branch",
    "library_versions",
    "load_branch",
    "predict_branch_proba",
    "predict_images_proba",
    "save_branch",
    "training_batches",
    "view_batches",
]
