"""The branch CNN: its config, Keras graph and how to store it. Training lives in ``models.train``.

Inference imports this package; it does not import ``models.train``, so loading and scoring a
bundle never loads the training code. Names are imported on first use, so ``models.config`` (the
``BranchConfig``) can be read without loading Keras.
"""

from colorspaces.lazy import lazy_attributes

_EXPORTS = {
    "BranchConfig": "models.config",
    "branch_inputs": "models.branch",
    "build_branch": "models.branch",
    "mean_over_windows": "models.branch",
    "predict_branch_proba": "models.branch",
    "predict_images_proba": "models.branch",
    "load_branch": "models.store",
    "read_branch_info": "models.store",
    "save_branch": "models.store",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes("models", _EXPORTS)
