"""The audit workflow: audit a dataset into a CSV and summary, and read the flags back."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from colorspaces.files import atomic_open, write_json_atomic
from skinfusion.data.audit import ARTEFACTS, audit_images, summarise_audit
from skinfusion.data.dedup import find_near_duplicates
from skinfusion.data.layouts import index_dataset

logger = logging.getLogger(__name__)


AUDIT_COLUMNS = ("image_id", "label", "source", "group_id", "width", "height", "readable", "error",
                 "colour_disc", "colour_disc_score", "ink", "ink_score", "near_duplicates")


def audit_dataset(data_dir: str, out_csv: str, workers: int = 2, hash_pairs: bool = True,
                  max_distance: int = 18) -> dict[str, Any]:
    """Audit every labelled image of a dataset for artefacts, size/source mix and near-duplicates.

    Writes ``out_csv`` (one row per image, columns ``AUDIT_COLUMNS``) and a summary JSON beside
    it (``<out>.summary.json``).

    Returns:
        The summary: the per-class figures of ``skinfusion.data.audit.summarise_audit`` plus the
        dataset format, skipped labels, missing files and near-duplicate pair count.
    """
    index = index_dataset(data_dir)  # logs its summary, once per process
    records = index.records
    logger.info("auditing %d images for colour discs and ink", len(records))
    rows = audit_images(records, workers=workers)
    near: dict[str, list[str]] = {r.image_id: [] for r in records}
    n_pairs = 0
    if hash_pairs:
        for i, j, _ in find_near_duplicates([r.path for r in records], max_distance=max_distance):
            near[records[i].image_id].append(records[j].image_id)
            near[records[j].image_id].append(records[i].image_id)
            n_pairs += 1
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=AUDIT_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for rec, row in zip(records, rows):
            w.writerow({**row, "label": rec.label, "source": rec.source, "group_id": rec.group_id,
                        "colour_disc_score": f"{row['colour_disc_score']:.4f}", "ink_score": f"{row['ink_score']:.4f}",
                        "near_duplicates": " ".join(near[rec.image_id])})
    summary = summarise_audit(rows, [r.label for r in records], [r.source for r in records])
    summary.update(data_dir=str(Path(data_dir).resolve()), format=index.format,
                   skipped_labels=dict(index.skipped_labels), missing_files=index.missing_files,
                   near_duplicate_pairs=n_pairs, hash_max_distance=max_distance if hash_pairs else None)
    write_json_atomic(out.with_suffix(".summary.json"), summary)
    return summary


def read_audit_flags(audit_csv: str | os.PathLike) -> dict[str, set[str]]:
    """``{"colour_disc": ids, "ink": ids}`` of the images an audit CSV flags.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it lacks the artefact columns.
    """
    path = Path(audit_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit file not found (write one with `skinfusion audit --data DIR --out FILE`)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image_id", *ARTEFACTS} <= set(rows[0]):
        raise ValueError(f"{path}: not an audit CSV (needs image_id, colour_disc, ink columns and at least one row)")
    # Accept spreadsheet spellings (TRUE, true, 1, yes): a re-saved audit must not silently flag nothing.
    truthy = {"true", "1", "yes", "y"}
    return {a: {r["image_id"] for r in rows if (r[a] or "").strip().lower() in truthy} for a in ARTEFACTS}


def artefact_exclusions(data_dir: str, run_dir: str, audit_csv: str | None = None,
                        workers: int = 2) -> tuple[set[str], str]:
    """Ids of the images an audit flags with a colour disc or ink, for ``train --exclude-artefacts``.

    Args:
        data_dir: the dataset folder.
        run_dir: the run directory; without ``audit_csv`` the dataset is audited once into
            ``RUN/audit.csv`` (without the near-duplicate search), and later calls reuse it.
        audit_csv: an existing audit CSV (from ``skinfusion audit``) to read instead.
        workers: audit threads.

    Returns:
        The flagged image ids and the audit CSV they were read from.

    Raises:
        FileNotFoundError: if ``audit_csv`` is given but missing.
        ValueError: if the audit CSV lacks the artefact columns.
    """
    if audit_csv is None:
        audit_csv = str(Path(run_dir) / "audit.csv")
        if not Path(audit_csv).is_file():
            audit_dataset(data_dir, audit_csv, workers=workers, hash_pairs=False)
    flags = read_audit_flags(audit_csv)
    return flags["colour_disc"] | flags["ink"], audit_csv
