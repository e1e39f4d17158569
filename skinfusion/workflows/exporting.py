"""The export workflow: a run's split gives the int8 calibration images, the int8 gate's images and the test images.

Every image is decoded before ``export_bundle`` writes anything, so a missing dataset or split
fails with the previous export still in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.export import DEFAULT_CALIBRATION
from ensemble.formats import DEFAULT_FORMAT
from ensemble.rundir import MANIFEST_FILE
from skinfusion.data.cache import cached_images
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CALIBRATION", "export_run", "gate_images", "split_images", "split_records"]


def split_records(run: str | os.PathLike, split: str) -> list:
    """The dataset records the run assigned to ``split`` (``train``, ``val`` or ``test``), in dataset order.

    Raises:
        FileNotFoundError: if the run has no split or its dataset folder is gone.
        ValueError: if the dataset changed since the split (its fingerprint differs).
    """
    run = Path(run)
    assign, info = load_split(run)
    data_dir = recorded_data_dir(run, info)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: the run's dataset (recorded in {run / 'split.json'}) is not there; "
                                "int8 calibration needs its training images")
    index = index_dataset(data_dir, log=False)
    if index.fingerprint() != info.get("dataset_fingerprint"):
        raise ValueError(f"{data_dir} changed since {run} was split; its training images are not the ones the "
                         "branches saw, so they cannot calibrate an int8 export")
    return [r for r in index.records if assign.get(r.image_id) == split]


def split_images(run: str | os.PathLike, split: str, size: int, limit: int | None = None, seed: int = 0,
                 workers: int = 2) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images, labels, paths)`` of a seeded subsample of a split, decoded at ``size`` (RGB uint8)."""
    records = split_records(run, split)
    if limit is not None and len(records) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
        records = [records[i] for i in keep]
    if not records:
        raise ValueError(f"{run}: its split has no {split} images")
    paths = [r.path for r in records]
    cache, ok, _ = cached_images(paths, size, workers=workers, desc=f"{split} images")
    imgs = np.asarray(cache[np.arange(len(ok))])
    return imgs, np.array([records[i].label for i in ok]), [paths[i] for i in ok]


def gate_images(run: Path, ens_dir: Path, size: int, workers: int = 2,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """``(train, val)``: the images the run's OOD gate was fitted and thresholded on, decoded at ``size``.

    The selection of ``skinfusion.workflows.fusing.fit_run_gate``: the split's training images
    the branches saw (``held_out_ids.txt`` excluded), at most ``GATE_MAX_TRAIN`` of them (the same
    seeded subsample), and the validation images of the first branch's ``val_predictions.csv``.
    None (with a warning) when fewer than ``MIN_IMAGES`` of either can be read.
    """
    from ensemble.bundle import read_manifest
    from ensemble.ood import MIN_IMAGES
    from skinfusion.workflows.fusing import GATE_MAX_TRAIN, held_out_ids, read_val_predictions

    m = read_manifest(ens_dir / MANIFEST_FILE, run)
    held = held_out_ids(run)
    try:
        val_ids = set(read_val_predictions((ens_dir / m["branches"][0]["path"]).resolve()))
    except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError):
        val_ids = None  # as fit_run_gate: an adapted run keeps no val_predictions.csv
    train = [r.path for r in split_records(run, "train") if r.image_id not in held]
    val = [r.path for r in split_records(run, "val")
           if r.image_id not in held and (val_ids is None or r.image_id in val_ids)]
    if len(train) > GATE_MAX_TRAIN:
        keep = np.random.default_rng(seed).choice(len(train), GATE_MAX_TRAIN, replace=False)
        train = [train[i] for i in sorted(keep)]
    out = []
    for paths, what in ((train, "OOD gate training images"), (val, "validation images")):
        cache, ok, _ = cached_images(paths, size, workers=workers, desc=what) if paths else (None, [], None)
        out.append(np.asarray(cache[np.arange(len(ok))]) if len(ok) else np.zeros((0, size, size, 3), np.uint8))
    if min(len(out[0]), len(out[1])) < MIN_IMAGES:
        logger.warning("the int8 export gets no OOD gate: only %d training and %d validation images of the run "
                       "could be read (it needs %d of each)", len(out[0]), len(out[1]), MIN_IMAGES)
        return None
    return out[0], out[1]


def export_run(run: str, out: str, fmt: str = DEFAULT_FORMAT, quantize: str | None = None,
               calibration_images: int | None = None, check_test: int = 0, workers: int = 2) -> dict[str, Any]:
    """Export a run (``ensemble.export.export_bundle``), calibrating int8 on its training images.

    Args:
        run, out, fmt, quantize: as for ``export_bundle``.
        calibration_images: how many training images (seeded subsample) calibrate int8
            (None: ``DEFAULT_CALIBRATION``); only with ``quantize``.
        check_test: score this many test-split images (0: none) with the Keras bundle and the
            export and record both AUCs under the manifest's ``test_check``.
        workers: decoding threads.

    Returns:
        The export's manifest.

    Raises:
        ValueError: ``calibration_images`` without ``quantize``, and as ``export_bundle``.
    """
    from ensemble.bundle import bundle_dir, read_manifest
    from ensemble.export import export_bundle

    if calibration_images is not None and not quantize:
        raise ValueError("--calibration-images applies to --quantize int8 only; add --quantize int8 or drop it")
    ens_dir = bundle_dir(Path(run))
    run_dir = ens_dir.parent
    load_size = _load_size(run)
    calibration = gate = test = None
    # All images are read before anything is written: a failure here leaves --out as it was.
    if quantize:
        calibration, _, _ = split_images(run_dir, "train", load_size, calibration_images or DEFAULT_CALIBRATION,
                                         workers=workers)
        logger.info("calibrating int8 on %d training images", len(calibration))
        if read_manifest(ens_dir / MANIFEST_FILE, run).get("ood"):
            gate = gate_images(run_dir, ens_dir, load_size, workers)
    if check_test:
        imgs, y, _ = split_images(run_dir, "test", load_size, check_test, seed=1, workers=workers)
        test = (imgs, y)
    return export_bundle(run, out, fmt, quantize, calibration, gate_images=gate, test_images=test)


def _load_size(run: str) -> int:
    from ensemble.bundle import bundle_dir, read_manifest

    ens_dir = bundle_dir(Path(run))
    m = read_manifest(ens_dir / MANIFEST_FILE, run)
    return int(m.get("load_size", m["image_size"]))
