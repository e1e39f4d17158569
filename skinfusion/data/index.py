"""Indexing labelled image folders (four common ISIC layouts) and loading their images, skipping bad files."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from colorspaces import ImageError, read_image, resize_image
from colorspaces.labels import LABELS

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: The layouts ``index_dataset`` recognises, in detection order, with how each is recognised.
FORMATS = {
    "labels.csv": "labels.csv (image_id,label[,source]) + images/, optional metadata.csv with group_id or lesion_id",
    "isic-cli": "an `isic image download` folder: metadata.csv with an isic_id column"
                " + <isic_id>.jpg (here or in images/)",
    "ham10000": "HAM10000_metadata.csv (image_id,dx,lesion_id) + the images in this folder or any sub-folder",
    "class-folders": "sub-folders melanoma/ and nevus/ holding the images (no lesion grouping)",
}

UNGROUPED_WARNING = "no group_id/lesion_id: images of one lesion may straddle the split"


@dataclass(frozen=True)
class Record:
    """One labelled image: id, file path, label (1 = melanoma), lesion group, source and metadata.

    ``age``, ``sex`` and ``site`` are the dataset's metadata as written (``""`` when it has
    none); only metadata fusion (``fuse --metadata``) reads them, through
    ``ensemble.metadata``, which also decides what counts as unknown.
    """

    image_id: str
    path: str
    label: int
    group_id: str
    source: str
    age: str = ""
    sex: str = ""
    site: str = ""

    def metadata(self) -> dict[str, Any]:
        """``{"age", "sex", "site"}`` of this image, the form metadata fusion takes."""
        return {"age": self.age, "sex": self.sex, "site": self.site}


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
            parts.append(UNGROUPED_WARNING)
        return "; ".join(parts)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV as dicts with stripped keys and values (BOM and over-long rows tolerated)."""
    # utf-8-sig: a CSV re-saved by Excel starts with a BOM that would otherwise glue itself
    # to the first column name.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        # restkey collects the cells of rows longer than the header (e.g. a trailing comma);
        # they belong to no column and are dropped.
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k != "_extra" and isinstance(v, (str, type(None)))}
                for row in csv.DictReader(fh, restkey="_extra")]


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [c.strip() for c in next(csv.reader(fh), [])]


def _image_files(folders: Sequence[Path], recursive: bool = False) -> dict[str, str]:
    """Map file stem -> path for the image files in ``folders`` (the first folder wins on a clash)."""
    files: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        if recursive:
            # Sorted walk, so that which copy wins when a download holds the same image twice
            # (Kaggle's HAM10000 mirror nests a second copy of each part) is reproducible.
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for name in sorted(filenames):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in IMAGE_EXTENSIONS:
                        files.setdefault(stem, os.path.join(dirpath, name))
        else:
            with os.scandir(folder) as it:
                for entry in sorted(it, key=lambda e: e.name):
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() in IMAGE_EXTENSIONS and entry.is_file():
                        files.setdefault(stem, entry.path)
    return files


def _class_dirs(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}


def _ham_metadata(root: Path) -> Path | None:
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name.lower() == "ham10000_metadata.csv":
            return p
    return None


def detect_format(root: str | os.PathLike) -> str:
    """Name the layout of a dataset folder.

    Detection order: ``labels.csv`` (``labels.csv`` + ``images/``), ``isic-cli``
    (``metadata.csv`` with an ``isic_id`` column), ``ham10000`` (``HAM10000_metadata.csv``),
    ``class-folders`` (``melanoma/`` and ``nevus/`` sub-folders). See ``FORMATS``.

    Args:
        root: the dataset folder.

    Returns:
        One of the keys of ``FORMATS``.

    Raises:
        FileNotFoundError: if the folder does not exist, or matches none of the layouts
            (the message lists the four accepted layouts).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        return "labels.csv"
    if (root / "metadata.csv").is_file() and "isic_id" in _csv_header(root / "metadata.csv"):
        return "isic-cli"
    if _ham_metadata(root) is not None:
        return "ham10000"
    if {"melanoma", "nevus"} <= set(_class_dirs(root)):
        return "class-folders"
    hint = ""
    if (root / "labels.csv").is_file():
        hint = " (found labels.csv but no images/ folder)"
    elif (root / "metadata.csv").is_file():
        hint = " (found metadata.csv but it has no isic_id column)"
    layouts = "\n".join(f"  - {name}: {how}" for name, how in FORMATS.items())
    raise FileNotFoundError(
        f"{root}: not a recognised dataset folder{hint}. Expected one of these layouts:\n{layouts}\n"
        "See README 'Data'."
    )


def index_dataset(root: str | os.PathLike) -> DatasetIndex:
    """Index a labelled image folder, detecting its layout (see ``detect_format``).

    Every layout yields melanoma (label 1) and nevus (label 0) records; other diagnoses are
    counted in ``skipped_labels`` and listed images that are absent go to ``missing_files``.
    Files that exist but cannot be decoded are found later, by ``load_images``. When the
    layout has no lesion or patient ids, ``grouped`` is False and a warning is logged: images
    of one lesion may then land on both sides of the split.

    Args:
        root: the dataset folder.

    Returns:
        A ``DatasetIndex`` whose ``format`` names the detected layout.

    Raises:
        FileNotFoundError: if the folder is missing or matches no known layout.
        ValueError: if a label file lacks its columns, lists an image twice, or no usable
            melanoma/nevus image remains.
    """
    root = Path(root)
    fmt = detect_format(root)
    index = _INDEXERS[fmt](root)
    if not index.records:
        raise ValueError(f"{root}: no usable melanoma/nevus images found (format '{fmt}'; {index.summary()})")
    if not index.grouped:
        logger.warning("%s: %s", root, UNGROUPED_WARNING)
    logger.info("%s", index.summary())
    return index


class _Builder:
    """Collects records for one folder, enforcing unique ids and tallying skips and gaps."""

    def __init__(self, root: Path, fmt: str, label_file: Path | None = None):
        self.index = DatasetIndex(root=str(root), format=fmt, records=[])
        self.label_file = label_file
        self.seen: set[str] = set()

    def add(self, image_id: str, label: str | None, raw_label: str, path: str | None, expected: Path,
            group_id: str, source: str, meta: dict[str, str] | None = None) -> None:
        if label is None:
            self.index.skipped_labels[raw_label or "<empty>"] += 1
            return
        if image_id in self.seen:
            raise ValueError(f"{self.label_file or self.index.root}: image_id {image_id} is listed twice")
        self.seen.add(image_id)
        if path is None:
            self.index.missing_files.append(str(expected))
            return
        meta = meta or {}
        self.index.records.append(Record(image_id=image_id, path=path, label=LABELS[label],
                                         group_id=group_id or image_id, source=source,
                                         age=meta.get("age", ""), sex=meta.get("sex", ""),
                                         site=meta.get("site", "")))


# Column names for the metadata fields across formats: this dataset's metadata.csv, the ISIC
# archive (isic-cli) and HAM10000_metadata.csv.
_META_COLUMNS = {"age": ("age", "age_approx"), "sex": ("sex",),
                 "site": ("site", "anatom_site_general", "anatom_site_general_challenge", "localization")}


def _row_metadata(row: dict[str, str]) -> dict[str, str]:
    return {f: next((row[c] for c in cols if row.get(c)), "") for f, cols in _META_COLUMNS.items()}


def _index_labels_csv(root: Path) -> DatasetIndex:
    labels_path, images_dir = root / "labels.csv", root / "images"
    rows = read_csv_rows(labels_path)
    if not rows or not {"image_id", "label"} <= set(rows[0]):
        raise ValueError(f"{labels_path}: needs columns image_id,label")
    groups, sources, metas = {}, {}, {}
    meta_path = root / "metadata.csv"
    if meta_path.is_file():
        for m in read_csv_rows(meta_path):
            key = m.get("image_id") or m.get("isic_id")
            gid = m.get("group_id") or m.get("lesion_id")
            if key and gid:
                groups[key] = gid
            if key and m.get("source"):
                sources[key] = m["source"]
            if key:
                metas[key] = _row_metadata(m)
    files = _image_files([images_dir])
    b = _Builder(root, "labels.csv", labels_path)
    b.index.grouped = bool(groups)
    for row in rows:
        image_id, raw = row["image_id"], row["label"].lower()
        b.add(image_id, raw if raw in LABELS else None, raw, files.get(image_id), images_dir / f"{image_id}.jpg",
              groups.get(image_id, image_id), row.get("source") or sources.get(image_id) or "unknown",
              {**metas.get(image_id, {}), **{k: v for k, v in _row_metadata(row).items() if v}})
    return b.index


_MELANOMA = re.compile(r"\bmelanoma\b", re.IGNORECASE)


def isic_label(row: dict[str, str]) -> tuple[str | None, str]:
    """Map one ISIC archive metadata row to ``melanoma``, ``nevus`` or ``None`` (skipped).

    The hierarchical ``diagnosis_1``/``diagnosis_2``/``diagnosis_3`` columns are used when
    any of them is filled, otherwise the older flat ``diagnosis`` column.

    * Melanoma: any of ``diagnosis_1..3`` contains the word "melanoma", i.e.
      ``diagnosis_2`` = "Malignant melanocytic proliferations (Melanoma)" with ``diagnosis_3``
      "Melanoma Invasive", "Melanoma in situ", "Melanoma, NOS" or "Melanoma metastasis"
      (a metastasis is still melanoma). Old schema: ``melanoma`` or ``melanoma metastasis``.
      "Melanocytoma" and "melanocytic" do not match the word.
    * Nevus: ``diagnosis_2`` = "Benign melanocytic proliferations" and ``diagnosis_3`` =
      "Nevus", whatever its ``diagnosis_4`` subtype (blue, Spitz, Reed, congenital, halo,
      combined, atypical/dysplastic/Clark, acral, ...): all are benign melanocytic nevi, the
      negative class a melanoma-vs-nevus model must separate from melanoma. A ``diagnosis_3``
      that itself contains "nevus" under that ``diagnosis_2`` counts too. Old schema: ``nevus``.
    * Skipped, although some names contain "nevus": the other benign melanocytic
      proliferations (dermal melanocytosis incl. nevus of Ota/Ito, lentigo simplex,
      pigmented epithelioid melanocytoma, proliferative nodule in a congenital nevus), the
      indeterminate melanocytic ones (atypical Spitz tumour, AIMP, MELTUMP, atypical nodules
      in a congenital nevus) and non-melanocytic "nevi" (epidermal, sebaceus, comedonicus,
      lipomatous, anemicus): they are not the ordinary nevi the task is about, and the
      indeterminate ones have no reliable benign/malignant label. A row with only
      ``diagnosis_2`` = "Benign melanocytic proliferations" is skipped as unspecified.

    Args:
        row: one ``metadata.csv`` row (column name -> value).

    Returns:
        ``(label, raw)``: the label (or ``None``) and the raw diagnosis it was read from,
        the most specific filled level, used to count skipped rows.
    """
    levels = [row.get(f"diagnosis_{k}", "") or "" for k in (1, 2, 3)]
    if any(levels):
        raw = next(v for v in reversed(levels) if v)
        if any(_MELANOMA.search(v) for v in levels):
            return "melanoma", raw
        d2, d3 = levels[1].lower(), levels[2].lower()
        if d2 == "benign melanocytic proliferations" and re.search(r"\bnevus\b", d3):
            return "nevus", raw
        return None, raw
    raw = (row.get("diagnosis") or "").strip()
    d = raw.lower()
    if d in ("melanoma", "melanoma metastasis"):
        return "melanoma", raw
    if d == "nevus":
        return "nevus", raw
    return None, raw


def _index_isic_cli(root: Path) -> DatasetIndex:
    meta_path = root / "metadata.csv"
    rows = read_csv_rows(meta_path)
    columns = set(rows[0]) if rows else set(_csv_header(meta_path))
    if not {"diagnosis", "diagnosis_1", "diagnosis_2", "diagnosis_3"} & columns:
        raise ValueError(f"{meta_path}: needs a diagnosis column (diagnosis, or diagnosis_1/diagnosis_2/diagnosis_3)")
    files = _image_files([root, root / "images"])
    b = _Builder(root, "isic-cli", meta_path)
    # patient_id first: it is coarser than lesion_id but leak-free even when only some of a
    # patient's images carry a lesion_id (grouping row by row on "lesion_id or patient_id"
    # would split such a patient across groups).
    b.index.grouped = any(r.get("lesion_id") or r.get("patient_id") for r in rows)
    for row in rows:
        image_id = row["isic_id"]
        if not image_id:
            b.index.skipped_labels["<no isic_id>"] += 1
            continue
        label, raw = isic_label(row)
        b.add(image_id, label, raw, files.get(image_id), root / f"{image_id}.jpg",
              row.get("patient_id") or row.get("lesion_id") or image_id, row.get("attribution") or "isic-cli",
              _row_metadata(row))
    return b.index


HAM_DX = {"mel": "melanoma", "nv": "nevus"}


def _index_ham10000(root: Path) -> DatasetIndex:
    meta_path = _ham_metadata(root)
    rows = read_csv_rows(meta_path)
    if not rows or not {"image_id", "dx"} <= set(rows[0]):
        raise ValueError(f"{meta_path}: needs columns image_id,dx (and lesion_id)")
    # The images come in HAM10000_images_part_1/ and _part_2/ (or flattened); any
    # sub-folder is searched so that every mirror's layout works.
    files = _image_files([root], recursive=True)
    b = _Builder(root, "ham10000", meta_path)
    b.index.grouped = any(r.get("lesion_id") for r in rows)
    for row in rows:
        image_id, dx = row["image_id"], row["dx"].lower()
        b.add(image_id, HAM_DX.get(dx), dx, files.get(image_id), root / f"{image_id}.jpg",
              row.get("lesion_id") or image_id, "HAM10000", _row_metadata(row))
    return b.index


def _index_class_folders(root: Path) -> DatasetIndex:
    b = _Builder(root, "class-folders")
    for name, folder in _class_dirs(root).items():
        files = _image_files([folder], recursive=True)
        if name not in LABELS:
            if files:
                b.index.skipped_labels[name] += len(files)
            continue
        for image_id, path in sorted(files.items()):
            if image_id in b.seen:
                raise ValueError(f"{root}: image {image_id} is in both melanoma/ and nevus/")
            b.add(image_id, name, name, path, Path(path), image_id, "class-folders")
    return b.index


_INDEXERS: dict[str, Callable[[Path], DatasetIndex]] = {
    "labels.csv": _index_labels_csv,
    "isic-cli": _index_isic_cli,
    "ham10000": _index_ham10000,
    "class-folders": _index_class_folders,
}


def _load_one(path: str, size: int):
    try:
        return resize_image(read_image(path), size), None
    except ImageError as exc:
        return None, str(exc)


def load_images(paths: Sequence[str], size: int, workers: int = 2, desc: str = "images", log_progress: bool = True):
    """Decode and resize images, skipping unreadable ones instead of failing the job.

    Args:
        paths: image files.
        size: output side in pixels.
        workers: decoding threads (OpenCV releases the GIL while decoding).
        desc: what to call the images in progress messages.
        log_progress: log a line every tenth of the way (callers that chunk log their own).

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
            if log_progress and ((len(paths) >= 500 and (i + 1) % step == 0) or i + 1 == len(paths)):
                logger.info("loaded %d/%d %s", i + 1, len(paths), desc)
    return out[: len(ok)], np.asarray(ok, dtype=int), failures


def write_skip_report(path: str | os.PathLike, failures: Sequence[tuple[str, str]]) -> None:
    """Write ``path,reason`` rows for skipped images (an empty report is still written)."""
    from colorspaces.files import atomic_open

    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(failures)
