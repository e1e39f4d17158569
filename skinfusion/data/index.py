"""What a labelled image folder holds: ``Record``, ``DatasetIndex`` and the builder the layouts fill,
the CSV and image-file scanners they share, and loading the images (skipping bad files)."""

from __future__ import annotations

import re

import csv
import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces import ImageError, read_image, resize_image
from colorspaces.files import atomic_open
from colorspaces.image import IMAGE_SUFFIXES
from colorspaces.labels import LABEL_NAMES, LABELS
from colorspaces.lesion import crop_to_lesion

logger = logging.getLogger(__name__)


UNGROUPED_WARNING = "no group_id/lesion_id: images of one lesion may straddle the split"
_SHOWN_MISSING = 3  # how many looked-for paths the summary names


@dataclass(frozen=True)
class Record:
    """One labelled image: id, file path, label (1 = melanoma), lesion group, source and metadata.

    ``age``, ``sex`` and ``site`` are the dataset's metadata as written (``""`` when it has
    none); only metadata fusion (``fuse --metadata``) reads them, through
    ``ensemble.metadata``, which also decides what counts as unknown. ``dx_type`` is how the
    diagnosis was confirmed, one of ``DX_TYPES`` (``dx_type_of`` normalises the dataset's spelling).
    """

    image_id: str
    path: str
    label: int
    group_id: str
    source: str
    age: str = ""
    sex: str = ""
    site: str = ""
    dx_type: str = "unknown"

    def metadata(self) -> dict[str, Any]:
        """``{"age", "sex", "site"}`` of this image, the form metadata fusion takes."""
        return {"age": self.age, "sex": self.sex, "site": self.site}


_SPLIT_SUFFIX = re.compile(r"[_-](train|training|val|valid|validation|test)$", re.IGNORECASE)


def source_family(source: str) -> str:
    """The clinic or collection a source names, without a split suffix: ``ISIC2017_val`` → ``ISIC2017``.

    A challenge's train and validation parts come from the same acquisition, so source balancing
    and leave-one-source-out treat them as one source.
    """
    return _SPLIT_SUFFIX.sub("", source.strip()) or source


#: How a diagnosis was confirmed, one vocabulary for every layout: a biopsy, serial imaging that
#: showed no change (benign by follow-up), expert consensus on one image, reflectance confocal
#: microscopy, or not recorded.
DX_TYPES = ("histopathology", "follow_up", "consensus", "confocal", "unknown")
# Spellings per layout: HAM10000's dx_type (histo, follow_up, consensus, confocal) and the ISIC
# archive's diagnosis_confirm_type ("serial imaging showing no change", "single image expert
# consensus", "confocal microscopy with consensus dermoscopy"), both in lower case.
_DX_SPELLINGS = {
    "histo": "histopathology", "histopathology": "histopathology", "histology": "histopathology",
    "follow_up": "follow_up", "follow-up": "follow_up", "followup": "follow_up",
    "serial imaging showing no change": "follow_up",
    "consensus": "consensus", "single image expert consensus": "consensus",
    "confocal": "confocal", "confocal microscopy with consensus dermoscopy": "confocal",
    "": "unknown", "unknown": "unknown", "na": "unknown", "n/a": "unknown",
}


def dx_type_of(raw: str | None) -> str | None:
    """The ``DX_TYPES`` name of a confirmation type as a dataset writes it (``histo`` → ``histopathology``;
    blank → ``unknown``), or ``None`` for a spelling this vocabulary does not know."""
    return _DX_SPELLINGS.get((raw or "").strip().lower())


@dataclass
class DatasetIndex:
    """The usable records of a folder plus what was left out and why."""

    root: str
    format: str
    records: list[Record]
    skipped_labels: Counter = field(default_factory=Counter)
    missing_files: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)  # the ids of missing_files, in the same order
    grouped: bool = False
    accepted_labels: str = ""  # how the layout spells the labels it uses, named when others are skipped
    label_file: str = ""  # the file the labels come from ("" for class folders), named in errors
    # dx_type spellings that DX_TYPES does not know, counted: those images are "unknown", and said so.
    unread_dx_types: Counter = field(default_factory=Counter)

    def fingerprint(self) -> str:
        """A short hash of (image id, label, file size) over all records; changes when the data does."""
        h = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.image_id):
            size = os.path.getsize(r.path) if os.path.exists(r.path) else -1
            h.update(f"{r.image_id},{r.label},{size}\n".encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """One line: format, counts per class, skipped labels and missing files (with the paths looked for)."""
        n_mel = sum(r.label for r in self.records)
        parts = [f"{self.root}: format '{self.format}', {len(self.records)} images "
                 f"({n_mel} melanoma, {len(self.records) - n_mel} nevus)"]
        if self.skipped_labels:
            accepted = f" (accepted: {self.accepted_labels})" if self.accepted_labels else ""
            parts.append("skipped other labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_labels.items()))
                         + accepted)
        if self.missing_files:
            parts.append(self.missing_summary())
        if self.unread_dx_types:
            parts.append("dx_type not understood, counted as unknown: "
                         + ", ".join(f"{k!r}={v}" for k, v in sorted(self.unread_dx_types.items()))
                         + f" (known: {', '.join(DX_TYPES)}, HAM10000's histo and the ISIC archive's spellings)")
        if not self.grouped:
            parts.append(UNGROUPED_WARNING)
        return "; ".join(parts)

    def missing_summary(self) -> str:
        """``"N listed images missing (looked for A, B, ...)"``, with a hint when the ids carry an image suffix."""
        shown = ", ".join(self.missing_files[:_SHOWN_MISSING]) + (", ..." if len(self.missing_files) > _SHOWN_MISSING else "")
        text = f"{len(self.missing_files)} listed images missing (looked for {shown})"
        # "ISIC_1.png" listed while the file is ISIC_1.jpg (or absent): an id is the file stem.
        suffixed = [i for i in self.missing_ids if os.path.splitext(i)[1].lower() in IMAGE_SUFFIXES]
        if suffixed:
            text += (f"; {len(suffixed)} of these image ids end in a file suffix (e.g. {suffixed[0]}): write each id "
                     "as the file name without its suffix, or make the file it names exist")
        return text

    def class_problem(self) -> str | None:
        """Why this index cannot train a melanoma-vs-nevus model (one class only), or ``None``."""
        present = {r.label for r in self.records}
        if len(present) != 1:
            return None
        (have,) = present
        lacking = LABEL_NAMES[1 - have]
        found = {**{LABEL_NAMES[have]: len(self.records)}, **self.skipped_labels}
        listed = ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
        accepted = f" (accepted: {self.accepted_labels})" if self.accepted_labels else ""
        return (f"{self.root}: only {LABEL_NAMES[have]} images ({len(self.records)}), no {lacking}; "
                f"a melanoma-vs-nevus model needs both classes. Labels found: {listed}{accepted}. "
                f"Add {lacking} images" + (", or correct the labels that were not accepted" if self.skipped_labels else ""))

    def check_both_classes(self) -> None:
        """Refuse an index that lacks melanoma or nevus images, naming what was found and what to do.

        Raises:
            ValueError: if every usable image has the same label.
        """
        problem = self.class_problem()
        if problem:
            raise ValueError(problem)


def _csv_error(path: Path, exc: Exception | None) -> ValueError:
    """A ``ValueError`` naming the file, the encoding it seems to be in and how to re-save it."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff") or exc is None:
        found = "UTF-16 (Excel's 'Unicode Text')"
    elif isinstance(exc, UnicodeDecodeError):
        found = f"Latin-1, Windows-1252 or another 8-bit encoding (byte 0x{exc.object[exc.start]:02x} is not UTF-8)"
    else:
        return ValueError(f"{path}: not a readable CSV file ({exc}); save it as comma-separated UTF-8 text")
    return ValueError(f"{path}: cannot read it as UTF-8 text; it looks like {found}. Re-save it as UTF-8 "
                      "(Excel: 'CSV UTF-8 (comma delimited)'; or `iconv -f LATIN1 -t UTF-8 OLD > NEW`)")


def _open_csv(path: Path):
    # utf-8-sig: a CSV re-saved by Excel starts with a BOM that would otherwise glue itself to the
    # first column name.
    return open(path, newline="", encoding="utf-8-sig")


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV as dicts with stripped keys and values (BOM and over-long rows tolerated).

    Raises:
        ValueError: naming the file and the encoding expected, if it is not UTF-8 text or not CSV.
    """
    try:
        with _open_csv(path) as fh:
            reader = csv.DictReader(fh, restkey="_extra")
            if any("\x00" in name for name in reader.fieldnames or ()):
                raise _csv_error(path, None)  # UTF-16 without a byte-order mark decodes as NUL-riddled "UTF-8"
            # restkey collects the cells of rows longer than the header (e.g. a trailing comma);
            # they belong to no column and are dropped.
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k != "_extra" and isinstance(v, (str, type(None)))}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _csv_error(path, exc) from None


def read_csv_header(path: Path) -> list[str]:
    """The stripped column names of a CSV (``[]`` for an empty file).

    Raises:
        ValueError: naming the file and the encoding expected, if it is not UTF-8 text or not CSV.
    """
    try:
        with _open_csv(path) as fh:
            header = [c.strip() for c in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _csv_error(path, exc) from None
    if any("\x00" in c for c in header):
        raise _csv_error(path, None)
    return header


def find_image_files(folders: Sequence[Path], recursive: bool = False) -> dict[str, str]:
    """Map file stem -> path for the image files in ``folders`` (the first folder wins on a clash).

    Args:
        folders: folders to search; missing ones are ignored.
        recursive: also search every sub-folder.

    Returns:
        ``{stem: path}`` over the files whose extension is in ``IMAGE_SUFFIXES`` (any case).
    """
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
                    if ext.lower() in IMAGE_SUFFIXES:
                        files.setdefault(stem, os.path.join(dirpath, name))
        else:
            with os.scandir(folder) as it:
                for entry in sorted(it, key=lambda e: e.name):
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() in IMAGE_SUFFIXES and entry.is_file():
                        files.setdefault(stem, entry.path)
    return files


class RecordBuilder:
    """Collects one folder's records for a layout, enforcing unique ids and tallying skips and gaps.

    ``index`` is the ``DatasetIndex`` being filled; ``index_dataset`` sets its ``format`` to the
    name of the layout that built it.

    Args:
        root: the dataset folder.
        label_file: the file the labels come from, named in errors (default: the folder).
    """

    def __init__(self, root: Path, label_file: Path | None = None):
        self.index = DatasetIndex(root=str(root), format="", records=[], label_file=str(label_file or ""))
        self.label_file = label_file
        self.seen: set[str] = set()

    def add(self, image_id: str, label: str | None, raw_label: str, path: str | None, expected: Path,
            group_id: str, source: str, meta: dict[str, str] | None = None) -> None:
        """Add one listed image.

        Args:
            image_id: the image's id, unique within the folder.
            label: a class name of ``colorspaces.labels.LABELS``, or ``None`` to count the
                image under ``raw_label`` in ``skipped_labels``.
            raw_label: the diagnosis as the dataset spells it.
            path: the image file, or ``None`` when it is missing (``expected`` is then listed
                in ``missing_files``).
            expected: where the image was looked for.
            group_id: lesion or patient id (the image id when there is none).
            source: where the image comes from.
            meta: ``{"age", "sex", "site", "dx_type"}`` as the dataset writes them.

        Raises:
            ValueError: if ``image_id`` was added before.
        """
        if label is None:
            self.index.skipped_labels[raw_label or "<empty>"] += 1
            return
        if image_id in self.seen:
            raise ValueError(f"{self.label_file or self.index.root}: image_id {image_id} is listed twice")
        self.seen.add(image_id)
        if path is None:
            self.index.missing_files.append(str(expected))
            self.index.missing_ids.append(image_id)
            return
        meta = meta or {}
        dx_type = dx_type_of(meta.get("dx_type"))
        if dx_type is None:
            self.index.unread_dx_types[meta["dx_type"]] += 1
        self.index.records.append(Record(image_id=image_id, path=path, label=LABELS[label],
                                         group_id=group_id or image_id, source=source,
                                         age=meta.get("age", ""), sex=meta.get("sex", ""),
                                         site=meta.get("site", ""), dx_type=dx_type or "unknown"))


# Column names for the metadata fields across formats: this dataset's metadata.csv, the ISIC
# archive (isic-cli) and HAM10000_metadata.csv.
_META_COLUMNS = {"age": ("age", "age_approx"), "sex": ("sex",),
                 "site": ("site", "anatom_site_general", "anatom_site_general_challenge", "localization"),
                 "dx_type": ("dx_type", "diagnosis_confirm_type")}


def row_metadata(row: dict[str, str]) -> dict[str, str]:
    """``{"age", "sex", "site", "dx_type"}`` of one CSV row, from whichever known column is filled (``""`` if none)."""
    return {f: next((row[c] for c in cols if row.get(c)), "") for f, cols in _META_COLUMNS.items()}


def _load_one(path: str, size: int, lesion_margin: float | None = None):
    try:
        image = read_image(path)
        if lesion_margin is not None:
            image = crop_to_lesion(image, lesion_margin)
        return resize_image(image, size), None
    except ImageError as exc:
        return None, str(exc)


def load_images(paths: Sequence[str], size: int, workers: int = 2, desc: str = "images", log_progress: bool = True,
                lesion_margin: float | None = None):
    """Decode and resize images, skipping unreadable ones instead of failing the job.

    Args:
        paths: image files.
        size: output side in pixels.
        workers: decoding threads (OpenCV releases the GIL while decoding).
        desc: what to call the images in progress messages.
        log_progress: log a line every tenth of the way (callers that chunk log their own).
        lesion_margin: if given, crop each image to its lesion first (``colorspaces.lesion.crop_to_lesion``).

    Returns:
        ``(images, ok, failures)``: RGB uint8 (n_ok, size, size, 3), the indices into
        ``paths`` that loaded, and a list of ``(path, reason)`` for the rest.
    """
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok, failures = [], []
    step = max(1, len(paths) // 10)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (img, err) in enumerate(pool.map(lambda p: _load_one(p, size, lesion_margin), paths)):
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
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(failures)
