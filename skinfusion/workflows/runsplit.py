"""A run's split: made once on first use, saved in the run, and checked on every reuse."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from skinfusion.data.dedup import find_near_duplicates
from skinfusion.data.index import DatasetIndex
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import (
    check_split,
    load_split,
    load_split_groups,
    make_split,
    merge_near_duplicate_groups,
    save_split,
    subset,
)

logger = logging.getLogger(__name__)


def prepare_split(data_dir: str, run_dir: str, split_seed: int = 0, limit: int | None = None,
                  dedup: bool = False) -> tuple[DatasetIndex, dict[str, str], dict]:
    """Index the data and return the run's split, creating ``RUN/splits.csv`` on first use.

    A run's split is made once and reused by every branch, so all branches see the same
    images; reusing a run on changed data is refused. With ``dedup``, images whose perceptual
    hashes are near-identical join one group before splitting, which catches re-uploads that
    the dataset's own group ids miss.

    Raises:
        ValueError: if the run was split on a different dataset.
    """
    index = index_dataset(data_dir)
    logger.info("%s", index.summary())
    fingerprint = index.fingerprint()
    run = Path(run_dir)
    if (run / "splits.csv").is_file():
        assign, info = load_split(run)
        if info.get("dataset_fingerprint") != fingerprint:
            raise ValueError(
                f"{run}: its split was made on dataset {info.get('data_dir')} (fingerprint "
                f"{info.get('dataset_fingerprint')}), but {data_dir} has fingerprint {fingerprint}; use a new --run"
            )
        if limit is not None and info.get("limit") != limit:
            logger.warning("reusing the run's saved split (limit=%s); --limit %s is ignored", info.get("limit"), limit)
        # The saved group ids (which may include merged near-duplicates) are authoritative.
        groups = load_split_groups(run)
        records = [dataclasses.replace(r, group_id=groups[r.image_id]) for r in index.records if r.image_id in assign]
        logger.info("reusing split %s", run / "splits.csv")
    else:
        records = index.records
        if dedup:
            found = find_near_duplicates([r.path for r in records])
            records = merge_near_duplicate_groups(records, [(records[i].image_id, records[j].image_id) for i, j, _ in found])
            logger.info("perceptual hash: %d near-duplicate pairs merged into shared groups", len(found))
        records = subset(records, limit, split_seed) if limit else records
        assign = make_split(records, seed=split_seed)
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
        logger.info("new split saved to %s: %s", run / "splits.csv", info["counts"])
    check_split(records, assign)
    index.records = records
    return index, assign, info


def _counts(records, assign, split) -> dict[str, int]:
    labels = [r.label for r in records if assign[r.image_id] == split]
    return {"images": len(labels), "melanoma": int(sum(labels))}
