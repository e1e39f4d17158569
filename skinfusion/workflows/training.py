"""The train workflow: train branches on a run's split, one after another or in parallel processes."""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
from joblib import Parallel, delayed

from colorspaces.files import atomic_open
from ensemble.bundle import sha256_file
from ensemble.metrics import binary_report, choose_threshold
from models import BranchConfig, load_branch, predict_images_proba, save_branch
from models.store import read_branch_info
from models.train import fit_branch
from skinfusion.data.cache import cached_images
from skinfusion.data.index import source_family, write_skip_report
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir
from skinfusion.workflows.resources import bound_allocator, peak_rss_mb
from skinfusion.workflows.runlock import run_lock
from skinfusion.workflows.runsplit import prepare_split

logger = logging.getLogger(__name__)


def train_branch_run(data_dir: str, run_dir: str, config: BranchConfig, split_seed: int = 0,
                     limit: int | None = None, workers: int = 2,
                     exclude_ids: set[str] | None = None, dedup: bool = False,
                     cache_dir: str | None = None, resume: bool = False,
                     holdout_ids: set[str] | None = None) -> dict[str, Any]:
    """Train one branch on the run's split and save it to ``RUN/branches/<view>/``.

    Writes ``model.keras``, ``config.json``, ``metadata.json``, ``val_predictions.csv`` and
    ``skipped.csv`` (unreadable images). ``exclude_ids`` (e.g. artefact-flagged images) are
    dropped from the training images only; validation and test keep them, so metrics stay
    comparable between runs with and without the exclusion. Decoded images go to the disk
    cache in ``cache_dir`` (default ``$SKINFUSION_CACHE`` or ``~/.cache/skinfusion``).

    Every epoch is checkpointed in ``RUN/branches/<view>/.checkpoint/`` (removed once the
    branch is saved). With ``resume``, an interrupted branch continues from its last
    complete epoch, and a branch that already finished with the same config is kept as is.

    Returns:
        A summary dict: validation metrics, train seconds, skipped count, branch directory.

    Raises:
        RunLockedError: if another process is writing the run.
    """
    with run_lock(run_dir, f"skinfusion train --view {config.view}"):
        return _train_branch_run(data_dir, run_dir, config, split_seed, limit, workers, exclude_ids, dedup,
                                 cache_dir, resume, holdout_ids)


def _train_branch_run(data_dir, run_dir, config, split_seed, limit, workers, exclude_ids, dedup, cache_dir,
                      resume, holdout_ids=None) -> dict[str, Any]:
    bound_allocator()
    index, assign, info = prepare_split(data_dir, run_dir, split_seed, limit, dedup=dedup)
    recs = {s: [r for r in index.records if assign[r.image_id] == s] for s in ("train", "val")}
    n_excluded = n_held_out = 0
    if holdout_ids:
        for s in recs:
            kept = [r for r in recs[s] if r.image_id not in holdout_ids]
            n_held_out += len(recs[s]) - len(kept)
            recs[s] = kept
        logger.info("[%s] held out %d images from training and validation", config.view, n_held_out)
        # Recorded for the run, so fuse fits the OOD gate on the same images the branches saw.
        with atomic_open(Path(run_dir) / "held_out_ids.txt", "w") as fh:
            fh.write("".join(f"{i}\n" for i in sorted(holdout_ids)))
    if exclude_ids:
        kept = [r for r in recs["train"] if r.image_id not in exclude_ids]
        n_excluded = len(recs["train"]) - len(kept)
        recs["train"] = kept
        logger.info("[%s] excluded %d flagged images from training", config.view, n_excluded)
    branch_dir = Path(run_dir) / "branches" / config.view
    branch_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = branch_dir / ".checkpoint"
    if resume and not (checkpoint / "state.json").is_file() and (branch_dir / "metadata.json").is_file():
        saved_config, meta = read_branch_info(branch_dir)
        if saved_config == config:
            logger.info("[%s] already trained in %s; nothing to resume", config.view, branch_dir)
            return {"view": config.view, "branch_dir": str(branch_dir), "validation": meta["validation_metrics"],
                    "train_seconds": meta["training"]["train_seconds"], "skipped": meta.get("skipped_images", 0),
                    "peak_rss_mb": meta["training"].get("peak_rss_mb", float("nan"))}
    if not resume and (checkpoint / "state.json").is_file():
        logger.warning("[%s] %s holds an interrupted training; starting again (pass --resume to continue it)",
                       config.view, checkpoint)
    loaded, failures = {}, []
    for s, rs in recs.items():
        # Decoded once into the disk cache; every branch and later run on these files reuses it,
        # and training streams it batch by batch, so memory does not grow with the dataset.
        imgs, ok, fails = cached_images([r.path for r in rs], config.load_size, cache_dir=cache_dir,
                                        workers=workers, desc=f"{s} images")
        loaded[s] = (imgs, np.array([rs[i].label for i in ok]), [rs[i] for i in ok])
        failures += fails
    missing = [(p, "listed in the labels but the file is missing") for p in index.missing_files]
    write_skip_report(branch_dir / "skipped.csv", failures + missing)
    if failures:
        logger.warning("%d unreadable images skipped; see %s", len(failures), branch_dir / "skipped.csv")

    model, history = fit_branch(config, loaded["train"][0], loaded["train"][1], loaded["val"][0], loaded["val"][1],
                                checkpoint_dir=checkpoint, resume=resume,
                                train_sources=[source_family(r.source) for r in loaded["train"][2]])
    history["peak_rss_mb"] = peak_rss_mb()
    val_imgs, y_val, val_recs = loaded["val"]
    proba = predict_images_proba(model, config.view, val_imgs, constancy=config.color_constancy,
                                 crop_stride=config.crop_stride)
    threshold = choose_threshold(y_val, proba)
    val_metrics = binary_report(y_val, proba, threshold)
    with atomic_open(branch_dir / "val_predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label", "melanoma_proba"])
        w.writerows((r.image_id, r.label, f"{p:.6f}") for r, p in zip(val_recs, proba))
    save_branch(branch_dir, model, config, {
        "split_seed": info.get("split_seed"),
        # Which split exactly: fuse refuses branches whose splits differ (seed and data alone can agree).
        "split_sha256": sha256_file(Path(run_dir) / "splits.csv"),
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_dir": info.get("data_dir"),
        "validation_metrics": val_metrics,
        "training": {k: v for k, v in history.items() if k != "per_epoch"},
        "history": history["per_epoch"],
        "skipped_images": len(failures),
        "excluded_from_training": n_excluded,
        "held_out_from_training_and_validation": n_held_out,
    })
    shutil.rmtree(checkpoint, ignore_errors=True)  # the branch is saved; nothing left to resume
    logger.info("[%s] saved to %s; validation AUC %.4f; peak RSS %.0f MB", config.view, branch_dir,
                val_metrics["auc"], history["peak_rss_mb"])
    return {"view": config.view, "branch_dir": str(branch_dir), "validation": val_metrics,
            "train_seconds": history["train_seconds"], "skipped": len(failures),
            "peak_rss_mb": history["peak_rss_mb"]}


def _train_in_worker(threads: int, log_level: int, *args, **kwargs) -> dict[str, Any]:
    # Runs in a fresh joblib worker process: split the cores before TensorFlow starts.
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return train_branch_run(*args, **kwargs)


def train_branches(data_dir: str, run_dir: str, configs: Sequence[BranchConfig], jobs: int = 1,
                   **kwargs) -> list[dict[str, Any]]:
    """Train several branches on one run, one after another (``jobs=1``) or in parallel processes.

    The split and the decoded-image cache are made first, in this process, so parallel
    workers share them instead of racing to create them. With ``jobs > 1`` each worker
    gets ``cpu_count // jobs`` TensorFlow threads.

    Args:
        data_dir, run_dir: as for :func:`train_branch_run`.
        configs: one config per branch (typically rgb, hsv, fft).
        jobs: parallel worker processes (joblib, loky backend).
        **kwargs: passed to :func:`train_branch_run` (split_seed, limit, workers, exclude_ids, dedup, cache_dir).

    Returns:
        The summaries of :func:`train_branch_run`, in ``configs`` order.

    Raises:
        RunLockedError: if another process is writing the run (the lock is held throughout,
            and the worker processes inherit it).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    views = "+".join(c.view for c in configs)
    with run_lock(run_dir, f"skinfusion train --view {views}"):
        return _train_branches(data_dir, run_dir, configs, jobs, **kwargs)


def _train_branches(data_dir, run_dir, configs, jobs, **kwargs) -> list[dict[str, Any]]:
    if jobs == 1 or len(configs) == 1:
        summaries = []
        for c in configs:
            summaries.append(train_branch_run(data_dir, run_dir, c, **kwargs))
            # Free the finished branch's graph and datasets before the next one is built.
            keras.backend.clear_session()
            gc.collect()
        return summaries
    index, assign, _ = prepare_split(data_dir, run_dir, kwargs.get("split_seed", 0), kwargs.get("limit"),
                                     dedup=kwargs.get("dedup", False))
    for size in sorted({c.load_size for c in configs}):
        for split in ("train", "val"):
            cached_images([r.path for r in index.records if assign[r.image_id] == split
                           and r.image_id not in (kwargs.get("holdout_ids") or ())
                           and not (split == "train" and r.image_id in (kwargs.get("exclude_ids") or ()))],
                          size, cache_dir=kwargs.get("cache_dir"), workers=kwargs.get("workers", 2),
                          desc=f"{split} images")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logger.info("training %d branches in %d processes, %d TensorFlow threads each", len(configs), jobs, threads)
    level = logging.getLogger().getEffectiveLevel()
    return Parallel(n_jobs=jobs, backend="loky")(
        delayed(_train_in_worker)(threads, level, data_dir, run_dir, c, **kwargs) for c in configs)


def score_branch(run_dir: str, view: str, split: str = "test", workers: int = 2) -> tuple[list, np.ndarray]:
    """Melanoma probabilities of one trained branch on a saved split (no fusion).

    Returns:
        ``(records, proba)`` for the readable images of that split.
    """
    run = Path(run_dir)
    assign, info = load_split(run)
    index = index_dataset(recorded_data_dir(run, info))
    records = [r for r in index.records if assign.get(r.image_id) == split]
    model, config, _ = load_branch(run / "branches" / view)
    imgs, ok, _ = cached_images([r.path for r in records], config.load_size, workers=workers, desc=f"{split} images")
    return [records[i] for i in ok], predict_images_proba(model, view, imgs, constancy=config.color_constancy,
                                                          crop_stride=config.crop_stride)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a JSON ``--config`` file of branch config defaults.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        values = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{p}: expected a JSON object of branch config fields")
    return values


