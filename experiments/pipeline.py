"""Run-directory workflows behind the CLI: train a branch, fuse the branches, evaluate the ensemble."""

from __future__ import annotations

import csv
import math
import os
import dataclasses
import shutil
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces import VIEWS
from ensemble import load_ensemble, make_fusion, save_ensemble
from ensemble.metadata import parse_fields
from ensemble.metrics import binary_report, choose_threshold, roc_auc_ci
from experiments.cache import cached_images
from experiments.data import DatasetIndex, index_dataset, write_skip_report
from experiments.splits import check_split, load_split, load_split_groups, make_split, save_split, subset
from models import BranchConfig, fit_branch, predict_images_proba, save_branch
from models.store import atomic_open, read_branch_info, write_json_atomic

logger = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = 2


def prepare_split(data_dir: str, run_dir: str, split_seed: int = 0, limit: int | None = None,
                  dedup: bool = False) -> tuple[DatasetIndex, dict[str, str], dict]:
    """Index the data and return the run's split, creating ``RUN/splits.csv`` on first use.

    A run's split is made once and reused by every branch, so all branches see the same
    images; reusing a run on changed data is refused. With ``dedup``, images whose perceptual
    hashes are near-identical join one group before splitting, which catches re-uploads that
    the dataset's own group ids miss.

    Raises:
        ValueError: if the run was split on a different dataset.
    """
    index = index_dataset(data_dir)
    logger.info("%s", index.summary())
    fingerprint = index.fingerprint()
    run = Path(run_dir)
    if (run / "splits.csv").is_file():
        assign, info = load_split(run)
        if info.get("dataset_fingerprint") != fingerprint:
            raise ValueError(
                f"{run}: its split was made on dataset {info.get('data_dir')} (fingerprint "
                f"{info.get('dataset_fingerprint')}), but {data_dir} has fingerprint {fingerprint}; use a new --run"
            )
        if limit is not None and info.get("limit") != limit:
            logger.warning("reusing the run's saved split (limit=%s); --limit %s is ignored", info.get("limit"), limit)
        # The saved group ids (which may include merged near-duplicates) are authoritative.
        groups = load_split_groups(run)
        records = [dataclasses.replace(r, group_id=groups[r.image_id]) for r in index.records if r.image_id in assign]
        logger.info("reusing split %s", run / "splits.csv")
    else:
        records = index.records
        if dedup:
            from experiments.dedup import find_near_duplicates
            from experiments.splits import merge_near_duplicate_groups

            found = find_near_duplicates([r.path for r in records])
            records = merge_near_duplicate_groups(records, [(records[i].image_id, records[j].image_id) for i, j, _ in found])
            logger.info("perceptual hash: %d near-duplicate pairs merged into shared groups", len(found))
        records = subset(records, limit, split_seed) if limit else records
        assign = make_split(records, seed=split_seed)
        info = {
            "data_dir": str(Path(data_dir).resolve()),
            "dataset_fingerprint": fingerprint,
            "split_seed": split_seed,
            "limit": limit,
            "dedup": dedup,
            "grouped": index.grouped,
            "counts": {s: _counts(records, assign, s) for s in ("train", "val", "test")},
        }
        save_split(run, records, assign, info)
        logger.info("new split saved to %s: %s", run / "splits.csv", info["counts"])
    check_split(records, assign)
    index.records = records
    return index, assign, info


def _counts(records, assign, split) -> dict[str, int]:
    labels = [r.label for r in records if assign[r.image_id] == split]
    return {"images": len(labels), "melanoma": int(sum(labels))}


def train_branch_run(data_dir: str, run_dir: str, config: BranchConfig, split_seed: int = 0,
                     limit: int | None = None, workers: int = 2,
                     exclude_ids: set[str] | None = None, dedup: bool = False,
                     cache_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
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
    """
    bound_allocator()
    index, assign, info = prepare_split(data_dir, run_dir, split_seed, limit, dedup=dedup)
    recs = {s: [r for r in index.records if assign[r.image_id] == s] for s in ("train", "val")}
    n_excluded = 0
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
                                checkpoint_dir=checkpoint, resume=resume)
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
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_dir": info.get("data_dir"),
        "validation_metrics": val_metrics,
        "training": {k: v for k, v in history.items() if k != "per_epoch"},
        "history": history["per_epoch"],
        "skipped_images": len(failures),
        "excluded_from_training": n_excluded,
    })
    shutil.rmtree(checkpoint, ignore_errors=True)  # the branch is saved; nothing left to resume
    logger.info("[%s] saved to %s; validation AUC %.4f; peak RSS %.0f MB", config.view, branch_dir,
                val_metrics["auc"], history["peak_rss_mb"])
    return {"view": config.view, "branch_dir": str(branch_dir), "validation": val_metrics,
            "train_seconds": history["train_seconds"], "skipped": len(failures),
            "peak_rss_mb": history["peak_rss_mb"]}


def bound_allocator(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, always.

    By default glibc raises its mmap threshold after the first large free, so the input
    pipeline's per-batch arrays (megabytes each, allocated by several tf.data threads) are
    then carved from per-thread heaps that keep their freed memory: resident memory creeps
    up epoch after epoch. A fixed threshold returns every batch's memory when it is freed.
    A no-op (returns False) where the C library is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``getrusage``'s ``ru_maxrss``, it is
    not inherited from the parent across fork and exec, so a child reports its own peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(configs) == 1:
        summaries = []
        for c in configs:
            summaries.append(train_branch_run(data_dir, run_dir, c, **kwargs))
            # Free the finished branch's graph and datasets before the next one is built.
            import gc

            import keras

            keras.backend.clear_session()
            gc.collect()
        return summaries
    from joblib import Parallel, delayed

    index, assign, _ = prepare_split(data_dir, run_dir, kwargs.get("split_seed", 0), kwargs.get("limit"),
                                     dedup=kwargs.get("dedup", False))
    for size in sorted({c.load_size for c in configs}):
        for split in ("train", "val"):
            cached_images([r.path for r in index.records if assign[r.image_id] == split
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
    from models import load_branch

    run = Path(run_dir)
    assign, info = load_split(run)
    index = index_dataset(info["data_dir"])
    records = [r for r in index.records if assign.get(r.image_id) == split]
    model, config, _ = load_branch(run / "branches" / view)
    imgs, ok, _ = cached_images([r.path for r in records], config.load_size, workers=workers, desc=f"{split} images")
    return [records[i] for i in ok], predict_images_proba(model, view, imgs, constancy=config.color_constancy,
                                                          crop_stride=config.crop_stride)


def _read_val_predictions(branch_dir: Path) -> dict[str, tuple[int, float]]:
    path = branch_dir / "val_predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; train this branch with `skinfusion train` first")
    with open(path, newline="") as fh:
        return {r["image_id"]: (int(r["label"]), float(r["melanoma_proba"])) for r in csv.DictReader(fh)}


def fuse_run(run_dir: str, method: str = "mean", views: Sequence[str] = tuple(VIEWS), folds: int = 0,
             jobs: int | None = None, metadata: Sequence[str] | str = ()) -> dict[str, Any]:
    """Fit the fusion on the branches' validation probabilities and write ``RUN/ensemble/``.

    The decision threshold is chosen on validation data: on the fused probabilities for
    ``mean``, and on the stacker's out-of-fold probabilities for ``stack`` (so the threshold
    is not chosen on the very predictions the stacker was fitted to).

    With ``folds`` K >= 2 (``stack`` only), the stacker is instead fitted on out-of-fold
    probabilities of the training split (each branch trained K more times, see
    :mod:`experiments.oof`), and the threshold is chosen on the validation split, which the
    stacker then never saw. ``jobs`` parallel training processes per fold (default one per branch).

    With ``metadata`` fields (``stack`` only; "age", "sex", "site"), the stacker also takes
    each image's metadata from the run's dataset, and every later prediction needs it.

    Raises:
        FileNotFoundError: if a branch is missing.
        ValueError: if branches were trained on different splits or settings.
    """
    if folds and method != "stack":
        raise ValueError(f"--folds only applies to --method stack (got --method {method})")
    metadata = parse_fields(metadata)
    make_fusion(method, metadata)  # refuse metadata with mean before reading anything
    if folds and folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    run = Path(run_dir)
    branch_dirs = [run / "branches" / v for v in views]
    infos = [read_branch_info(b) for b in branch_dirs]
    for bdir, (config, _) in zip(branch_dirs, infos):
        if config.view != bdir.name:
            raise ValueError(f"{bdir}: holds a {config.view!r} branch, not {bdir.name!r}; refusing to fuse it")
    for key in ("dataset_fingerprint", "split_seed"):
        values = {m.get(key) for _, m in infos}
        if len(values) != 1:
            raise ValueError(f"{run}: branches disagree on {key} ({values}); retrain them in one run")
    sizes = {(c.image_size, c.load_size, c.crop_stride) for c, _ in infos}
    if len(sizes) != 1:
        raise ValueError(f"{run}: branches were trained at different image sizes or crop settings "
                         f"(image_size, load_size, crop_stride) = {sorted(sizes)}; retrain them alike")
    preds = [_read_val_predictions(b) for b in branch_dirs]
    ids = sorted(set.intersection(*(set(p) for p in preds)))
    if len(ids) != len(preds[0]):
        logger.warning("branches share %d of %d validation images; fusing on the shared ones", len(ids), len(preds[0]))
    y = np.array([preds[0][i][0] for i in ids])
    P = np.array([[p[i][1] for p in preds] for i in ids])
    meta_of = _dataset_metadata(run, metadata) if metadata else {}
    M = [meta_of.get(i) for i in ids] if metadata else None
    stack_fit: dict[str, Any] = {}
    if folds:
        from experiments.oof import oof_member_proba

        oof_ids, y_oof, P_oof = oof_member_proba(run, views, folds, jobs=jobs)
        M_oof = [meta_of.get(i) for i in oof_ids] if metadata else None
        fusion = make_fusion(method, metadata).fit(P_oof, y_oof, M_oof)
        fused = fusion.predict_proba(P, M)[:, 1]  # validation: unseen by the stacker and by every branch
        val_only = make_fusion(method, metadata).fit(P, y, M).oof_proba_
        stack_fit = {"stack_fit": {"on": "train out-of-fold", "folds": folds, "n_images": len(oof_ids),
                                   "oof_member_auc": {v: float(roc_auc_ci(y_oof, P_oof[:, j], n_boot=0)[0])
                                                      for j, v in enumerate(views)},
                                   "val_auc_oof_stacker": float(roc_auc_ci(y, fused, n_boot=0)[0]),
                                   "val_auc_val_stacker_cv": float(roc_auc_ci(y, val_only, n_boot=0)[0])}}
        logger.info("stacker fitted on %d out-of-fold training images: validation AUC %.4f "
                    "(stacker fitted on validation itself, cross-validated: %.4f)", len(oof_ids),
                    stack_fit["stack_fit"]["val_auc_oof_stacker"], stack_fit["stack_fit"]["val_auc_val_stacker_cv"])
    else:
        fusion = make_fusion(method, metadata).fit(P, y, M) if metadata else make_fusion(method).fit(P, y)
        fused = fusion.oof_proba_ if method == "stack" else fusion.predict_proba(P)[:, 1]
        if method == "stack":
            stack_fit = {"stack_fit": {"on": "validation", "folds": 0, "n_images": int(len(y))}}
    threshold = choose_threshold(y, fused)
    val = {v: binary_report(y, P[:, j], choose_threshold(y, P[:, j])) for j, v in enumerate(views)}
    val["fused"] = binary_report(y, fused, threshold)
    save_ensemble(run / "ensemble", fusion, method, threshold, branch_dirs, extra={
        "validation_metrics": val,
        "dataset_fingerprint": infos[0][1].get("dataset_fingerprint"),
        "split_seed": infos[0][1].get("split_seed"),
        "n_validation": int(len(y)),
        **stack_fit,
    })
    if method == "stack":
        logger.info("stacker log-odds weights %s", fusion.weights(views))
    return {"method": method, "threshold": threshold, "validation": val, "ensemble_dir": str(run / "ensemble"),
            "metadata": list(metadata), **stack_fit}


def _dataset_metadata(run: Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """image_id → metadata dict for the run's dataset; logs how much of each field is known."""
    from ensemble.metadata import clean_age, clean_text

    _, info = load_split(run)
    records = index_dataset(info["data_dir"]).records
    known = {f: sum((clean_age(r.age) is not None) if f == "age" else bool(clean_text(getattr(r, f))) for r in records)
             for f in fields}
    logger.info("metadata known for %s of %d images", ", ".join(f"{f} {n}" for f, n in known.items()), len(records))
    if not any(known.values()):
        raise ValueError(f"{info['data_dir']}: no image has any of the metadata fields {list(fields)}; "
                         "metadata fusion needs age/sex/site columns in the dataset's metadata")
    return {r.image_id: r.metadata() for r in records}


def evaluate_run(run_dir: str, data_dir: str | None = None, out_dir: str | None = None,
                 n_boot: int = 1000, workers: int = 2, batch_size: int = 64,
                 isic_csv: str | None = None, plots: bool = True,
                 audit_csv: str | None = None, audit: bool = True, tta: bool = False) -> dict[str, Any]:
    """Score the run's test split (or every image of ``data_dir``) and write metrics and predictions.

    Branch metrics use each branch's validation threshold and the fused metrics the
    manifest's threshold; nothing is tuned on the scored images. Writes ``metrics.json``
    (schema in the README), ``predictions.csv``, ``skipped.csv``, and with ``plots`` the
    ROC / precision-recall / reliability PNGs and ``report.html``; ``isic_csv`` also writes
    the predictions in ISIC challenge format. With ``audit``, AUC is also reported on the
    artefact-free images and on each artefact subset (flags from ``audit_csv``, or detected
    on the scored images), so that a shortcut shows up as a gap.

    Returns:
        The metrics dict also written to ``metrics.json``.
    """
    run = Path(run_dir)
    ens = load_ensemble(run)
    if data_dir is None:
        assign, info = load_split(run)
        index = index_dataset(info["data_dir"])
        if index.fingerprint() != info.get("dataset_fingerprint"):
            raise ValueError(f"{info['data_dir']} changed since {run} was split; its test split cannot be re-scored")
        records = [r for r in index.records if assign.get(r.image_id) == "test"]
        scope = "test split"
        out = Path(out_dir) if out_dir else run
    else:
        index = index_dataset(data_dir)
        logger.info("%s", index.summary())
        trained_on = load_split(run)[1].get("dataset_fingerprint") if (run / "splits.csv").is_file() else None
        if index.fingerprint() == trained_on:
            logger.warning("%s is the dataset this run trained on: its scores include training and "
                           "validation images and are optimistic; omit --data to score the test split", data_dir)
        records = index.records
        scope = f"all images of {Path(data_dir).resolve()}"
        out = Path(out_dir) if out_dir else run / f"eval-{Path(data_dir).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    by_path = {r.path: r for r in records}
    kept, P_parts, fused_parts, failures = [], [], [], []
    t0 = time.perf_counter()
    step = max(1, len(records) // 10)
    # A metadata-fused bundle takes each image's metadata from the scored dataset.
    meta = {p: r.metadata() for p, r in by_path.items()} if ens.metadata_fields else None
    for batch in ens.iter_files(list(by_path), batch_size=batch_size, workers=workers, tta=tta, metadata=meta):
        kept += [by_path[p] for p in batch.paths]
        P_parts.append(batch.P)
        fused_parts.append(batch.fused)
        failures += batch.failures
        for path, reason in batch.failures:
            logger.warning("skipping %s", reason)
        done = len(kept) + len(failures)
        if done == len(records) or done // step != (done - len(batch.paths) - len(batch.failures)) // step:
            logger.info("scored %d/%d images (%.0fs)", done, len(records), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    write_skip_report(out / "skipped.csv", failures + [(p, "listed in the labels but the file is missing") for p in index.missing_files])
    records = kept
    P = np.concatenate(P_parts) if P_parts else np.zeros((0, len(ens.views)))
    fused = np.concatenate(fused_parts) if fused_parts else np.zeros(0)
    y = np.array([r.label for r in records])
    branch_thr = {v: ens.manifest["validation_metrics"][v]["threshold"] for v in ens.views}
    members = {v: binary_report(y, P[:, j], branch_thr[v], n_boot=n_boot) for j, v in enumerate(ens.views)}
    fused_report = binary_report(y, fused, ens.threshold, n_boot=n_boot)
    per_source = {}
    for source in sorted({r.source for r in records}):
        m = np.array([r.source == source for r in records])
        per_source[source] = {
            "n": int(m.sum()), "n_melanoma": int(y[m].sum()),
            **{v: _auc_block(y[m], P[m, j], n_boot) for j, v in enumerate(ens.views)},
            "fused": _auc_block(y[m], fused[m], n_boot),
        }
    per_subset = {}
    if audit:
        if audit_csv:
            flags = read_audit_flags(audit_csv)
        else:
            from experiments.audit import audit_images

            rows = audit_images(records, workers=workers)
            flags = {a: {row["image_id"] for row in rows if row[a]} for a in ("colour_disc", "ink")}
        flagged = flags["colour_disc"] | flags["ink"]
        masks = {"artefact-free": [r.image_id not in flagged for r in records],
                 "colour_disc": [r.image_id in flags["colour_disc"] for r in records],
                 "ink": [r.image_id in flags["ink"] for r in records]}
        for name, mask in masks.items():
            m = np.array(mask, dtype=bool)
            per_subset[name] = {
                "n": int(m.sum()), "n_melanoma": int(y[m].sum()),
                **{v: _auc_block(y[m], P[m, j], n_boot) for j, v in enumerate(ens.views)},
                "fused": _auc_block(y[m], fused[m], n_boot),
                "fused_mean_proba_nevus": float(fused[m & (y == 0)].mean()) if (m & (y == 0)).any() else math.nan,
                "fused_specificity": float((fused[m & (y == 0)] < ens.threshold).mean()) if (m & (y == 0)).any() else math.nan,
            }
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "run": str(run.resolve()),
        "scope": scope,
        "method": ens.manifest["method"],
        "metadata": list(ens.metadata_fields),
        "n_images": int(len(y)),
        "n_skipped": len(failures),
        "members": members,
        "fused": fused_report,
        "per_source": per_source,
        "per_subset": per_subset,
        "inference_seconds": round(seconds, 3),
        "tta": tta,
    }
    write_json_atomic(out / "metrics.json", metrics)
    with atomic_open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label", "source", *ens.views, "fused"])
        for r, prow, f in zip(records, P, fused):
            w.writerow([r.image_id, r.label, r.source, *(f"{p:.6f}" for p in prow), f"{f:.6f}"])
    if isic_csv:
        from experiments.report import write_isic_csv

        write_isic_csv(isic_csv, [r.image_id for r in records], fused)
    if plots:
        from experiments.report import write_curves, write_html

        images = write_curves(y, {**{v: P[:, j] for j, v in enumerate(ens.views)}, "fused": fused}, out, title=f"({scope})"[:60])
        write_html(metrics, out, images)
    metrics["out_dir"] = str(out)
    return metrics


def _auc_block(y, proba, n_boot) -> dict[str, Any]:
    auc, lo, hi = roc_auc_ci(y, proba, n_boot=n_boot)
    return {"auc": auc, "auc_ci95": [lo, hi]}


def format_table(reports: dict[str, dict]) -> str:
    """A plain-text table of AUC (95% CI), balanced accuracy, sensitivity and specificity per row."""
    lines = [f"{'':8} {'AUC':>6} {'95% CI':>15} {'bal.acc':>8} {'sens':>6} {'spec':>6} {'thr':>6} {'n':>6}"]
    for name, r in reports.items():
        lo, hi = r["auc_ci95"]
        lines.append(
            f"{name:8} {r['auc']:6.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r['balanced_accuracy']:8.3f} "
            f"{r['sensitivity']:6.3f} {r['specificity']:6.3f} {r['threshold']:6.3f} {r['n']:6d}"
        )
    return "\n".join(lines)


def format_source_table(per_source: dict[str, dict], views: Sequence[str]) -> str:
    """A plain-text table of AUC per source, per branch and fused."""
    cols = [*views, "fused"]
    lines = [f"{'source':16} {'n':>5} {'mel':>4} " + " ".join(f"{c:>6}" for c in cols)]
    for source, row in per_source.items():
        aucs = " ".join(f"{row[c]['auc']:6.3f}" for c in cols)
        lines.append(f"{source:16} {row['n']:5d} {row['n_melanoma']:4d} {aucs}")
    return "\n".join(lines)


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


AUDIT_COLUMNS = ("image_id", "label", "source", "group_id", "width", "height", "readable", "error",
                 "colour_disc", "colour_disc_score", "ink", "ink_score", "near_duplicates")


def audit_dataset(data_dir: str, out_csv: str, workers: int = 2, hash_pairs: bool = True,
                  max_distance: int = 18) -> dict[str, Any]:
    """Audit every labelled image of a dataset for artefacts, size/source mix and near-duplicates.

    Writes ``out_csv`` (one row per image, columns ``AUDIT_COLUMNS``) and a summary JSON beside
    it (``<out>.summary.json``).

    Returns:
        The summary: the per-class figures of ``experiments.audit.summarise_audit`` plus the
        dataset format, skipped labels, missing files and near-duplicate pair count.
    """
    from experiments.audit import audit_images, summarise_audit

    index = index_dataset(data_dir)
    logger.info("%s", index.summary())
    records = index.records
    logger.info("auditing %d images for colour discs and ink", len(records))
    rows = audit_images(records, workers=workers)
    near: dict[str, list[str]] = {r.image_id: [] for r in records}
    n_pairs = 0
    if hash_pairs:
        from experiments.dedup import find_near_duplicates

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
    if not rows or not {"image_id", "colour_disc", "ink"} <= set(rows[0]):
        raise ValueError(f"{path}: not an audit CSV (needs image_id, colour_disc, ink columns and at least one row)")
    # Accept spreadsheet spellings (TRUE, true, 1, yes): a re-saved audit must not silently flag nothing.
    truthy = {"true", "1", "yes", "y"}
    return {a: {r["image_id"] for r in rows if (r[a] or "").strip().lower() in truthy} for a in ("colour_disc", "ink")}
