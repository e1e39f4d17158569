"""Dataset layouts: one registry of (name, description, detect, index) and the detection and
indexing that walk it. Supporting a new layout is one more entry of ``LAYOUTS``."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from colorspaces.image import IMAGE_SUFFIXES
from colorspaces.labels import CLASSES, LABELS
from skinfusion.data.index import (
    DatasetIndex,
    RecordBuilder,
    find_image_files,
    read_csv_header,
    read_csv_rows,
    row_metadata,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """One dataset layout: how to recognise a folder in it and how to index one.

    Attributes:
        name: the layout's name, recorded as ``DatasetIndex.format`` and logged.
        description: what a folder in this layout holds, listed when a folder matches none.
        detect: ``detect(root) -> bool``; True when ``root`` is in this layout. It looks at
            file names and CSV headers only, so that trying every layout stays cheap.
        index: ``index(root) -> DatasetIndex`` of a folder that ``detect`` accepted.
        near_miss: optional ``near_miss(root) -> str | None``: a hint for a folder that almost
            is in this layout (shown when no layout matches).
        labels: the labels this layout accepts, as a user writes them; named next to the
            labels it skipped, so that "MEL" or "benign" can be corrected.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    index: Callable[[Path], DatasetIndex]
    near_miss: Callable[[Path], str | None] | None = None
    labels: str = ""


# --- labels.csv + images/ ---------------------------------------------------------------------

def _is_labels_csv(root: Path) -> bool:
    return (root / "labels.csv").is_file() and (root / "images").is_dir()


def _labels_csv_near_miss(root: Path) -> str | None:
    return "found labels.csv but no images/ folder" if (root / "labels.csv").is_file() else None


def _image_file(files: dict[str, str], images_dir: Path, image_id: str) -> tuple[str, str | None, Path]:
    """``(id, file or None, path looked for)`` of one labels.csv id.

    An id is the file name without its suffix. An id written with one (``ISIC_1.jpg``) is
    accepted when exactly that file exists, and becomes its stem: the file it names is
    unambiguous, and the stem is the id every other layout, ``predict --metadata`` and the ISIC
    challenge CSV use. An id whose suffix names no file (``ISIC_1.png`` beside ``ISIC_1.jpg``)
    is not guessed at; it is reported missing, as written, with a hint.
    """
    if image_id in files:
        return image_id, files[image_id], images_dir / f"{image_id}.jpg"
    stem, suffix = os.path.splitext(image_id)
    named = images_dir / image_id
    if suffix.lower() in IMAGE_SUFFIXES and named.is_file():
        return stem, str(named), named
    return image_id, None, named if suffix.lower() in IMAGE_SUFFIXES else images_dir / f"{image_id}.jpg"


def _index_labels_csv(root: Path) -> DatasetIndex:
    labels_path, images_dir = root / "labels.csv", root / "images"
    rows = read_csv_rows(labels_path)
    if not rows or not {"image_id", "label"} <= set(rows[0]):
        found = sorted(rows[0]) if rows else read_csv_header(labels_path)
        raise ValueError(f"{labels_path}: needs columns image_id,label (found {found or 'no rows'}); "
                         "write a header line image_id,label[,source] and one row per image")
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
                metas[key] = row_metadata(m)
    files = find_image_files([images_dir])
    b = RecordBuilder(root, labels_path)
    b.index.grouped = bool(groups)
    for row in rows:
        raw = row["label"].lower()
        image_id, path, expected = _image_file(files, images_dir, row["image_id"])
        # metadata.csv may spell the id either way, like labels.csv.
        key = row["image_id"] if row["image_id"] in groups or row["image_id"] in metas else image_id
        b.add(image_id, raw if raw in LABELS else None, row["label"], path, expected,
              groups.get(key, image_id), row.get("source") or sources.get(key) or "unknown",
              {**metas.get(key, {}), **{k: v for k, v in row_metadata(row).items() if v}})
    return b.index


# --- isic-cli (`isic image download`) ---------------------------------------------------------

def _is_isic_cli(root: Path) -> bool:
    return (root / "metadata.csv").is_file() and "isic_id" in read_csv_header(root / "metadata.csv")


def _isic_cli_near_miss(root: Path) -> str | None:
    return "found metadata.csv but it has no isic_id column" if (root / "metadata.csv").is_file() else None


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


def _isic_groups(rows: list[dict[str, str]]) -> dict[str, str]:
    """``{isic_id: group}``: images that share a patient_id or a lesion_id, directly or through a chain.

    A lesion belongs to one patient, so grouping by patient_id is coarser than by lesion_id and
    also keeps a patient's other lesions (same skin, same camera) on one side of the split.
    Neither id alone is enough: an archive row may carry a lesion_id without a patient_id, so
    grouping row by row on "patient_id, else lesion_id" would put such an image in another group
    than its sibling that carries both, and the two photos of one lesion could straddle the
    split. Linking both ids (union-find) closes that gap. A group is named after its patient (the smallest, should ids ever
    conflict), else its lesion, else the image.
    """
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:  # the better name (see _root_rank) becomes the root, so it names the group
            parent[max(ra, rb, key=_root_rank)] = min(ra, rb, key=_root_rank)

    for row in rows:
        keys = [f"{kind}:{row[col]}" for kind, col in (("p", "patient_id"), ("l", "lesion_id")) if row.get(col)]
        if row.get("isic_id"):
            keys.append(f"i:{row['isic_id']}")
        for k in keys[1:]:
            union(keys[0], k)
    return {k[2:]: find(k)[2:] for k in list(parent) if k.startswith("i:")}


def _root_rank(key: str) -> tuple[int, str]:
    # A patient names a group before a lesion, a lesion before an image; ties go to the smaller id.
    return ("pli".index(key[0]), key[2:])


def _index_isic_cli(root: Path) -> DatasetIndex:
    meta_path = root / "metadata.csv"
    rows = read_csv_rows(meta_path)
    columns = set(rows[0]) if rows else set(read_csv_header(meta_path))
    if not {"diagnosis", "diagnosis_1", "diagnosis_2", "diagnosis_3"} & columns:
        raise ValueError(f"{meta_path}: needs a diagnosis column (diagnosis, or diagnosis_1/diagnosis_2/diagnosis_3)")
    files = find_image_files([root, root / "images"])
    b = RecordBuilder(root, meta_path)
    b.index.grouped = any(r.get("lesion_id") or r.get("patient_id") for r in rows)
    # Patient first, lesion ids linked in: the safest grouping against leakage (see _isic_groups).
    groups = _isic_groups(rows)
    for row in rows:
        image_id = row["isic_id"]
        if not image_id:
            b.index.skipped_labels["<no isic_id>"] += 1
            continue
        label, raw = isic_label(row)
        b.add(image_id, label, raw, files.get(image_id), root / f"{image_id}.jpg",
              groups.get(image_id, image_id), row.get("attribution") or "isic-cli", row_metadata(row))
    return b.index


# --- HAM10000 ---------------------------------------------------------------------------------

HAM_DX = {"mel": "melanoma", "nv": "nevus"}


def _ham_metadata(root: Path) -> Path | None:
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name.lower() == "ham10000_metadata.csv":
            return p
    return None


def _is_ham10000(root: Path) -> bool:
    return _ham_metadata(root) is not None


def _index_ham10000(root: Path) -> DatasetIndex:
    meta_path = _ham_metadata(root)
    rows = read_csv_rows(meta_path)
    if not rows or not {"image_id", "dx"} <= set(rows[0]):
        raise ValueError(f"{meta_path}: needs columns image_id,dx (and lesion_id)")
    # The images come in HAM10000_images_part_1/ and _part_2/ (or flattened); any
    # sub-folder is searched so that every mirror's layout works.
    files = find_image_files([root], recursive=True)
    b = RecordBuilder(root, meta_path)
    b.index.grouped = any(r.get("lesion_id") for r in rows)
    for row in rows:
        image_id, dx = row["image_id"], row["dx"].lower()
        b.add(image_id, HAM_DX.get(dx), dx, files.get(image_id), root / f"{image_id}.jpg",
              row.get("lesion_id") or image_id, "HAM10000", row_metadata(row))
    return b.index


# --- class folders ----------------------------------------------------------------------------

def _class_dirs(root: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}


def _is_class_folders(root: Path) -> bool:
    return set(CLASSES) <= set(_class_dirs(root))


def _index_class_folders(root: Path) -> DatasetIndex:
    b = RecordBuilder(root)
    for name, folder in _class_dirs(root).items():
        files = find_image_files([folder], recursive=True)
        if name not in LABELS:
            if files:
                b.index.skipped_labels[name] += len(files)
            continue
        for image_id, path in sorted(files.items()):
            if image_id in b.seen:
                raise ValueError(f"{root}: image {image_id} is in both melanoma/ and nevus/")
            b.add(image_id, name, name, path, Path(path), image_id, "class-folders")
    return b.index


# --- the registry -----------------------------------------------------------------------------

#: Every layout ``index_dataset`` recognises, in detection order: the first whose ``detect``
#: accepts a folder indexes it.
LAYOUTS: tuple[Layout, ...] = (
    Layout("labels.csv",
           "labels.csv (image_id,label[,source]) + images/, optional metadata.csv with group_id or lesion_id",
           _is_labels_csv, _index_labels_csv, _labels_csv_near_miss,
           labels="label melanoma or nevus, in any case"),
    Layout("isic-cli",
           "an `isic image download` folder: metadata.csv with an isic_id column + <isic_id>.jpg (here or in images/)",
           _is_isic_cli, _index_isic_cli, _isic_cli_near_miss,
           labels="melanoma and nevus diagnoses, as skinfusion.data.layouts.isic_label maps them"),
    Layout("ham10000",
           "HAM10000_metadata.csv (image_id,dx,lesion_id) + the images in this folder or any sub-folder",
           _is_ham10000, _index_ham10000, labels="dx mel or nv"),
    Layout("class-folders",
           "sub-folders melanoma/ and nevus/ holding the images (no lesion grouping)",
           _is_class_folders, _index_class_folders, labels="folders melanoma/ and nevus/"),
)


def find_layout(root: str | os.PathLike) -> Layout:
    """The first entry of ``LAYOUTS`` that accepts a dataset folder.

    Args:
        root: the dataset folder.

    Returns:
        The matching ``Layout``.

    Raises:
        FileNotFoundError: if the folder does not exist, or matches no layout (the message
            lists every registered layout, with a hint when the folder almost matches one).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    for layout in LAYOUTS:
        if layout.detect(root):
            return layout
    hint = next((h for h in (lay.near_miss(root) for lay in LAYOUTS if lay.near_miss) if h), None)
    listed = "\n".join(f"  - {lay.name}: {lay.description}" for lay in LAYOUTS)
    raise FileNotFoundError(
        f"{root}: not a recognised dataset folder{f' ({hint})' if hint else ''}. "
        f"Expected one of these layouts:\n{listed}\nSee docs/data.md."
    )


def detect_format(root: str | os.PathLike) -> str:
    """Name the layout of a dataset folder (see ``find_layout``).

    Args:
        root: the dataset folder.

    Returns:
        The ``name`` of the first entry of ``LAYOUTS`` that accepts it.

    Raises:
        FileNotFoundError: if the folder is missing or matches no registered layout.
    """
    return find_layout(root).name


# (folder, fingerprint) pairs whose summary this process has logged: a command that indexes its
# dataset in several places (the split, each branch, the fusion) reports it once.
_SUMMARISED: set[tuple[str, str]] = set()


def index_dataset(root: str | os.PathLike, log: bool = True) -> DatasetIndex:
    """Index a labelled image folder with the first registered layout that accepts it.

    Every layout yields melanoma (label 1) and nevus (label 0) records; other diagnoses are
    counted in ``skipped_labels`` and listed images that are absent go to ``missing_files``.
    Files that exist but cannot be decoded are found later, by ``load_images``. When the
    layout has no lesion or patient ids, ``grouped`` is False: images of one lesion may then
    land on both sides of the split.

    The summary (``DatasetIndex.summary``) is logged once per folder and content per process,
    as a warning when it reports missing files or no grouping. A folder with one class only is
    indexed (it can be audited or scored); ``DatasetIndex.check_both_classes`` refuses it where
    both classes are needed.

    Args:
        root: the dataset folder.
        log: log the summary (off for a look-up that is not the command's dataset).

    Returns:
        A ``DatasetIndex`` whose ``format`` names the layout.

    Raises:
        FileNotFoundError: if the folder is missing or matches no registered layout.
        ValueError: if a label file is not UTF-8 CSV or lacks its columns, lists an image
            twice, or no usable melanoma/nevus image remains.
    """
    root = Path(root)
    layout = find_layout(root)
    index = layout.index(root)
    index.format = layout.name  # the registry entry names the layout; its indexer need not repeat it
    index.accepted_labels = layout.labels
    if not index.records:
        what = []
        if index.skipped_labels:
            what.append(f"use the accepted labels ({layout.labels})")
        if index.missing_files:
            what.append("put the listed images where they were looked for")
        raise ValueError(f"{index.label_file or root}: no usable melanoma/nevus images found "
                         f"(format '{layout.name}'; {index.summary()})"
                         + (f"; {' and '.join(what)}" if what else ""))
    key = (str(root.resolve()), index.fingerprint())
    if log and key not in _SUMMARISED:
        _SUMMARISED.add(key)
        worrying = index.missing_files or not index.grouped or index.class_problem() or index.unread_dx_types
        logger.log(logging.WARNING if worrying else logging.INFO, "%s", index.summary())
    return index
