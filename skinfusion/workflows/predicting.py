"""The predict workflow: find the images to score, match their metadata, and stream predictions to a CSV."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

import numpy as np

from colorspaces.files import atomic_open, atomic_path, check_output_file
from colorspaces.image import IMAGE_SUFFIXES
from ensemble.metadata import describe_unreadable, unreadable_values
from skinfusion.data.index import read_csv_rows, write_skip_report

if TYPE_CHECKING:  # an annotation only: an exported bundle (ensemble.runtime) is scored without TensorFlow
    from ensemble.engine import Ensemble

logger = logging.getLogger(__name__)

# The first two are the original columns, kept first and in order for readers that index them.
PREDICTION_COLUMNS = ("path", "melanoma_proba", "in_distribution_score", "out_of_distribution", "ood_reason")


def input_paths(spec: str) -> list[str]:
    """The image files named by ``predict --input``: a folder (recursive, sorted) or a list file.

    Args:
        spec: a folder, or a text file with one image path per line (relative paths are
            relative to that file; blank lines and ``#`` comments are skipped).

    Returns:
        The image paths, in order.

    Raises:
        FileNotFoundError: if ``spec`` is neither a folder nor a file.
        ValueError: if ``spec`` is an image itself rather than a folder or a list.
    """
    path = Path(spec)
    if path.is_dir():
        return sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"--input {spec} is an image; give it as a positional argument, "
                             "or give a folder or a list file")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [str(Path(ln) if Path(ln).is_absolute() else path.parent / ln)
                for ln in lines if ln and not ln.startswith("#")]
    raise FileNotFoundError(f"--input {spec}: no such folder or list file")


def no_images_message(spec: str) -> str:
    """The error for an ``--input`` folder or list that names no image file."""
    return (f"no images found in --input {spec} (it holds no {'/'.join(IMAGE_SUFFIXES)} files); check the "
            "folder or list")


def read_metadata_csv(spec: str, paths: Sequence[str], fields: Sequence[str],
                      sites: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Per-image metadata for ``predict --metadata``, matched by ``image_id`` (file stem) or ``path``.

    Values that are filled in but cannot be read (``sex=F``, ``age=sixty``) are scored as
    unknown, as always; a warning per field gives their count, examples and what to write.

    Args:
        spec: the CSV, with an ``image_id`` or a ``path`` column and one column per field.
        paths: the images being scored.
        fields: the metadata fields the ensemble fuses.
        sites: the sites the fusion knows; given, a site outside them is warned about too.

    Returns:
        ``{path: {field: value}}`` for the images the CSV lists; the others are left out and
        scored with every field unknown (a warning counts them).

    Raises:
        FileNotFoundError: if the CSV is missing.
        ValueError: if it has no key column or lacks a fused field.
    """
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--metadata {spec}: no such file")
    rows = read_csv_rows(path)
    columns = set(rows[0]) if rows else set()
    key = "image_id" if "image_id" in columns else "path" if "path" in columns else None
    if key is None:
        raise ValueError(f"--metadata {spec}: needs an image_id or a path column, has {sorted(columns)}")
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ValueError(f"--metadata {spec}: the ensemble fuses {list(fields)} but the CSV lacks {missing}")
    by_key = {r[key]: {f: r.get(f, "") for f in fields} for r in rows}
    out = {p: by_key.get(Path(p).stem if key == "image_id" else p) for p in paths}
    unmatched = sum(v is None for v in out.values())
    if unmatched:
        logger.warning("%d of %d images are not in %s; scored with %s unknown", unmatched, len(paths), spec,
                       ", ".join(fields))
    matched = {p: m for p, m in out.items() if m is not None}
    for message in describe_unreadable(unreadable_values(list(matched.values()), fields, sites), sites):
        logger.warning("--metadata %s: %s", spec, message)
    return matched


def write_predictions(ens: Ensemble, paths: Sequence[str], fh: TextIO, batch_size: int = 64, workers: int = 2,
                      tta: bool = False, metadata: dict[str, dict] | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> list[tuple[str, str]]:
    """Score image files in streamed batches and write ``PREDICTION_COLUMNS`` rows to ``fh``.

    Rows go through the ``csv`` module, so a path with a comma, quote or newline reads back
    intact. Memory holds two batches whatever the number of files (see ``Ensemble.iter_files``).

    The out-of-distribution columns (``ensemble.ood``): ``in_distribution_score`` is the share of
    in-distribution validation images at least as atypical (1 = most typical; 0 when an image-level
    check failed); ``out_of_distribution`` is 1 or 0; ``ood_reason`` lists the failed checks
    (``colorspaces.quality.REASONS``: e.g. ``too_small``, ``not_colour``, ``uniform_area``, ``text_like``)
    and ``atypical_features``, separated by ``;``. A flagged image gets no decision: its
    ``melanoma_proba`` is the model's raw output, and a warning says how many were flagged. A bundle without a gate leaves the score empty, and
    the flag empty unless an image-level check failed (a warning says so once).

    Args:
        ens: the loaded ensemble.
        paths: image files, scored and written in this order.
        fh: a text stream opened with ``newline=""`` (or ``sys.stdout``).
        batch_size: images per batch.
        workers: decoding threads.
        tta: average over the 8 rotations and flips.
        metadata: path → metadata dict, for an ensemble fused with metadata.
        on_batch: called after each batch with (files done in it, files skipped so far).

    Returns:
        ``(path, reason)`` for every file that could not be scored.
    """
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    skipped: list[tuple[str, str]] = []
    for batch in _scored_batches(ens, paths, skipped, on_batch, batch_size=batch_size, workers=workers, tta=tta,
                                 metadata=metadata):
        writer.writerows((p, f"{q:.6f}", *_ood_cells(getattr(batch, "ood", None), j))
                         for j, (p, q) in enumerate(zip(batch.paths, batch.fused)))
    return skipped


def _scored_batches(ens, paths: Sequence[str], skipped: list[tuple[str, str]],
                    on_batch: Callable[[int, int], None] | None, **options):
    """``ens.iter_files(paths, **options)``, warning about each skipped file and adding it to ``skipped``.

    What every output format shares: the no-gate note once, a warning per skipped file, and the
    progress callback after each batch (so CSV and Parquet, local and Ray engines, report alike).
    """
    note = getattr(ens, "ood_note", None)
    if note:
        logger.warning("%s", note)
    flagged = 0
    for batch in ens.iter_files(paths, **options):
        yield batch
        ood = getattr(batch, "ood", None)
        flagged += 0 if ood is None else int(np.sum(np.asarray(ood.out_of_distribution, np.float64) == 1.0))
        for _, reason in batch.failures:
            logger.warning("skipped %s", reason)
        skipped += batch.failures
        if on_batch is not None:
            on_batch(len(batch.paths) + len(batch.failures), len(skipped))
    if flagged:  # the refusal, said once: the file keeps its columns, the flagged rows get no decision
        logger.warning("%d image(s) flagged out of distribution (out_of_distribution=1, why in ood_reason): no "
                       "decision for them; their melanoma_proba is the model's raw output, not a probability to trust",
                       flagged)


def _ood_cells(ood, j: int) -> tuple[str, str, str]:
    """The ``in_distribution_score, out_of_distribution, ood_reason`` cells of row ``j`` (empty when unknown)."""
    if ood is None:
        return "", "", ""
    score, flag = ood.in_distribution_score[j], ood.out_of_distribution[j]
    return ("" if math.isnan(score) else f"{score:.4f}", "" if math.isnan(flag) else str(int(flag)),
            ";".join(ood.reasons[j]))


def skip_report_path(out_csv: str | os.PathLike) -> Path:
    """Where ``predict_to_csv`` lists the skipped files: ``OUT.skipped.csv``."""
    out = Path(out_csv)
    return out.with_name(out.name + ".skipped.csv")


def predict_to_csv(ens: Ensemble, paths: Sequence[str], out_csv: str | os.PathLike,
                   **kwargs) -> list[tuple[str, str]]:
    """``write_predictions`` into a file that appears only when complete, plus its skip report.

    The rows go to a temporary file beside ``out_csv`` that is renamed into place at the end,
    so an interrupted run leaves the old file (or none), never a truncated one.

    Args:
        ens: the loaded ensemble.
        paths: image files.
        out_csv: the CSV to write; skipped files are listed in ``skip_report_path(out_csv)``.
        **kwargs: passed to ``write_predictions``.

    Returns:
        ``(path, reason)`` for every file that could not be scored.

    Raises:
        FileNotFoundError, ValueError: see ``colorspaces.files.check_output_file``.
    """
    out = check_output_file("--out", out_csv)
    with atomic_open(out, "w", newline="") as fh:
        skipped = write_predictions(ens, paths, fh, **kwargs)
    write_skip_report(skip_report_path(out), skipped)
    return skipped


def predict_to_parquet(ens: Ensemble, paths: Sequence[str], out_parquet: str | os.PathLike, batch_size: int = 64,
                       workers: int = 2, tta: bool = False, metadata: dict[str, dict] | None = None,
                       on_batch: Callable[[int, int], None] | None = None) -> list[tuple[str, str]]:
    """``predict_to_csv`` into a Parquet file: the same columns in the same order, one row group per batch.

    The numbers keep their full float64 precision (the CSV rounds to 6 and 4 decimals);
    ``out_of_distribution`` is an int8 column and an unknown score or flag is null, where the
    CSV leaves the cell empty. The skip report is the same CSV, ``OUT.skipped.csv``.

    Raises:
        ValueError: if pyarrow is not installed (naming the install command), or see ``predict_to_csv``.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"--out {out_parquet}: writing Parquet needs pyarrow (pip install pyarrow, or "
                         "pip install 'skinfusion[ray]'); or give a .csv file") from None
    schema = pa.schema(list(zip(PREDICTION_COLUMNS, (pa.string(), pa.float64(), pa.float64(), pa.int8(), pa.string()))))
    out = check_output_file("--out", out_parquet)
    skipped: list[tuple[str, str]] = []
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in _scored_batches(ens, paths, skipped, on_batch, batch_size=batch_size, workers=workers,
                                         tta=tta, metadata=metadata):
                ood, n = getattr(batch, "ood", None), len(batch.paths)
                score = np.full(n, np.nan) if ood is None else np.asarray(ood.in_distribution_score, np.float64)
                flag = np.full(n, np.nan) if ood is None else np.asarray(ood.out_of_distribution, np.float64)
                columns = [pa.array(list(batch.paths), pa.string()), pa.array(np.asarray(batch.fused, np.float64)),
                           pa.array(score, mask=np.isnan(score)),
                           pa.array(np.nan_to_num(flag).astype(np.int8), mask=np.isnan(flag)),
                           pa.array(["" if ood is None else ";".join(ood.reasons[j]) for j in range(n)], pa.string())]
                if n:
                    writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    write_skip_report(skip_report_path(out), skipped)
    return skipped
