"""The pretrain workflow: self-supervised pre-training of one view's encoder on a run's training images.

Which images: every image of the run's **training** split (labels unused; the images a
leave-one-source-out run holds out are left out too), plus any extra unlabelled folders. The
validation and test images never enter: extra files whose name is the id of a validation or test
image, or whose bytes are identical to one, are skipped and counted. The images used are listed
in ``images.txt`` beside the encoder.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces.image import IMAGE_SUFFIXES
from models import BranchConfig
from models.config import SAVED_BEFORE_FIELD
from skinfusion.data.cache import cached_images
from skinfusion.workflows.fusing import held_out_ids
from skinfusion.workflows.processes import in_processes, threads_per_job
from skinfusion.workflows.runlock import run_lock
from skinfusion.workflows.runsplit import prepare_split

logger = logging.getLogger(__name__)

#: Labelled training images the k-NN probe compares validation images with (a seeded subsample).
PROBE_REFERENCE = 2000


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_files(dirs: Sequence[str | Path]) -> list[Path]:
    """The image files under ``dirs`` (recursively, sorted per folder).

    Raises:
        FileNotFoundError: naming a folder that does not exist.
    """
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"--images {d}: no such folder; give a folder of unlabelled images")
        found += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return found


def extra_images(dirs: Sequence[str | Path], forbidden_ids: set[str], forbidden_paths: Sequence[str]) -> tuple[list[str], int]:
    """Image files under ``dirs`` (recursively), minus any that is a validation or test image.

    A file is refused when its name without suffix is one of ``forbidden_ids`` or its bytes equal
    those of a file in ``forbidden_paths``.

    Returns:
        ``(paths, n_refused)``.

    Raises:
        FileNotFoundError: naming a folder that does not exist.
    """
    found = image_files(dirs)
    if not found:
        return [], 0
    sizes = {Path(p).stat().st_size for p in forbidden_paths if Path(p).is_file()}
    # Hash only the candidates whose size matches a forbidden file: cheap on large folders.
    digests = {_digest(p) for p in forbidden_paths if Path(p).is_file()} if sizes else set()
    keep, refused = [], 0
    for p in found:
        if p.stem in forbidden_ids or (p.stat().st_size in sizes and _digest(p) in digests):
            refused += 1
        else:
            keep.append(str(p))
    return keep, refused


def _pretraining_images(data_dir: str, run: Path, extra_dirs: Sequence[str], batch_size: int, split_seed: int,
                        limit: int | None) -> tuple[list, list, list[str], int, dict[str, Any]]:
    """The run's split (made on first use) and what pre-training reads; call it holding the run lock.

    Returns:
        ``(train records, validation records, extra image paths, extra files refused, split info)``;
        the images a leave-one-source-out run holds out are in neither list.
    """
    held = held_out_ids(run)
    n_candidates = len(image_files(extra_dirs))

    def enough_images(assign: dict[str, str]) -> None:
        n = sum(s == "train" and i not in held for i, s in assign.items()) + n_candidates
        if n < batch_size:
            raise ValueError(f"pre-training needs at least one batch of images: --batch-size {batch_size}, but "
                             f"only {n} images; lower --batch-size or add images (--images)")

    # Checked before a new split is saved (a pre-training that cannot run leaves no split in the
    # run), and again on a split that existed, before any image is decoded.
    index, assign, info = prepare_split(data_dir, str(run), split_seed, limit, check=enough_images)
    enough_images(assign)
    recs = [r for r in index.records if r.image_id not in held]
    train = [r for r in recs if assign.get(r.image_id) == "train"]
    val = [r for r in recs if assign.get(r.image_id) == "val"]
    never = [r for r in index.records if assign.get(r.image_id) in ("val", "test")]
    extra, refused = extra_images(extra_dirs, {r.image_id for r in never}, [r.path for r in never])
    return train, val, extra, refused, info


def _finished_encoder(out: Path, config: BranchConfig, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of an encoder in ``out`` that finished with these settings (``--resume`` keeps it), else None.

    One with an unfinished checkpoint beside it, other settings, or a damaged file is not finished:
    it is pre-trained again (with a warning for the last two).
    """
    from models.pretrain import CHECKPOINT_DIR, INFO_FILE, read_encoder

    if not (out / INFO_FILE).is_file() or (out / CHECKPOINT_DIR / "state.json").is_file():
        return None
    try:
        recorded, _ = read_encoder(out)
    except (ValueError, FileNotFoundError) as exc:
        logger.warning("[%s] %s; pre-training it again", config.view, exc)
        return None
    recorded.setdefault("block_order", SAVED_BEFORE_FIELD["block_order"])  # written before the field existed
    expected = {**settings, "view": config.view, "image_size": config.image_size, "base_filters": config.base_filters,
                "block_order": config.block_order, "color_constancy": config.color_constancy}
    differ = sorted(k for k, v in expected.items() if recorded.get(k) != v)
    if differ:
        logger.warning("[%s] %s was pre-trained with other settings (%s); pre-training it again", config.view, out,
                       ", ".join(f"{k} {recorded.get(k)!r}, now {expected[k]!r}" for k in differ))
        return None
    return {"out": str(out), **{k: recorded[k] for k in ("n_images", "n_training_images", "n_extra_images",
                                                          "extra_refused", "history")}, "kept": True}


def pretrain_view(data_dir: str, run_dir: str, config: BranchConfig, out_dir: str | None = None,
                  extra_dirs: Sequence[str] = (), epochs: int = 20, batch_size: int = 64,
                  learning_rate: float | None = None, split_seed: int = 0, limit: int | None = None,
                  workers: int = 2, cache_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Pre-train ``config.view``'s encoder on the run's training images (+ ``extra_dirs``) and save it.

    Every finished epoch is checkpointed in ``<out>/.checkpoint``; with ``resume`` an interrupted
    pre-training of the same settings continues from there, and an encoder already finished with
    the same settings is kept (its summary says ``"kept": True``). The checkpoint is removed once
    the encoder is written.

    Returns:
        A summary: the encoder directory, image counts, and the history (loss, collapse
        indicator and k-NN probe validation AUC per epoch).

    Raises:
        ValueError: if the run's split belongs to other data or too few images remain.
        FileNotFoundError: if an ``extra_dirs`` folder is missing.
    """
    from models.pretrain import CHECKPOINT_DIR, IMAGES_FILE, PROBE_K, pretrain_encoder, save_encoder

    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "pretrain" / config.view
    with run_lock(run, f"skinfusion pretrain --view {config.view}"):
        train, val, extra, refused, info = _pretraining_images(data_dir, run, extra_dirs, batch_size, split_seed, limit)
        settings = {"data_dir": str(Path(data_dir).resolve()), "run": str(run.resolve()),
                    "dataset_fingerprint": info.get("dataset_fingerprint"), "epochs": epochs,
                    "batch_size": batch_size, "learning_rate": learning_rate, "seed": config.seed,
                    "lesion_crop": config.lesion_crop, "extra_dirs": [str(Path(d).resolve()) for d in extra_dirs]}
        finished = _finished_encoder(out, config, settings) if resume else None
        if finished is not None:
            logger.info("[%s] %s is already pre-trained with these settings: kept", config.view, out)
            return finished
        if refused:
            logger.warning("[%s] left %d files of --images out of pre-training: they are validation or test images "
                           "of the run (same name or same bytes)", config.view, refused)
        paths = [r.path for r in train] + extra
        margin = config.decode_margin
        images, ok, failed = cached_images(paths, config.image_size, cache_dir=cache_dir, workers=workers,
                                           desc="pre-training images", lesion_margin=margin)
        if failed:
            logger.warning("skipped %d unreadable images", len(failed))
        # The probe: labelled training images as the reference, validation images as the queries.
        n_train_ok = int(np.sum(np.asarray(ok) < len(train)))
        rng = np.random.default_rng(config.seed)
        ref_pos = np.sort(rng.choice(n_train_ok, min(PROBE_REFERENCE, n_train_ok), replace=False))
        ref_y = np.array([train[ok[i]].label for i in ref_pos])
        val_images, val_ok, _ = cached_images([r.path for r in val], config.image_size, cache_dir=cache_dir,
                                              workers=workers, desc="probe validation images", lesion_margin=margin)
        val_y = np.array([val[i].label for i in val_ok])
        probe = (images[ref_pos], ref_y, val_images[np.arange(len(val_images))], val_y) \
            if len(set(ref_y.tolist())) == 2 and len(set(val_y.tolist())) == 2 else None

        def progress(e: dict[str, Any]) -> None:
            probe_text = f"  k-NN probe val AUC {e['knn_auc']:.4f}" if "knn_auc" in e else ""
            if e["epoch"] == 0:
                logger.info("[%s] before pre-training:%s", config.view, probe_text)
            else:
                logger.info("[%s] pretrain epoch %d/%d  loss %.4f  collapse indicator %.2f%s  (%.1fs)", config.view,
                            e["epoch"], epochs, e["loss"], e["collapse_indicator"], probe_text, e["seconds"])

        logger.info("[%s] pre-training on %d unlabelled images (%d training, %d extra), %d epochs",
                    config.view, len(images), n_train_ok, len(images) - n_train_ok, epochs)
        checkpoint = out / CHECKPOINT_DIR
        if not resume and (checkpoint / "state.json").is_file():
            logger.warning("[%s] %s holds an interrupted pre-training; starting again (pass --resume to continue it)",
                           config.view, checkpoint)
            shutil.rmtree(checkpoint)
        t0 = time.perf_counter()
        model, history = pretrain_encoder(config, images, epochs=epochs, batch_size=batch_size,
                                          learning_rate=learning_rate, probe=probe, on_epoch=progress,
                                          checkpoint=checkpoint, resume=resume)
        used = [paths[i] for i in ok]
        ids = [train[i].image_id for i in ok if i < len(train)] + used[n_train_ok:]
        save_encoder(out, model, config, {
            **settings, "n_images": len(images), "n_training_images": n_train_ok,
            "n_extra_images": len(images) - n_train_ok, "extra_refused": refused,
            "probe": {"k": PROBE_K, "reference": int(len(ref_pos)), "queries": int(len(val_y))} if probe else None,
            "history": history, "train_seconds": round(time.perf_counter() - t0, 1)})
        (out / IMAGES_FILE).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        shutil.rmtree(checkpoint, ignore_errors=True)  # the encoder is written: nothing left to resume
    return {"out": str(out), "n_images": len(images), "n_training_images": n_train_ok,
            "n_extra_images": len(images) - n_train_ok, "extra_refused": refused, "history": history}


def pretrain_views(data_dir: str, run_dir: str, configs: Sequence[BranchConfig], out_dirs: Sequence[str | None],
                   jobs: int = 1, **options: Any) -> list[dict[str, Any]]:
    """``pretrain_view`` for several views of one run: one after another, or ``jobs`` at once in processes.

    The run is locked once for all of them. With ``jobs > 1`` the split and the decoded-image caches
    are made first, in this process, so the workers share them instead of racing to write them,
    and each worker gets ``cores // jobs`` TensorFlow threads.

    Args:
        data_dir, run_dir: as for ``pretrain_view``.
        configs: one config per view.
        out_dirs: each view's encoder directory (None: ``RUN/pretrain/<view>``), in ``configs`` order.
        jobs: views pre-trained at once.
        **options: the other arguments of ``pretrain_view`` (extra_dirs, epochs, batch_size, ...).

    Returns:
        The summaries of ``pretrain_view``, in ``configs`` order.
    """
    if len(out_dirs) != len(configs):
        raise ValueError(f"got {len(out_dirs)} encoder directories for {len(configs)} views")
    run = Path(run_dir)
    calls = [(data_dir, run_dir, c, o) for c, o in zip(configs, out_dirs)]
    with run_lock(run, "skinfusion pretrain --view " + "+".join(c.view for c in configs)):
        if jobs == 1 or len(configs) == 1:
            import keras  # the first pre-training loads TensorFlow anyway

            summaries = []
            for call in calls:
                summaries.append(pretrain_view(*call, **options))
                keras.backend.clear_session()  # free the finished encoder's graph before the next one
            return summaries
        train, val, extra, _, _ = _pretraining_images(data_dir, run, options.get("extra_dirs", ()),
                                                      options.get("batch_size", 64), options.get("split_seed", 0),
                                                      options.get("limit"))
        for size, margin in sorted({(c.image_size, c.decode_margin) for c in configs}, key=str):
            for paths, desc in (([r.path for r in train] + extra, "pre-training images"),
                                ([r.path for r in val], "probe validation images")):
                cached_images(paths, size, cache_dir=options.get("cache_dir"), workers=options.get("workers", 2),
                              desc=desc, lesion_margin=margin)
        logger.info("pre-training %d views in %d processes, %d TensorFlow threads each", len(configs), jobs,
                    threads_per_job(jobs))
        return in_processes(_pretrain_view_kwargs, [(*call, options) for call in calls], jobs)


def _pretrain_view_kwargs(data_dir: str, run_dir: str, config: BranchConfig, out_dir: str | None,
                          options: dict[str, Any]) -> dict[str, Any]:
    """``pretrain_view`` with its keyword options as one argument: what a worker process runs."""
    return pretrain_view(data_dir, run_dir, config, out_dir, **options)
