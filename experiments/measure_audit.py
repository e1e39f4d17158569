"""Measure the artefact detectors against the visual review in an isic-mel-nev ``metadata.csv``.

Usage: ``python -m experiments.measure_audit --data ../shared/data/isic-mel-nev [--sheets /tmp]``
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from colorspaces import read_image
from experiments.common import run_experiment
from skinfusion.cli.common import positive_int
from skinfusion.data.audit import audit_images

# artefact_visual_review value -> audit row column
REVIEW_VALUES = {"colour_disc": "colour_disc", "ink_marking": "ink"}


def load_review(data: Path) -> list[dict[str, str]]:
    """Rows of ``metadata.csv`` with ``image_id``, ``label``, ``source``, ``artefact_visual_review``.

    Args:
        data: the dataset folder holding ``metadata.csv`` and ``images/``.

    Returns:
        The metadata rows, each with an added ``path`` to ``images/<image_id>.jpg``.

    Raises:
        FileNotFoundError: if ``metadata.csv`` is missing.
        KeyError: if it lacks one of the needed columns.
    """
    meta = data / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no such file (expected the isic-mel-nev metadata)")
    with open(meta, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"image_id", "label", "source", "artefact_visual_review"}
    missing = needed - set(rows[0] if rows else ())
    if missing:
        raise KeyError(f"{meta}: missing columns {sorted(missing)}; needs {sorted(needed)}")
    for r in rows:
        r["path"] = str(data / "images" / f"{r['image_id']}.jpg")
    return rows


def confusion(flags: Sequence[bool], truth: Sequence[bool]) -> dict[str, float]:
    """TP/FP/FN counts with precision and recall (``nan`` when undefined).

    Args:
        flags: detector output per image.
        truth: reviewed ground truth per image.

    Returns:
        A dict with ``tp``, ``fp``, ``fn``, ``precision`` and ``recall``.
    """
    f, t = np.asarray(flags, bool), np.asarray(truth, bool)
    tp, fp, fn = int((f & t).sum()), int((f & ~t).sum()), int((~f & t).sum())
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan")}


def write_contact_sheet(paths: Sequence[str], captions: Sequence[str], out: str | os.PathLike,
                        tile: int = 192, cols: int = 6, limit: int = 48) -> None:
    """Write a grid of captioned thumbnails, for looking at detector errors by eye.

    Args:
        paths: image files.
        captions: one caption per image.
        out: the PNG to write.
        tile: thumbnail side in pixels (aspect ratio is not kept).
        cols: thumbnails per row.
        limit: at most this many images.
    """
    tiles = []
    for path, caption in list(zip(paths, captions))[:limit]:
        bgr = cv2.cvtColor(cv2.resize(read_image(path), (tile, tile), interpolation=cv2.INTER_AREA),
                           cv2.COLOR_RGB2BGR)
        cv2.rectangle(bgr, (0, 0), (tile, 14), (0, 0, 0), cv2.FILLED)
        cv2.putText(bgr, caption, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1)
        tiles.append(bgr)
    if not tiles:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    cv2.imwrite(str(out), grid)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both detectors over every reviewed image and print precision and recall.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success, 1 if some images could not be read.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="isic-mel-nev folder (metadata.csv + images/)")
    parser.add_argument("--workers", type=positive_int, default=2, help="threads (default 2)")
    parser.add_argument("--sheets", type=Path, default=None,
                        help="folder for contact sheets of false positives/negatives (e.g. /tmp)")
    parser.add_argument("--out", type=Path, default=None, help="write the per-image audit rows to this CSV")
    args = parser.parse_args(argv)
    return run_experiment(_run, args, parser, tensorflow=False, log_format="%(levelname)s %(name)s: %(message)s")


def _run(args: argparse.Namespace) -> int:
    """Audit the reviewed images, print precision and recall per detector; 1 if some were unreadable."""
    cv2.setNumThreads(1)  # the thread pool is the parallelism; do not oversubscribe the cores

    review = load_review(args.data)
    start = time.perf_counter()
    rows = audit_images([r["path"] for r in review], workers=args.workers)
    seconds = time.perf_counter() - start

    print(f"{len(rows)} images audited in {seconds:.1f} s with {args.workers} threads "
          f"({1000 * seconds / max(len(rows), 1):.2f} ms/image)")
    print(f"{'detector':<12} {'reviewed':>8} {'flagged':>8} {'TP':>5} {'FP':>5} {'FN':>5} "
          f"{'precision':>9} {'recall':>7}")
    for value, column in REVIEW_VALUES.items():
        truth = [r["artefact_visual_review"] == value for r in review]
        flags = [row[column] for row in rows]
        c = confusion(flags, truth)
        print(f"{column:<12} {sum(truth):>8} {sum(flags):>8} {c['tp']:>5} {c['fp']:>5} {c['fn']:>5} "
              f"{c['precision']:>9.3f} {c['recall']:>7.3f}")
        by_label = Counter(r["label"] for r, f in zip(review, flags) if f)
        print(f"{'':<12} flagged per label: " + ", ".join(f"{k}={v}" for k, v in sorted(by_label.items())))
        if args.sheets is not None:
            args.sheets.mkdir(parents=True, exist_ok=True)
            for kind, pick in (("fp", lambda f, t: f and not t), ("fn", lambda f, t: t and not f)):
                chosen = [(r, row) for r, row, f, t in zip(review, rows, flags, truth) if pick(f, t)]
                out = args.sheets / f"{column}_{kind}.png"
                write_contact_sheet([r["path"] for r, _ in chosen],
                                    [f"{r['image_id']} {r['label'][:3]} {row[column + '_score']:.3f}"
                                     for r, row in chosen], out)
                print(f"{'':<12} {kind.upper()} contact sheet: {out} ({len(chosen)} images, first 48 shown)")

    if args.out is not None:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    n_bad = sum(not r["readable"] for r in rows)
    if n_bad:
        print(f"{n_bad} images could not be read")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
