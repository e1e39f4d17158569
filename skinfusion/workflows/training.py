"""The train workflow: train branches on a run's split, one after another or in parallel processes."""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from colorspaces.files import atomic_open
from ensemble.bundle import sha256_file
from ensemble.metrics import binary_report, choose_threshold
from ensemble.rundir import RunDir, val_predictions
from models import BranchConfig, load_branch, predict_images_proba, save_branch
from models.distribute import (
    is_chief_task,
    make_strategy,
    read_tf_config,
    resolve,
    worker_values,
)
from models.progress import checkpoint_progress
from models.store import read_branch_info
from models.seeds import fit_seeds
from skinfusion.data.cache import cached_images
from skinfusion.data.index import source_family, write_skip_report
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir
from skinfusion.workflows.labelprocess import selection_mask, selection_record, training_records, training_weights
from skinfusion.workflows.resources import bound_allocator, peak_rss_mb
from skinfusion.workflows.processes import in_processes, threads_per_job
from skinfusion.workflows.runlock import run_lock
from skinfusion.workflows.runsplit import prepare_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """Where and how ``train`` trains a run's branches: everything but the branch config.

    Attributes:
        data_dir: the dataset folder.
        run_dir: the run directory (its split is made on first use and reused).
        split_seed: seed of the run's split, used only when the split is created.
        limit: a stratified, grouped subset of about this many images (fixed at split creation).
        workers: image decoding threads.
        exclude_ids: images dropped from the training images only (e.g. artefact-flagged);
            validation and test keep them, so metrics stay comparable between runs.
        dedup: group near-identical images when the split is created.
        cache_dir: the decoded-image cache (default ``$SKINFUSION_CACHE`` or ``~/.cache/skinfusion``).
        resume: continue an interrupted branch from its last complete epoch; a branch that
            already finished with the same config is kept as is.
        holdout_ids: images left out of training and validation (recorded in the run).
        strategy: a ``models.distribute`` strategy name (``auto``, ``one-device``, ``mirrored``,
            ``multi-worker``; default: TensorFlow's default device).
        mixed_precision: "float16" or "bfloat16": train under Keras' ``mixed_float16`` or
            ``mixed_bfloat16`` policy (the branch is saved float32); "": float32.
    """

    data_dir: str
    run_dir: str
    split_seed: int = 0
    limit: int | None = None
    workers: int = 2
    exclude_ids: set[str] | None = None
    dedup: bool = False
    cache_dir: str | None = None
    resume: bool = False
    holdout_ids: set[str] | None = None
    strategy: str | None = None
    mixed_precision: str = ""


def train_branch_run(request: TrainRequest, config: BranchConfig) -> dict[str, Any]:
    """Train one branch on the run's split and save it to ``RUN/branches/<view>/``.

    Writes ``model.keras``, ``config.json``, ``metadata.json``, ``val_predictions.csv`` and
    ``skipped.csv`` (unreadable images). Decoded images go to the disk cache in
    ``request.cache_dir``.

    Every epoch is checkpointed in ``RUN/branches/<view>/.checkpoint/`` (removed once the
    branch is saved). With ``request.resume``, an interrupted branch continues from its last
    complete epoch, and a branch that already finished with the same config is kept as is.

    Under ``--strategy multi-worker`` every worker runs this with the same request; only the
    chief writes the run (and holds its lock). The others read its split and, with ``resume``,
    its checkpoint, and write theirs to a temporary directory that is removed at the end
    (Keras' pattern for multi-worker saving).

    Returns:
        A summary dict: validation metrics, train seconds, skipped count, branch directory.

    Raises:
        RunLockedError: if another process is writing the run.
        ValueError: if multi-worker workers disagree on the data or on where to resume.
    """
    dist = make_strategy(request.strategy) if request.strategy else None
    if not is_chief(request.strategy):
        with tempfile.TemporaryDirectory(prefix="skinfusion-worker-") as scratch:
            summary = _train_branch_run(request, config, dist, write_dir=scratch)
        summary["branch_dir"] = f"{RunDir(request.run_dir).branch(config.view)} (saved by the chief)"
        return summary
    with run_lock(request.run_dir, f"skinfusion train --view {config.view}"):
        return _train_branch_run(request, config, dist)


def is_chief(strategy: str | None) -> bool:
    """Whether this process writes the run: always, but for a non-chief worker of ``--strategy multi-worker``."""
    return not strategy or resolve(strategy) != "multi-worker" or is_chief_task(read_tf_config())


def _resume_point(branch_dir: Path, config: BranchConfig, resume: bool) -> tuple[int, int]:
    """Where a (re)started training begins: ``(members finished, epoch)``; ``(-1, -1)`` if the
    branch is already trained. A damaged checkpoint counts as epoch 0 (``fit_branch``'s restore
    reports it by name)."""
    if not resume:
        return 0, 0
    progress = checkpoint_progress(branch_dir / ".checkpoint", config.seeds)
    if progress is not None:
        return progress.members_done, progress.epoch
    if (branch_dir / "metadata.json").is_file() and read_branch_info(branch_dir)[0] == config:
        return -1, -1
    return 0, 0


def _check_workers_agree(dist, branch_dir: Path, point: tuple[int, int], train_ids: list[str]) -> None:
    # Workers that disagree on the data or the starting point (member and epoch) would run
    # different step counts and wait for each other forever: compare them first, with one collective.
    crc = zlib.crc32("\n".join(train_ids).encode())
    rows = worker_values(dist, [*point, len(train_ids), crc])
    if all(row == rows[0] for row in rows):
        return

    def where(members: int, epoch: int) -> str:
        if members == -1:
            return "already trained"
        return f"epoch {epoch}" + (f" after {members} finished member(s)" if members else "")

    seen = "; ".join(f"replica {i}: {where(r[0], r[1])}, {r[2]} training images" for i, r in enumerate(rows))
    raise ValueError(f"the workers of --strategy multi-worker disagree ({seen}); every worker needs the same "
                     f"--data and the same files, and with --resume must read the chief's checkpoint in "
                     f"{branch_dir} (put the run on a filesystem all workers share, or copy it to each)")


def _train_branch_run(request: TrainRequest, config: BranchConfig, dist=None,
                      write_dir: str | None = None) -> dict[str, Any]:
    bound_allocator()
    run_dir, resume = request.run_dir, request.resume
    holdout_ids, exclude_ids = request.holdout_ids, request.exclude_ids
    read_run = Path(run_dir)
    # A non-chief worker reads the chief's split and checkpoint and writes under write_dir.
    # Before the chief has saved the split it makes its own there: the split is seeded, so
    # it is the same one (the agreement check below makes sure).
    split_run = run_dir if write_dir is None or RunDir(read_run).splits.is_file() else write_dir
    index, assign, info = prepare_split(request.data_dir, split_run, request.split_seed, request.limit,
                                        dedup=request.dedup)
    run_dir = write_dir or run_dir
    recs = {s: [r for r in index.records if assign[r.image_id] == s] for s in ("train", "val")}
    n_excluded = n_held_out = 0
    if holdout_ids:
        for s in recs:
            kept = [r for r in recs[s] if r.image_id not in holdout_ids]
            n_held_out += len(recs[s]) - len(kept)
            recs[s] = kept
        logger.info("[%s] held out %d images from training and validation", config.view, n_held_out)
        # Recorded for the run, so fuse fits the OOD gate on the same images the branches saw.
        with atomic_open(RunDir(run_dir).held_out, "w") as fh:
            fh.write("".join(f"{i}\n" for i in sorted(holdout_ids)))
    if exclude_ids:
        kept = [r for r in recs["train"] if r.image_id not in exclude_ids]
        n_excluded = len(recs["train"]) - len(kept)
        recs["train"] = kept
        logger.info("[%s] excluded %d flagged images from training", config.view, n_excluded)
    recs["train"], n_follow_up = training_records(recs["train"], config)
    if n_follow_up:
        logger.info("[%s] left %d follow-up-confirmed images out of training (--follow-up-weight 0)", config.view,
                    n_follow_up)
    selection_mask(recs["val"], config.select_on)  # refuse an impossible --select-on before decoding anything
    branch_dir = RunDir(run_dir).branch(config.view)
    branch_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = branch_dir / ".checkpoint"
    chief_branch = RunDir(read_run).branch(config.view)  # the same as branch_dir, but on a non-chief worker
    point = _resume_point(chief_branch, config, resume)
    if dist is not None and isinstance(dist, _multi_worker_class()):
        with _peer_loss_reported(dist, chief_branch, started=False):
            _check_workers_agree(dist, chief_branch, point, [r.image_id for r in recs["train"]])
    if point[0] == -1:
        _, meta = read_branch_info(chief_branch)
        logger.info("[%s] already trained in %s; nothing to resume", config.view, chief_branch)
        return {"view": config.view, "branch_dir": str(chief_branch), "validation": meta["validation_metrics"],
                "train_seconds": meta["training"]["train_seconds"], "skipped": meta.get("skipped_images", 0),
                "peak_rss_mb": meta["training"].get("peak_rss_mb", float("nan"))}
    if not resume and any(checkpoint.glob("**/state.json")):
        logger.warning("[%s] %s holds an interrupted training; starting again (pass --resume to continue it)",
                       config.view, checkpoint)
    loaded, failures = {}, []
    for s, rs in recs.items():
        # Decoded once into the disk cache; every branch and later run on these files reuses it,
        # and training streams it batch by batch, so memory does not grow with the dataset.
        imgs, ok, fails = cached_images([r.path for r in rs], config.load_size, cache_dir=request.cache_dir,
                                        workers=request.workers, desc=f"{s} images",
                                        lesion_margin=config.decode_margin)
        loaded[s] = (imgs, np.array([rs[i].label for i in ok]), [rs[i] for i in ok])
        failures += fails
    missing = [(p, "listed in the labels but the file is missing") for p in index.missing_files]
    write_skip_report(branch_dir / "skipped.csv", failures + missing)
    if failures:
        logger.warning("%d unreadable images skipped; see %s", len(failures), branch_dir / "skipped.csv")

    # Which encoder a fine-tuned branch started from, by its verified hash (the folder may change later).
    encoder = _encoder_record(config)
    # --select-on: the epoch is chosen on those validation images; the split itself never changes.
    select = selection_mask(loaded["val"][2], config.select_on)
    sel_images = loaded["val"][0] if select.all() else loaded["val"][0][np.flatnonzero(select)]
    with _peer_loss_reported(dist, chief_branch, started=True):
        model, history = fit_seeds(config, loaded["train"], sel_images, loaded["val"][1][select], checkpoint,
                                    chief_branch / ".checkpoint", resume, strategy=dist,
                                    mixed_precision=request.mixed_precision,
                                    train_weights=training_weights(loaded["train"][2], config),
                                    train_sources=[source_family(r.source) for r in loaded["train"][2]])
    history["peak_rss_mb"] = peak_rss_mb()
    val_imgs, y_val, val_recs = loaded["val"]
    proba = predict_images_proba(model, config.view, val_imgs, constancy=config.color_constancy,
                                 crop_stride=config.crop_stride)
    threshold = choose_threshold(y_val[select], proba[select])
    val_metrics = binary_report(y_val, proba, threshold)
    with atomic_open(val_predictions(branch_dir), "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label", "melanoma_proba"])
        w.writerows((r.image_id, r.label, f"{p:.6f}") for r, p in zip(val_recs, proba))
    save_branch(branch_dir, model, config, {
        "split_seed": info.get("split_seed"),
        # Which split exactly: fuse refuses branches whose splits differ (seed and data alone can agree).
        "split_sha256": sha256_file(RunDir(split_run).splits),
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_dir": info.get("data_dir"),
        "validation_metrics": val_metrics,
        "training": {k: v for k, v in history.items() if k != "per_epoch"},
        "history": history["per_epoch"],
        "skipped_images": len(failures),
        "excluded_from_training": n_excluded,
        "held_out_from_training_and_validation": n_held_out,
        "label_process": selection_record(select, y_val, config.select_on, n_follow_up),
        **({"init_from": encoder} if encoder else {}),
    })
    shutil.rmtree(checkpoint, ignore_errors=True)  # the branch is saved; nothing left to resume
    logger.info("[%s] saved to %s; validation AUC %.4f; peak RSS %.0f MB", config.view, branch_dir,
                val_metrics["auc"], history["peak_rss_mb"])
    return {"view": config.view, "branch_dir": str(branch_dir), "validation": val_metrics,
            "train_seconds": history["train_seconds"], "skipped": len(failures),
            "peak_rss_mb": history["peak_rss_mb"]}


def _encoder_record(config: BranchConfig) -> dict[str, Any] | None:
    """``{"dir", "encoder_sha256", "pretrain_epochs"}`` of the hash-checked encoder ``init_from`` names, or None."""
    if not config.init_from:
        return None
    from models.pretrain import check_init_from

    info, _ = check_init_from(config, config.init_from)
    return {"dir": str(Path(config.init_from).resolve()), "encoder_sha256": info["encoder"]["sha256"],
            "pretrain_epochs": info.get("epochs")}


@contextlib.contextmanager
def _peer_loss_reported(dist, chief_branch: Path, started: bool):
    # A worker died or its network went: the collectives are aborted on every survivor.
    # A ConnectionError (an OSError) is reported in one line, as the user's to fix.
    try:
        yield
    except _peer_errors() as exc:
        if dist is None or not isinstance(dist, _multi_worker_class()):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = (f"the last complete epoch is checkpointed in {chief_branch / '.checkpoint'}" if started else
                 "before training started")
        raise ConnectionError(f"lost contact with another worker of --strategy multi-worker ({first}); {where}: "
                              "restart every worker with --resume") from None


def _peer_errors() -> tuple[type, ...]:
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)


def _multi_worker_class() -> type:
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy


def train_branches(data_dir: str, run_dir: str, configs: Sequence[BranchConfig], jobs: int = 1,
                   **options: Any) -> list[dict[str, Any]]:
    """Train several branches on one run, one after another (``jobs=1``) or in parallel processes.

    The split and the decoded-image cache are made first, in this process, so parallel
    workers share them instead of racing to create them. With ``jobs > 1`` each worker
    gets ``cpu_count // jobs`` TensorFlow threads.

    Args:
        data_dir, run_dir: the dataset and the run (see :class:`TrainRequest`).
        configs: one config per branch (typically rgb, hsv, fft).
        jobs: parallel worker processes (joblib, loky backend).
        **options: the other fields of :class:`TrainRequest` (split_seed, limit, workers, exclude_ids,
            dedup, cache_dir, resume, holdout_ids, strategy, mixed_precision). A strategy of several
            replicas trains one branch at a time in this process (it has the devices to itself):
            ``jobs`` must then be 1.

    Returns:
        The summaries of :func:`train_branch_run`, in ``configs`` order.

    Raises:
        RunLockedError: if another process is writing the run (the lock is held throughout,
            and the worker processes inherit it).
        TypeError: for an option that is not a field of :class:`TrainRequest`.
    """
    request = TrainRequest(data_dir, run_dir, **options)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    strategy = request.strategy
    if jobs > 1 and len(configs) > 1 and strategy and resolve(strategy) != "one-device":
        raise ValueError(f"--jobs {jobs} trains branches in parallel processes, but --strategy {strategy} gives each "
                         "branch all the devices; use --jobs 1 (branches one after another) or --strategy one-device")
    for c in configs:
        if c.init_from:  # a missing, damaged or mismatched encoder is refused before the split and the cache
            from models.pretrain import check_init_from
            check_init_from(c, c.init_from)
    views = "+".join(c.view for c in configs)
    # A non-chief multi-worker task writes nothing in the run, so it does not lock it (the chief does).
    lock = run_lock(run_dir, f"skinfusion train --view {views}") if is_chief(strategy) else contextlib.nullcontext()
    with lock:
        return _train_branches(request, configs, jobs)


def _train_branches(request: TrainRequest, configs: Sequence[BranchConfig], jobs: int) -> list[dict[str, Any]]:
    if jobs == 1 or len(configs) == 1:
        summaries = []
        for c in configs:
            summaries.append(train_branch_run(request, c))
            # Free the finished branch's graph and datasets before the next one is built.
            keras.backend.clear_session()
            gc.collect()
        return summaries
    index, assign, _ = prepare_split(request.data_dir, request.run_dir, request.split_seed, request.limit,
                                     dedup=request.dedup)
    for size, margin in sorted({(c.load_size, c.decode_margin) for c in configs}, key=str):
        for split in ("train", "val"):
            cached_images([r.path for r in index.records if assign[r.image_id] == split
                           and r.image_id not in (request.holdout_ids or ())
                           and not (split == "train" and r.image_id in (request.exclude_ids or ()))],
                          size, cache_dir=request.cache_dir, workers=request.workers, desc=f"{split} images",
                          lesion_margin=margin)
    logger.info("training %d branches in %d processes, %d TensorFlow threads each", len(configs), jobs,
                threads_per_job(jobs))
    return in_processes(train_branch_run, [(request, c) for c in configs], jobs)


def score_branch(run_dir: str, view: str, split: str = "test", workers: int = 2) -> tuple[list, np.ndarray]:
    """Melanoma probabilities of one trained branch on a saved split (no fusion).

    Returns:
        ``(records, proba)`` for the readable images of that split.
    """
    run = Path(run_dir)
    assign, info = load_split(run)
    index = index_dataset(recorded_data_dir(run, info))
    records = [r for r in index.records if assign.get(r.image_id) == split]
    model, config, _ = load_branch(RunDir(run).branch(view))
    imgs, ok, _ = cached_images([r.path for r in records], config.load_size, workers=workers, desc=f"{split} images",
                                lesion_margin=config.decode_margin)
    return [records[i] for i in ok], predict_images_proba(model, view, imgs, constancy=config.color_constancy,
                                                          crop_stride=config.crop_stride)
