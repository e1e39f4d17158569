"""A run's split: made once on first use, saved in the run, and checked on every reuse."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from ensemble.rundir import RunDir
from skinfusion.data.dedup import find_near_duplicates
from skinfusion.data.index import DatasetIndex, Record
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import (
    DAMAGED_SPLIT_HINT,
    SPLIT_FILE,
    SPLITS,
    check_split,
    load_split,
    make_split,
    merge_near_duplicate_groups,
    read_split_rows,
    save_split,
    subset,
    verify_split,
)

logger = logging.getLogger(__name__)


def prepare_split(data_dir: str, run_dir: str, split_seed: int = 0, limit: int | None = None,
                  dedup: bool = False,
                  check: Callable[[dict[str, str]], None] | None = None) -> tuple[DatasetIndex, dict[str, str], dict]:
    """Index the data and return the run's split, creating ``RUN/splits.csv`` on first use.

    A run's split is made once and reused by every branch, so all branches see the same
    images; reusing a run on changed data is refused. With ``dedup``, images whose perceptual
    hashes are near-identical join one group before splitting, which catches re-uploads that
    the dataset's own group ids miss. ``check(assign)``, if given, runs before a new split is
    saved: a command that cannot use the split refuses without leaving one in the run.

    Raises:
        ValueError: if the run was split on a different dataset, or the data has one class only
            (and whatever ``check`` raises).
    """
    index = index_dataset(data_dir)  # logs its summary, once per process
    index.check_both_classes()  # before the split, which would only say that a split lacks a class
    fingerprint = index.fingerprint()
    run = Path(run_dir)
    if RunDir(run).splits.is_file():
        assign, info = load_split(run)
        if info.get("dataset_fingerprint") != fingerprint:
            raise ValueError(
                f"{run}: its split was made on dataset {info.get('data_dir')} (fingerprint "
                f"{info.get('dataset_fingerprint')}), but {data_dir} has fingerprint {fingerprint}; use a new --run"
            )
        if limit is not None and info.get("limit") != limit:
            logger.warning("reusing the run's saved split (limit=%s); --limit %s is ignored", info.get("limit"), limit)
        records = _saved_records(run, index.records)
        logger.info("reusing split %s", run / SPLIT_FILE)
    else:
        records = index.records
        if dedup:
            found = find_near_duplicates([r.path for r in records])
            records = merge_near_duplicate_groups(records, [(records[i].image_id, records[j].image_id) for i, j, _ in found])
            logger.info("perceptual hash: %d near-duplicate pairs merged into shared groups", len(found))
        records = subset(records, limit, split_seed) if limit else records
        assign = make_split(records, seed=split_seed)
        if check is not None:
            check(assign)
        info = {
            "data_dir": str(Path(data_dir).resolve()),
            "dataset_fingerprint": fingerprint,
            "split_seed": split_seed,
            "limit": limit,
            "dedup": dedup,
            "grouped": index.grouped,
            "counts": {s: _counts(records, assign, s) for s in ("train", "val", "test")},
        }
        save_split(run, records, assign, info)
        logger.info("new split saved to %s: %s", RunDir(run).splits, info["counts"])
        check_split(records, assign)
    index.records = records
    return index, assign, info


def _saved_records(run: Path, records: list[Record]) -> list[Record]:
    """The dataset's records in the run's saved split, with its group ids, checked against the dataset.

    The dataset fingerprint already matched, so a split that names images the dataset lacks, gives
    them other labels, or lets a group or a class cross splits was changed after it was saved.
    """
    path = run / SPLIT_FILE
    rows = {row["image_id"]: row for row in read_split_rows(run)}
    by_id = {r.image_id: r for r in records}
    unknown = sorted(set(rows) - set(by_id))
    if unknown:
        raise ValueError(f"{path}: damaged, {len(unknown)} image ids are not in the dataset "
                         f"(e.g. {unknown[0]!r}); {DAMAGED_SPLIT_HINT}")
    relabelled = sorted(i for i, row in rows.items() if int(row["label"]) != by_id[i].label)
    if relabelled:
        raise ValueError(f"{path}: damaged, {len(relabelled)} labels differ from the dataset's "
                         f"(e.g. {relabelled[0]!r}); {DAMAGED_SPLIT_HINT}")
    # The saved group ids (which may include merged near-duplicates) are authoritative.
    saved = [dataclasses.replace(r, group_id=rows[r.image_id]["group_id"]) for r in records if r.image_id in rows]
    assign = {i: row["split"] for i, row in rows.items()}
    problems = verify_split(saved, assign)
    problems += [f"split '{s}' lacks a class" for s in SPLITS
                 if {r.label for r in saved if assign[r.image_id] == s} != {0, 1}]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{path}: damaged, {problems[0]}{more}; {DAMAGED_SPLIT_HINT}")
    return saved


def _counts(records, assign, split) -> dict[str, int]:
    labels = [r.label for r in records if assign[r.image_id] == split]
    return {"images": len(labels), "melanoma": int(sum(labels))}
