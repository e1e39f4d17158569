"""Indexing labelled image folders and loading their images, skipping and reporting bad files."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from colorspaces import ImageError, read_image, resize_image

logger = logging.getLogger(__name__)

LABELS = {"nevus": 0, "melanoma": 1}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Record:
    """One labelled image: id, file path, label (1 = melanoma), lesion group and source."""

    image_id: str
    path: str
    label: int
    group_id: str
    source: str


@dataclass
class DatasetIndex:
    """The usable records of a folder plus what was left out and why."""

    root: str
    format: str
    records: list[Record]
    skipped_labels: Counter = field(default_factory=Counter)
    missing_files: list[str] = field(default_factory=list)
    grouped: bool = False

    def fingerprint(self) -> str:
        """A short hash of (image id, label, file size) over all records; changes when the data does."""
        h = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.image_id):
            size = os.path.getsize(r.path) if os.path.exists(r.path) else -1
            h.update(f"{r.image_id},{r.label},{size}\n".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """One line: format, counts per class, skipped labels and missing files."""
        n_mel = sum(r.label for r in self.records)
        parts = [f"{self.root}: format '{self.format}', {len(self.records)} images "
                 f"({n_mel} melanoma, {len(self.records) - n_mel} nevus)"]
        if self.skipped_labels:
            parts.append("skipped other labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_labels.items())))
        if self.missing_files:
            parts.append(f"{len(self.missing_files)} listed images missing")
        if not self.grouped:
            parts.append("no group_id/lesion_id: images of one lesion may straddle the split")
        return "; ".join(parts)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def index_dataset(root: str | os.PathLike) -> DatasetIndex:
    """Index a ``labels.csv`` + ``images/`` folder.

    ``labels.csv`` has ``image_id,label`` (``melanoma`` or ``nevus``; other labels are
    counted and skipped) and optionally ``source``. An optional ``metadata.csv`` supplies
    ``group_id`` (or ``lesion_id``) so that all images of one lesion stay on one side of the split.

    Args:
        root: the dataset folder.

    Returns:
        A ``DatasetIndex``; images listed but absent are in ``missing_files``.

    Raises:
        FileNotFoundError: if the folder, ``labels.csv`` or ``images/`` is missing.
        ValueError: if ``labels.csv`` lacks its columns or no usable image remains.
    """
    root = Path(root)
    labels_path, images_dir = root / "labels.csv", root / "images"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    if not labels_path.is_file() or not images_dir.is_dir():
        raise FileNotFoundError(
            f"{root}: expected labels.csv and images/ (image_id,label with label melanoma|nevus); see README 'Data'"
        )
    rows = _read_csv(labels_path)
    if not rows or not {"image_id", "label"} <= set(rows[0]):
        raise ValueError(f"{labels_path}: needs columns image_id,label")
    groups, sources = {}, {}
    meta_path = root / "metadata.csv"
    if meta_path.is_file():
        for m in _read_csv(meta_path):
            key = m.get("image_id") or m.get("isic_id")
            gid = m.get("group_id") or m.get("lesion_id")
            if key and gid:
                groups[key] = gid
            if key and m.get("source"):
                sources[key] = m["source"]
    files = {}
    with os.scandir(images_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTENSIONS:
                files.setdefault(stem, entry.path)
    index = DatasetIndex(root=str(root), format="labels.csv+images", records=[], grouped=bool(groups))
    seen = set()
    for row in rows:
        image_id, label = row["image_id"].strip(), row["label"].strip().lower()
        if label not in LABELS:
            index.skipped_labels[label or "<empty>"] += 1
            continue
        if image_id in seen:
            raise ValueError(f"{labels_path}: image_id {image_id} is listed twice")
        seen.add(image_id)
        path = files.get(image_id)
        if path is None:
            index.missing_files.append(str(images_dir / f"{image_id}.jpg"))
            continue
        index.records.append(Record(
            image_id=image_id, path=path, label=LABELS[label],
            group_id=groups.get(image_id, image_id),
            source=row.get("source") or sources.get(image_id) or "unknown",
        ))
    if not index.records:
        raise ValueError(f"{root}: no usable melanoma/nevus images found")
    return index


def _load_one(path: str, size: int):
    try:
        return resize_image(read_image(path), size), None
    except ImageError as exc:
        return None, str(exc)


def load_images(paths: Sequence[str], size: int, workers: int = 2, desc: str = "images"):
    """Decode and resize images, skipping unreadable ones instead of failing the job.

    Args:
        paths: image files.
        size: output side in pixels.
        workers: decoding threads (OpenCV releases the GIL while decoding).
        desc: what to call the images in progress messages.

    Returns:
        ``(images, ok, failures)``: RGB uint8 (n_ok, size, size, 3), the indices into
        ``paths`` that loaded, and a list of ``(path, reason)`` for the rest.
    """
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok, failures = [], []
    step = max(1, len(paths) // 10)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (img, err) in enumerate(pool.map(lambda p: _load_one(p, size), paths)):
            if err is None:
                out[len(ok)] = img
                ok.append(i)
            else:
                failures.append((paths[i], err))
                logger.warning("skipping %s", err)
            if (len(paths) >= 500 and (i + 1) % step == 0) or i + 1 == len(paths):
                logger.info("loaded %d/%d %s", i + 1, len(paths), desc)
    return out[: len(ok)], np.asarray(ok, dtype=int), failures


def write_skip_report(path: str | os.PathLike, failures: Sequence[tuple[str, str]]) -> None:
    """Write ``path,reason`` rows for skipped images (an empty report is still written)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(failures)
