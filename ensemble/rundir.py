"""A run directory's layout, in one place: where ``skinfusion train``, ``fuse``, ``adapt`` and ``export``
write and look for each file. No TensorFlow, no file contents: names and paths only.

    RUN/
      splits.csv, split.json      the grouped split (splits.csv lands last: it marks a run as split)
      held_out_ids.txt            images kept out of training and validation (optional)
      branches/VIEW/              one trained branch (model.keras, config.json, metadata.json,
                                  val_predictions.csv)
      ensemble/manifest.json      the fused bundle (and its fusion.joblib, ood.npz)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from colorspaces.files import sha256_file
from colorspaces.views import DEFAULT_VIEWS, DESIGN_VIEWS

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # a bundle's manifest, a run's ensemble or an export alike
SPLIT_FILE, SPLIT_INFO_FILE = "splits.csv", "split.json"
HELD_OUT_FILE = "held_out_ids.txt"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
BRANCHES_DIR, ENSEMBLE_DIR = "branches", "ensemble"


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (see the module docstring); nothing is read or created.

    Attributes:
        root: the run directory.
        splits, split_info, held_out: ``RUN/splits.csv``, ``RUN/split.json``, ``RUN/held_out_ids.txt``.
        branches, ensemble: ``RUN/branches`` (one folder per view, ``branch``) and ``RUN/ensemble``.
    """

    root: Path
    splits: Path = dataclasses.field(init=False)
    split_info: Path = dataclasses.field(init=False)
    held_out: Path = dataclasses.field(init=False)
    branches: Path = dataclasses.field(init=False)
    ensemble: Path = dataclasses.field(init=False)

    def __post_init__(self):
        root = Path(self.root)
        paths = {"root": root, "splits": root / SPLIT_FILE, "split_info": root / SPLIT_INFO_FILE,
                 "held_out": root / HELD_OUT_FILE, "branches": root / BRANCHES_DIR, "ensemble": root / ENSEMBLE_DIR}
        for name, path in paths.items():
            object.__setattr__(self, name, path)  # frozen: set once, here

    def branch(self, view: str) -> Path:
        """``RUN/branches/VIEW``."""
        return self.branches / view


def is_branch_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out as a branch of a run (``RUN/branches/VIEW``)."""
    return Path(os.path.normpath(path)).parent.name == BRANCHES_DIR


def val_predictions(branch_dir: str | os.PathLike) -> Path:
    """A branch's ``val_predictions.csv``."""
    return Path(branch_dir) / VAL_PREDICTIONS_FILE


def bundle_manifest(path: str | os.PathLike) -> Path | None:
    """The manifest of the bundle in ``path``: a run's ``ensemble/``, or ``path`` itself (an ensemble
    directory or an export); None when neither holds one."""
    path = Path(path)
    for candidate in (RunDir(path).ensemble / MANIFEST_FILE, path / MANIFEST_FILE):
        if candidate.is_file():
            return candidate
    return None


def find_bundle(path: str | os.PathLike, fuse_hint: str = "") -> Path:
    """The ensemble directory of a run directory (or the ensemble directory itself).

    Raises:
        FileNotFoundError: naming ``path``, if it is missing, a file, or holds no bundle
            (``fuse_hint``, e.g. the ``skinfusion fuse`` command, says what to do).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory; check the path, or train and fuse a run there first")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run directory (it is a file)")
    manifest = bundle_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"no ensemble in {path}" + (f"; run `{fuse_hint}` first" if fuse_hint else ""))
    return manifest.parent


def model_id(run: str | os.PathLike) -> str:
    """The SHA-256 of the bundle's manifest in ``run`` (a run, an ensemble or an export directory).

    The manifest signs every file of the bundle, so its hash names the whole model.

    Raises:
        FileNotFoundError: if ``run`` holds no manifest.
    """
    manifest = bundle_manifest(run)
    if manifest is None:
        raise FileNotFoundError(f"{Path(run)}: no ensemble manifest")
    return sha256_file(manifest)


def default_fuse_views(run: str | os.PathLike, warn: bool = True) -> tuple[str, ...]:
    """The branches ``fuse`` fuses without ``--views``: ``DEFAULT_VIEWS``, or only the design's three
    (``DESIGN_VIEWS``) in a run that holds none of the newer default branches (one trained before
    they joined the default), with a warning (``warn``) that names what to train for the default."""
    trained = {v for v in DEFAULT_VIEWS if RunDir(run).branch(v).is_dir()}
    missing = [v for v in DEFAULT_VIEWS if v not in trained]
    if missing and not any(v in trained for v in DEFAULT_VIEWS if v not in DESIGN_VIEWS):
        if warn:
            logger.warning("%s has no %s branch: fusing %s only, the ensemble of runs trained before %s joined the "
                           "default; train them (`skinfusion train --view VIEW --run %s ...`) for the default "
                           "ensemble", run, ", ".join(missing), ", ".join(DESIGN_VIEWS), ", ".join(missing), run)
        return DESIGN_VIEWS
    return DEFAULT_VIEWS


__all__ = ["BRANCHES_DIR", "ENSEMBLE_DIR", "HELD_OUT_FILE", "MANIFEST_FILE", "SPLIT_FILE", "SPLIT_INFO_FILE",
           "VAL_PREDICTIONS_FILE", "RunDir", "bundle_manifest", "default_fuse_views", "find_bundle", "is_branch_dir",
           "model_id", "val_predictions"]
