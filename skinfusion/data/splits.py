"""Grouped, stratified, seeded train/validation/test splits, saved once per run."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from colorspaces.files import atomic_open, read_json_object, write_json_atomic
from colorspaces.labels import LABEL_NAMES
from ensemble.rundir import SPLIT_FILE, SPLIT_INFO_FILE
from skinfusion.data.index import Record

N_FOLDS = 20  # 5% granularity: 3 folds test, 3 folds validation, 14 train
SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("image_id", "label", "group_id", "source", "split")
# A run's split cannot be repaired by hand: the branches trained on the one that was saved.
DAMAGED_SPLIT_HINT = "the run's split is damaged; start a new --run"


def _strata(records: Sequence[Record]) -> np.ndarray:
    # Stratify on label and source together, so each split keeps every source's class mix
    # and per-source test AUCs are measurable.
    return np.array([f"{r.label}|{r.source}" for r in records])


def grouped_folds(records: Sequence[Record], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per record: whole lesion groups, stratified on label × source."""
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
    """A stratified, grouped subset of about ``limit`` images (whole lesion groups only).

    Groups are shuffled (seeded) within each label × source stratum and taken until the
    stratum has its share of ``limit``, so class and source mix are kept.
    """
    if limit >= len(records):
        return list(records)
    strata = _strata(records)
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_group.setdefault(r.group_id, []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for stratum in np.unique(strata):
        groups = sorted({records[i].group_id for i in np.flatnonzero(strata == stratum)})
        target = limit * np.count_nonzero(strata == stratum) / len(records)
        taken = 0
        for g in rng.permutation(groups):
            if taken >= target:
                break
            keep += by_group[g]  # a group spanning two strata may come twice; set() below dedups
            taken += len(by_group[g])
    return [records[i] for i in sorted(set(keep))]


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
    fold = grouped_folds(records, N_FOLDS, seed)
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
            names = ", ".join(LABEL_NAMES[v] for v in sorted(labels)) or "no images"
            counts = {LABEL_NAMES[c]: sum(r.label == c for r in records) for c in LABEL_NAMES}
            raise ValueError(f"the {s} split has {names} only: the dataset has too few lesion groups of one class "
                             f"to put both classes in train, val and test ({counts}); add images of the rarer "
                             "class, or drop --limit if you set one")


def verify_split(records: Sequence[Record], assign: dict[str, str],
                 near_duplicate_pairs: Iterable[Sequence] = ()) -> list[str]:
    """List every way a split leaks: a lesion group or a near-duplicate pair across splits.

    Unlike ``check_split``, which stops at the first problem, this collects them all, so
    that a saved split can be audited in one pass.

    Args:
        records: dataset records (their ``group_id`` defines the groups).
        assign: ``{image_id: split}``, e.g. from ``load_split``.
        near_duplicate_pairs: pairs of image ids, e.g. from
            ``skinfusion.data.dedup.read_near_duplicate_pairs``; items after the first two in
            each pair (such as a distance) are ignored, and pairs with an image outside
            ``assign`` are skipped (that image is not in the split).

    Returns:
        Human-readable problems, one per record without a split, split name outside
        train/val/test, group in more than one split, or pair across splits; empty if
        the split is leak-free.
    """
    problems: list[str] = []
    sides: dict[str, dict[str, int]] = {}
    for r in records:
        s = assign.get(r.image_id)
        if s is None:
            problems.append(f"image {r.image_id} has no split")
            continue
        if s not in SPLITS:
            problems.append(f"image {r.image_id} has unknown split '{s}' (expected one of {', '.join(SPLITS)})")
        counts = sides.setdefault(r.group_id, {})
        counts[s] = counts.get(s, 0) + 1
    for gid, counts in sides.items():
        if len(counts) > 1:
            where = ", ".join(f"{s} ({n} image{'s' if n > 1 else ''})" for s, n in sorted(counts.items()))
            problems.append(f"group {gid} crosses splits: {where}")
    for pair in near_duplicate_pairs:
        a, b = str(pair[0]), str(pair[1])
        if a in assign and b in assign and assign[a] != assign[b]:
            problems.append(f"near-duplicate pair {a} ({assign[a]}) / {b} ({assign[b]}) crosses splits")
    return problems


def merge_near_duplicate_groups(records: Sequence[Record], near_duplicate_pairs: Iterable[Sequence]) -> list[Record]:
    """Join the groups of near-duplicate images, so that ``make_split`` keeps each pair together.

    Groups linked by a chain of pairs become one (union-find); the merged group keeps the
    smallest of its group ids, so the result does not depend on pair order.

    Args:
        records: dataset records.
        near_duplicate_pairs: pairs of image ids (extra items per pair are ignored);
            pairs with an image not in ``records`` are skipped.

    Returns:
        The records in the same order, with ``group_id`` replaced where groups merged.
    """
    parent: dict[str, str] = {r.group_id: r.group_id for r in records}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]  # path halving keeps chains short
            g = parent[g]
        return g

    group_of = {r.image_id: r.group_id for r in records}
    for pair in near_duplicate_pairs:
        a, b = str(pair[0]), str(pair[1])
        if a in group_of and b in group_of:
            ra, rb = find(group_of[a]), find(group_of[b])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return [r if find(r.group_id) == r.group_id else replace(r, group_id=find(r.group_id)) for r in records]


def save_split(run_dir: str | os.PathLike, records: Sequence[Record], assign: dict[str, str], info: dict) -> None:
    """Write ``RUN/splits.csv`` (image_id,label,group_id,source,split) and ``RUN/split.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # split.json first: splits.csv is what marks a run as split, so it must land last.
    write_json_atomic(run_dir / SPLIT_INFO_FILE, info)
    with atomic_open(run_dir / SPLIT_FILE, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(SPLIT_COLUMNS)
        for r in sorted(records, key=lambda r: r.image_id):
            w.writerow([r.image_id, r.label, r.group_id, r.source, assign[r.image_id]])


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: damaged, {what}; {DAMAGED_SPLIT_HINT}")


def read_split_rows(run_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``RUN/splits.csv``, checked: every column, a known split and a 0/1 label on every
    row, each image once, and no split empty.

    Raises:
        FileNotFoundError: if the run has no split yet.
        ValueError: naming the file (and line) if it is empty, not UTF-8 CSV, lacks a column,
            has a malformed row, or leaves a split without images.
    """
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run has no split yet (train a branch first)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise _damaged(path, "the file is empty")
            missing = [c for c in SPLIT_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise _damaged(path, f"lacks column(s) {', '.join(missing)} (header: {','.join(reader.fieldnames)})")
            rows, seen = [], set()
            for row in reader:
                if None in row or None in row.values():
                    raise _damaged(path, f"line {reader.line_num} does not have the header's "
                                         f"{len(reader.fieldnames)} fields")
                if row["split"] not in SPLITS:
                    raise _damaged(path, f"line {reader.line_num}: unknown split {row['split']!r} "
                                         f"(expected one of {', '.join(SPLITS)})")
                if row["label"] not in ("0", "1") or not row["image_id"]:
                    raise _damaged(path, f"line {reader.line_num}: expected an image id and a label 0 or 1, "
                                         f"got {row['image_id']!r}, {row['label']!r}")
                if row["image_id"] in seen:
                    raise _damaged(path, f"line {reader.line_num}: image {row['image_id']!r} is listed twice")
                seen.add(row["image_id"])
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise _damaged(path, f"not CSV ({exc})") from None
    empty = [s for s in SPLITS if not any(row["split"] == s for row in rows)]
    if empty:
        raise _damaged(path, f"the {', '.join(empty)} split{'s' if len(empty) > 1 else ''} ha"
                             f"{'ve' if len(empty) > 1 else 's'} no images")
    return rows


def load_split(run_dir: str | os.PathLike) -> tuple[dict[str, str], dict]:
    """Read a saved split: ``({image_id: split}, info)``, both checked (see ``read_split_rows``).

    ``info`` holds the ``dataset_fingerprint`` and, normally, the ``data_dir`` the run was split on
    (a caller that needs the folder and finds none asks for it, as ``verify-split --data`` does).

    Raises:
        FileNotFoundError: if the run has no split yet, or its ``split.json`` is missing.
        ValueError: naming the file, if ``splits.csv`` or ``split.json`` is damaged.
    """
    run_dir = Path(run_dir)
    assign = {row["image_id"]: row["split"] for row in read_split_rows(run_dir)}
    path = run_dir / SPLIT_INFO_FILE
    info = read_json_object(path, required=("dataset_fingerprint",), hint=DAMAGED_SPLIT_HINT)
    if not isinstance(info["dataset_fingerprint"], str):
        raise _damaged(path, f"'dataset_fingerprint' must be a string, got {info['dataset_fingerprint']!r}")
    if not isinstance(info.get("data_dir", ""), str):
        raise _damaged(path, f"'data_dir' must be a folder name, got {info['data_dir']!r}")
    seed = info.get("split_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _damaged(path, f"'split_seed' must be a whole number, got {seed!r}")
    limit = info.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise _damaged(path, f"'limit' must be a whole number or null, got {limit!r}")
    _check_counts(run_dir, assign, info)
    return assign, info


def _recorded_images(counts, split: str) -> int | None:
    entry = counts.get(split) if isinstance(counts, dict) else None
    n = entry.get("images") if isinstance(entry, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _check_counts(run_dir: Path, assign: dict[str, str], info: dict) -> None:
    # split.json records how many images each split got; a splits.csv cut at a line end
    # (an interrupted copy) is still valid CSV, and only these counts show the rows it lost.
    counts = info.get("counts")
    if counts is None:
        return
    recorded = {s: _recorded_images(counts, s) for s in SPLITS}
    if None in recorded.values():
        raise _damaged(run_dir / SPLIT_INFO_FILE, f"'counts' must give each split's number of 'images', got {counts!r}")
    held = {s: sum(v == s for v in assign.values()) for s in SPLITS}
    if held != recorded:
        raise _damaged(run_dir / SPLIT_FILE, f"it holds {held} images per split, but {SPLIT_INFO_FILE} recorded {recorded}")


def recorded_data_dir(run_dir: str | os.PathLike, info: dict) -> str:
    """The dataset folder a run was split on, as ``split.json`` records it.

    Raises:
        ValueError: naming ``split.json`` when it records no folder.
    """
    data_dir = info.get("data_dir")
    if not data_dir:
        raise ValueError(f"{Path(run_dir) / 'split.json'}: records no data_dir, so the run's dataset is unknown; "
                         "pass the dataset folder with --data (or --data-root for evaluate)")
    return str(data_dir)


def load_split_groups(run_dir: str | os.PathLike) -> dict[str, str]:
    """``{image_id: group_id}`` as saved in ``RUN/splits.csv`` (merged near-duplicates included)."""
    return {row["image_id"]: row["group_id"] for row in read_split_rows(run_dir)}
