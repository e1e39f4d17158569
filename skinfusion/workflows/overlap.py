"""Where a run's dataset is now, and whether another folder holds images the run trained or validated on
(by image id or identical bytes): ``evaluate --data`` warns about those, since their scores are optimistic."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from colorspaces.files import sha256_file
from ensemble.rundir import RunDir
from skinfusion.data.index import DatasetIndex, Record
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split

logger = logging.getLogger(__name__)


def run_dataset(run: Path, info: Mapping[str, Any], data_root: str | None) -> Path:
    """Where the run's dataset is now: ``data_root`` when given, else the folder split.json recorded."""
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise FileNotFoundError(f"--data-root {data_root}: no such folder")
        return Path(data_root)
    recorded = info.get("data_dir")
    if not recorded:
        raise ValueError(f"{run / 'split.json'}: records no data_dir; pass --data-root DIR, "
                         f"the dataset folder {run} was split on")
    if not Path(recorded).is_dir():
        raise FileNotFoundError(f"{recorded}: the dataset {run} was split on (recorded in {run / 'split.json'}) is "
                                "not there; if it moved, pass --data-root NEW_FOLDER")
    return Path(recorded)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _same_content(records: Sequence[Record], trained_paths: Sequence[str]) -> set[str]:
    """Ids of ``records`` whose file bytes equal one of ``trained_paths`` (only equal sizes are hashed)."""
    sizes = {_size(r.path) for r in records} - {-1}
    candidates = [p for p in trained_paths if _size(p) in sizes]
    if not candidates:
        return set()
    logger.info("comparing %d images with %d same-size training/validation images by content", len(records), len(candidates))
    hashes = {sha256_file(p) for p in candidates}
    same = {_size(p) for p in candidates}
    return {r.image_id for r in records if _size(r.path) in same and sha256_file(r.path) in hashes}


def warn_training_overlap(run: Path, index: DatasetIndex, data_dir: str, data_root: str | None) -> None:
    """Warn when images of ``data_dir`` are among the run's training or validation images (by id or bytes)."""
    if not RunDir(run).splits.is_file():
        logger.warning("%s has no splits.csv: cannot check whether %s overlaps its training images", run, data_dir)
        return
    assign, info = load_split(run)
    trained = {i for i, s in assign.items() if s in ("train", "val")}
    by_id = {r.image_id for r in index.records if r.image_id in trained}
    by_content: set[str] = set()
    try:
        # The run's own images, to compare bytes: a copy renamed or re-listed under other ids is
        # still an image the model has seen.
        run_root = run_dataset(run, info, data_root)
        trained_paths = [r.path for r in index_dataset(run_root, log=False).records if r.image_id in trained]
        by_content = _same_content([r for r in index.records if r.image_id not in by_id], trained_paths)
    except (OSError, ValueError) as exc:  # the run's folder gone or unreadable: ids are still compared
        logger.warning("%s was compared with the run's training images by image id only, not by content (%s)",
                       data_dir, exc)
    n = len(by_id) + len(by_content)
    if n:
        same = index.fingerprint() == info.get("dataset_fingerprint")
        logger.warning("%d of %d images of %s are in this run's training or validation split (%d by image id, %d more "
                       "by identical content; e.g. %s); their scores are optimistic: %s", n, len(index.records),
                       data_dir, len(by_id), len(by_content), ", ".join(sorted(by_id | by_content)[:3]),
                       "omit --data to score the run's test split" if same
                       else "remove them from the folder for an unbiased score")
