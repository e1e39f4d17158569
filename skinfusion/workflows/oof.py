"""Out-of-fold branch probabilities on a run's training split, for stacking (``fuse --folds K``).

A stacker fitted on the validation split alone sees about 1,500 images. Out-of-fold
probabilities give it every training image instead: the training split is cut into K
grouped, stratified folds, each branch is trained K more times with one fold held out,
and each image is scored only by the models that never saw it. The fold models are
early-stopped on the run's own validation split (as the run's branches were), and the
test split takes no part at all.

Fold runs live in ``RUN/oof/k<K>-fold<i>/`` with their own ``splits.csv``, where the held-out
fold is named ``test``. They are ordinary runs: an interrupted ``fuse --folds`` resumes
them, and a rerun reuses the finished ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ensemble.rundir import RunDir
from models.store import read_branch_info
from skinfusion.data.splits import (
    grouped_folds,
    load_split,
    recorded_data_dir,
    save_split,
)
from skinfusion.workflows.runsplit import prepare_split
from skinfusion.workflows.training import score_branch, train_branches

logger = logging.getLogger(__name__)


def fold_runs(run_dir: str | Path, folds: int) -> list[Path]:
    """The directories of the ``folds`` fold runs of ``run_dir``."""
    return [Path(run_dir) / "oof" / f"k{folds}-fold{i}" for i in range(folds)]


def make_fold_splits(run_dir: str | Path, folds: int) -> list[Path]:
    """Write one split per fold: the run's train images minus fold i as ``train``, fold i as ``test``.

    The run's validation images stay ``val`` in every fold; its test images are left out.
    Folds keep lesion groups whole and are stratified on label × source, like the run's split.

    Raises:
        ValueError: if ``folds`` < 2, or the training split has too few groups for it.
    """


    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    run = Path(run_dir)
    _, saved_info = load_split(run)  # only for the data folder and seed the run was split with
    index, assign, info = prepare_split(recorded_data_dir(run, saved_info), str(run), saved_info.get("split_seed", 0))
    train = [r for r in index.records if assign[r.image_id] == "train"]
    val = [r for r in index.records if assign[r.image_id] == "val"]
    fold_of = grouped_folds(train, folds, info.get("split_seed", 0) + 1)
    dirs = fold_runs(run, folds)
    for i, d in enumerate(dirs):
        fold_assign = {r.image_id: ("test" if f == i else "train") for r, f in zip(train, fold_of)}
        fold_assign.update({r.image_id: "val" for r in val})
        records = train + val
        counts = {s: {"images": sum(fold_assign[r.image_id] == s for r in records),
                      "melanoma": sum(r.label for r in records if fold_assign[r.image_id] == s)}
                  for s in ("train", "val", "test")}
        fold_info = {**info, "counts": counts, "oof": {"parent_run": str(run.resolve()), "folds": folds, "fold": i}}
        if RunDir(d).splits.is_file():
            saved, _ = load_split(d)
            if saved != fold_assign:
                raise ValueError(f"{d}: holds a different fold split (was the run re-split?); remove {run / 'oof'}")
            continue
        save_split(d, records, fold_assign, fold_info)
    return dirs


def oof_member_proba(run_dir: str | Path, views: Sequence[str], folds: int, jobs: int | None = None,
                     workers: int = 2) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Train each branch once per fold (or reuse finished folds) and score the held-out folds.

    Each fold trains the run's own branch configs. ``jobs`` parallel processes per fold
    (default: one per branch, as ``train --view all``).

    Returns:
        ``(image_ids, y, P)``: every scored training image once, its label, and an
        ``(n, len(views))`` matrix of probabilities from models that did not train on it.
    """


    run = Path(run_dir)
    configs, excluded = [], 0
    for v in views:
        config, meta = read_branch_info(RunDir(run).branch(v))
        configs.append(config)
        excluded += int(meta.get("excluded_from_training") or 0)
    if excluded:
        logger.warning("the run's branches were trained with artefact-flagged images excluded; "
                       "the fold models train on all training images")
    _, info = load_split(run)
    ids: list[str] = []
    ys: list[np.ndarray] = []
    Ps: list[np.ndarray] = []
    dirs = make_fold_splits(run, folds)
    for i, d in enumerate(dirs):
        logger.info("out-of-fold stacking: fold %d of %d in %s", i + 1, folds, d)
        train_branches(recorded_data_dir(run, info), str(d), configs, jobs=jobs or len(configs), resume=True,
                       split_seed=info.get("split_seed", 0), workers=workers)
        cols, fold_ids, fold_y = [], None, None
        for v in views:
            records, proba = score_branch(str(d), v, split="test", workers=workers)
            got = [r.image_id for r in records]
            if fold_ids is None:
                fold_ids, fold_y = got, np.array([r.label for r in records])
            elif got != fold_ids:
                raise ValueError(f"{d}: branches scored different images of the held-out fold")
            cols.append(proba)
        ids += fold_ids
        ys.append(fold_y)
        Ps.append(np.column_stack(cols))
    if len(set(ids)) != len(ids):
        raise AssertionError("an image was held out in two folds")
    return ids, np.concatenate(ys), np.vstack(Ps)
