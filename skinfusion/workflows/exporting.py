"""The export workflow: a run's split gives the int8 calibration images and the test images the export is checked on."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.metrics import roc_auc_ci
from skinfusion.data.cache import cached_images
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = 256  # training images int8 calibration sees (a seeded subsample)


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


def export_run(run: str, out: str, fmt: str = "onnx", quantize: str | None = None,
               calibration_images: int = DEFAULT_CALIBRATION, check_test: int = 0, workers: int = 2) -> dict[str, Any]:
    """Export a run (``ensemble.export.export_bundle``), calibrating int8 on its training images.

    Args:
        run, out, fmt, quantize: as for ``export_bundle``.
        calibration_images: how many training images (seeded subsample) calibrate int8.
        check_test: score this many test-split images (0: none) with the Keras bundle and the
            export and record both AUCs under the manifest's ``test_check``.
        workers: decoding threads.

    Returns:
        The export's manifest.
    """
    from ensemble.bundle import _find_bundle
    from colorspaces.files import write_json_atomic
    from ensemble.export import export_bundle
    from ensemble.runtime import MANIFEST_FILE, ExportedEnsemble

    load_size = _load_size(run)
    calibration = None
    if quantize:
        calibration, _, _ = split_images(_find_bundle(Path(run)).parent, "train", load_size, calibration_images,
                                         workers=workers)
        logger.info("calibrating int8 on %d training images", len(calibration))
    manifest = export_bundle(run, out, fmt, quantize, calibration)
    if check_test:
        from ensemble.bundle import load_ensemble

        imgs, y, _ = split_images(_find_bundle(Path(run)).parent, "test", load_size, check_test, seed=1,
                                  workers=workers)
        ref = load_ensemble(run)
        exp = ExportedEnsemble(out)
        p_ref = np.concatenate([ref.score_batch(imgs[i : i + 64])[1] for i in range(0, len(imgs), 64)])
        p_exp = np.concatenate([exp.score_details(imgs[i : i + 64]).fused for i in range(0, len(imgs), 64)])
        manifest["test_check"] = {"images": len(y), "melanoma": int(y.sum()),
                                  "auc_keras": round(roc_auc_ci(y, p_ref)[0], 4),
                                  "auc_export": round(roc_auc_ci(y, p_exp)[0], 4),
                                  "max_abs_proba_diff": float(np.abs(p_ref - p_exp).max())}
        write_json_atomic(Path(out) / MANIFEST_FILE, manifest)
    return manifest


def _load_size(run: str) -> int:
    from ensemble.bundle import _find_bundle, read_manifest

    ens_dir = _find_bundle(Path(run))
    m = read_manifest(ens_dir / "manifest.json", run)
    return int(m.get("load_size", m["image_size"]))
