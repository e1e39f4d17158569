"""Grouped, stratified, seeded train/validation/test splits, saved once per run."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from experiments.data import Record

N_FOLDS = 20  # 5% granularity: 3 folds test, 3 folds validation, 14 train
SPLITS = ("train", "val", "test")


def _strata(records: Sequence[Record]) -> np.ndarray:
    # Stratify on label and source together, so each split keeps every source's class mix
    # and per-source test AUCs are measurable.
    return np.array([f"{r.label}|{r.source}" for r in records])


def _folds(records: Sequence[Record], n_folds: int, seed: int) -> np.ndarray:
    groups = np.array([r.group_id for r in records])
    if len(np.unique(groups)) < n_folds:
        raise ValueError(f"need at least {n_folds} lesion groups to split, got {len(np.unique(groups))}")
    fold = np.empty(len(records), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare strata (few images of a small source) trigger a warning but split fine.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(records)), _strata(records), groups)):
            fold[test_idx] = k
    return fold


def subset(records: Sequence[Record], limit: int, seed: int) -> list[Record]:
    """A stratified, grouped subset of about ``limit`` images (whole lesion groups only)."""
    if limit >= len(records):
        return list(records)
    # Small folds, taken until about `limit` images: a single fold of round(n / limit)
    # would give half the data for any limit above n / 1.5.
    n_folds = min(max(2, math.ceil(20 * len(records) / limit)), len({r.group_id for r in records}))
    fold = _folds(records, n_folds, seed)
    keep = np.zeros(len(records), bool)
    for k in range(n_folds):
        if keep.sum() >= limit:
            break
        keep |= fold == k
    return [r for r, k in zip(records, keep) if k]


def make_split(records: Sequence[Record], seed: int = 0, val_folds: int = 3, test_folds: int = 3) -> dict[str, str]:
    """Assign every image to train, val or test, keeping each lesion group on one side.

    Args:
        records: dataset records.
        seed: split seed.
        val_folds: twentieths of the groups that go to validation (3 → 15%).
        test_folds: twentieths of the groups that go to test.

    Returns:
        ``{image_id: split}``.

    Raises:
        ValueError: if there are fewer than 20 groups or a split lacks a class.
    """
    fold = _folds(records, N_FOLDS, seed)
    assign = {}
    for r, f in zip(records, fold):
        assign[r.image_id] = "test" if f < test_folds else "val" if f < test_folds + val_folds else "train"
    check_split(records, assign)
    return assign


def check_split(records: Sequence[Record], assign: dict[str, str]) -> None:
    """Verify that no lesion group crosses splits and that every split has both classes.

    Raises:
        ValueError: naming the first offending group or split.
    """
    side: dict[str, str] = {}
    for r in records:
        s = assign[r.image_id]
        if side.setdefault(r.group_id, s) != s:
            raise ValueError(f"group {r.group_id} is in both {side[r.group_id]} and {s}")
    for s in SPLITS:
        labels = {r.label for r in records if assign[r.image_id] == s}
        if labels != {0, 1}:
            raise ValueError(f"split '{s}' lacks a class (has labels {sorted(labels)}); use more images")


def save_split(run_dir: str | os.PathLike, records: Sequence[Record], assign: dict[str, str], info: dict) -> None:
    """Write ``RUN/splits.csv`` (image_id,label,group_id,source,split) and ``RUN/split.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".splits.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label", "group_id", "source", "split"])
        for r in sorted(records, key=lambda r: r.image_id):
            w.writerow([r.image_id, r.label, r.group_id, r.source, assign[r.image_id]])
    os.replace(tmp, run_dir / "splits.csv")
    (run_dir / "split.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_split(run_dir: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """Read a saved split: ``({image_id: split}, info)``.

    Raises:
        FileNotFoundError: if the run has no split yet.
    """
    run_dir = Path(run_dir)
    path = run_dir / "splits.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run has no split yet (train a branch first)")
    with open(path, newline="") as fh:
        assign = {row["image_id"]: row["split"] for row in csv.DictReader(fh)}
    info = json.loads((run_dir / "split.json").read_text()) if (run_dir / "split.json").is_file() else {}
    return assign, info
