"""The branch CNN: its Keras graph and how to store it. Training lives in ``models.train``.

Inference imports this package; it does not import ``models.train``, so loading and scoring a
bundle never loads the training code.
"""

from models.branch import (
    BranchConfig,
    branch_inputs,
    build_branch,
    mean_over_windows,
    predict_branch_proba,
    predict_images_proba,
)
from models.store import load_branch, read_branch_info, save_branch

__all__ = [
    "BranchConfig",
    "branch_inputs",
    "build_branch",
    "load_branch",
    "mean_over_windows",
    "predict_branch_proba",
    "predict_images_proba",
    "read_branch_info",
    "save_branch",
]
