"""Self-supervised pre-training of a branch's encoder (SimSiam), and fine-tuning a branch from it.

SimSiam (Chen & He, CVPR 2021): two random augmentations of each image go through the encoder
(the branch's four conv blocks and global pooling), a projection MLP and a prediction MLP; the
loss is the negative cosine similarity between one view's prediction and the other view's
projection, whose gradient is stopped. It needs no negative pairs, no momentum encoder and no
large batches, which suits small CNNs trained on two CPU cores. Labels are never used in
training; a k-nearest-neighbour probe on labelled training images, scored on validation images,
reports how useful the embedding is as training goes.

The encoder is stored pickle-free: ``encoder.npz`` (the conv and BatchNorm weights by layer
name, loaded with ``allow_pickle=False``) and ``pretrain.json`` (what it was trained on, its
SHA-256 and history). ``train --init-from DIR`` copies those weights into a new branch before
its first epoch; the output layer starts from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from colorspaces import apply_constancy, apply_view
from colorspaces.files import atomic_path, read_json_object, sha256_file, write_json_atomic
from colorspaces.interrupts import deferred_sigint
from models.augment import augment_batch
from models.batches import _numpy_batches, view_batches
from models.branch import build_branch
from models.config import SAVED_BEFORE_FIELD, BranchConfig

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.npz"
INFO_FILE = "pretrain.json"
IMAGES_FILE = "images.txt"
#: Per-epoch checkpoint of an unfinished pre-training, inside the encoder directory.
CHECKPOINT_DIR = ".checkpoint"
ENCODER_LAYERS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4")
#: The augmentations that make the two views of an image: dihedral flips and turns (always), a
#: random resized crop of 40-100% of the area, and colour jitter. Milder colour changes than on
#: natural images: colour is part of what tells a melanoma.
SSL_RESIZED_CROP = 0.6
SSL_COLOR_JITTER = 0.3
PROBE_K = 20


def encoder(model: keras.Model) -> keras.Model:
    """The branch up to its pooled embedding (``gap``): the part pre-training learns."""
    return keras.Model(model.input, model.get_layer("gap").output, name=f"encoder_{model.name}")


def _mlp(dims: tuple[int, ...], name: str, last_bn: bool) -> keras.Sequential:
    layers: list[keras.layers.Layer] = []
    for i, d in enumerate(dims):
        layers.append(keras.layers.Dense(d, use_bias=False, name=f"{name}_dense{i}"))
        if i < len(dims) - 1 or last_bn:
            layers.append(keras.layers.BatchNormalization(name=f"{name}_bn{i}"))
        if i < len(dims) - 1:
            layers.append(keras.layers.ReLU(name=f"{name}_relu{i}"))
    return keras.Sequential(layers, name=name)


def _two_views(config: BranchConfig) -> BranchConfig:
    return dataclasses.replace(config, augment=True, resized_crop=SSL_RESIZED_CROP, color_jitter=SSL_COLOR_JITTER,
                               rotate_degrees=0.0, scale_jitter=0.0, acquisition=0.0)


def knn_auc(enc: keras.Model, config: BranchConfig, ref_images, ref_y: np.ndarray, query_images,
            query_y: np.ndarray, k: int = PROBE_K) -> float:
    """Validation AUC of a k-NN melanoma score (share of melanomas among the k most cosine-similar reference images)."""
    from sklearn.metrics import roc_auc_score

    def embed(images):
        ds = view_batches(images, config.view, 128, constancy=config.color_constancy)
        e = np.concatenate([enc(x, training=False).numpy() for x in ds.as_numpy_iterator()]) if len(images) else \
            np.zeros((0, 1))
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    ref, query = embed(ref_images), embed(query_images)
    k = min(k, len(ref))
    sims = query @ ref.T
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    score = np.asarray(ref_y, np.float64)[nearest].mean(axis=1)
    return float(roc_auc_score(np.asarray(query_y).astype(int), score))


def pretrain_encoder(config: BranchConfig, images, epochs: int = 20, batch_size: int = 64,
                     learning_rate: float | None = None, probe: tuple | None = None,
                     on_epoch: Callable[[dict[str, Any]], None] | None = None,
                     checkpoint: str | os.PathLike | None = None,
                     resume: bool = False) -> tuple[keras.Model, list[dict]]:
    """Pre-train a branch's encoder on unlabelled images with SimSiam.

    Args:
        config: the branch config (view, image size, width, colour constancy, seed); its
            augmentation fields are replaced by the two-view augmentations above.
        images: RGB uint8 (N, S, S, 3) with S = ``config.image_size``, an array or an ``ImageCache``.
        epochs: passes over ``images``.
        batch_size: images per step (each gives two views).
        learning_rate: SGD rate (momentum 0.9, weight decay 1e-4, cosine decay); default
            0.05 x batch_size / 256, the SimSiam rule.
        probe: ``(ref_images, ref_y, query_images, query_y)`` labelled images for the k-NN
            probe AUC before training and after each epoch (labels are used for nothing else).
        on_epoch: called with each epoch's record (progress).
        checkpoint: a folder where every finished epoch is saved (all weights, the optimizer's
            state and the history), so that an interrupted pre-training can continue.
        resume: continue from ``checkpoint`` if it holds a pre-training of the same settings
            (config, images, epochs, batch size, learning rate); the batches and augmentations
            of each epoch depend only on the seed and the epoch, so it continues where it stopped.

    Returns:
        ``(branch model whose encoder layers hold the pre-trained weights, history)``; the history
        has, per epoch, the loss, the collapse indicator (the per-dimension SD of the
        l2-normalised projections x sqrt(dim): about 1 when healthy, 0 when every image maps
        to one point) and the probe AUC.

    Raises:
        ValueError: for fewer images than one batch, or images of the wrong shape.
    """
    n = len(images)
    size = config.image_size
    if n < batch_size:
        raise ValueError(f"pre-training needs at least one batch of images: --batch-size {batch_size}, but only {n} "
                         "images; lower --batch-size or add images (--images)")
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images must be (N, {size}, {size}, 3) uint8, got {images.shape}")
    keras.utils.set_random_seed(config.seed)
    branch = build_branch(config)
    enc = encoder(branch)
    dim = int(enc.output.shape[-1])
    proj_dim = 4 * dim
    projector = _mlp((proj_dim, proj_dim), "projector", last_bn=True)
    predictor = _mlp((proj_dim // 4, proj_dim), "predictor", last_bn=False)
    steps = n // batch_size
    lr = learning_rate if learning_rate is not None else 0.05 * batch_size / 256
    optimizer = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps)),
                                     momentum=0.9, weight_decay=1e-4)
    x0 = np.zeros((2, size, size, config.channels), np.float32)
    predictor(projector(enc(x0)))  # build every variable before the traced step
    variables = enc.trainable_variables + projector.trainable_variables + predictor.trainable_variables
    optimizer.build(variables)
    aug = _two_views(config)
    state = [*enc.variables, *projector.variables, *predictor.variables, *optimizer.variables]
    # Through JSON, so that it compares equal to what a checkpoint's state.json reads back.
    settings = json.loads(json.dumps({"config": config.to_dict(), "n_images": int(n), "epochs": int(epochs),
                                      "batch_size": int(batch_size), "learning_rate": float(lr)}))
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoint is not None and resume:
        saved = _restore(Path(checkpoint), settings, state)
        if saved is not None:
            start, history = saved["epoch"], saved["history"]
            logger.info("[%s] resuming pre-training after epoch %d of %d", config.view, start, epochs)

    def negcos(p, z):
        return -tf.reduce_mean(tf.reduce_sum(tf.math.l2_normalize(p, 1) * tf.math.l2_normalize(tf.stop_gradient(z), 1), 1))

    @tf.function(reduce_retracing=True)
    def step(x1, x2):
        with tf.GradientTape() as tape:
            z1 = projector(enc(x1, training=True), training=True)
            z2 = projector(enc(x2, training=True), training=True)
            p1, p2 = predictor(z1, training=True), predictor(z2, training=True)
            loss = 0.5 * negcos(p1, z2) + 0.5 * negcos(p2, z1)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        spread = tf.reduce_mean(tf.math.reduce_std(tf.math.l2_normalize(z1, 1), axis=0)) * math.sqrt(proj_dim)
        return loss, spread

    def load(k):
        epoch, b = divmod(int(k), steps)
        order = np.random.default_rng([config.seed, epoch, 7]).permutation(n)
        batch = apply_constancy(config.color_constancy, images[np.sort(order[b * batch_size:(b + 1) * batch_size])])
        views = [apply_view(config.view, augment_batch(batch, np.random.default_rng([config.seed, epoch, b, v]), aug))
                 for v in (0, 1)]
        return tuple(x.astype(np.float32, copy=False) for x in views)

    shape = (None, size, size, config.channels)
    ds = _numpy_batches(load, epochs * steps, [shape, shape], first=start * steps)

    def record(epoch: int, loss: float, spread: float, seconds: float) -> None:
        entry = {"epoch": epoch, "loss": loss, "collapse_indicator": spread, "seconds": round(seconds, 1)}
        if probe is not None:
            entry["knn_auc"] = knn_auc(enc, config, *probe)
        history.append(entry)
        if checkpoint is not None and epoch > 0:
            _save_state(Path(checkpoint), settings, state, epoch, history)
        if on_epoch:
            on_epoch(entry)

    if start == 0:
        record(0, float("nan"), float("nan"), 0.0)
    it = iter(ds)
    for epoch in range(start + 1, epochs + 1):
        t0, losses, spreads = time.perf_counter(), [], []
        for _ in range(steps):
            with deferred_sigint():  # Ctrl-C raised between steps, not inside TensorFlow's C++ (colorspaces.interrupts)
                x1, x2 = next(it)
                loss, spread = step(x1, x2)
            losses.append(float(loss))
            spreads.append(float(spread))
        record(epoch, float(np.mean(losses)), float(np.mean(spreads)), time.perf_counter() - t0)
    return branch, history


def _save_state(folder: Path, settings: dict[str, Any], variables: list, epoch: int,
                history: list[dict[str, Any]]) -> None:
    """Write ``state-NNNN.npz`` (every variable, in creation order) then ``state.json``, each atomically.

    ``state.json`` names the npz and holds its SHA-256, and is written last; the previous epoch's
    npz is deleted only after it, so a kill at any moment leaves a complete epoch to resume.
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{epoch:04d}.npz"
    with atomic_path(folder / name) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, *(np.asarray(keras.ops.convert_to_numpy(v)) for v in variables))
    write_json_atomic(folder / "state.json", {**settings, "epoch": epoch, "history": history, "npz": name,
                                              "sha256": sha256_file(folder / name)})
    for old in folder.glob("state*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _restore(folder: Path, settings: dict[str, Any], variables: list) -> dict[str, Any] | None:
    """Load a checkpoint of the same ``settings`` into ``variables``; None (and why, logged) if there is none."""
    if not (folder / "state.json").is_file():
        logger.info("%s: no pre-training checkpoint; starting from the first epoch", folder)
        return None
    saved = read_json_object(folder / "state.json", required=("epoch", "history", "sha256", *settings),
                             hint=f"delete {folder} to start again")
    differ = sorted(k for k in settings if saved[k] != settings[k])
    if differ:
        raise ValueError(f"{folder}: the interrupted pre-training used other settings ({', '.join(differ)}); run "
                         f"without --resume to start again, or with the settings it used")
    name = saved.get("npz", "state.npz")  # state.npz: a checkpoint written before the name was recorded
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{folder / 'state.json'}: damaged, 'npz' must name a file beside it; delete {folder} "
                         "to start again")
    path = folder / name
    if not path.is_file() or sha256_file(path) != saved["sha256"]:
        raise ValueError(f"{path}: missing or modified since {folder / 'state.json'} was written; delete {folder} "
                         "to start again")
    with np.load(path, allow_pickle=False) as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(arrays) != len(variables) or any(a.shape != tuple(v.shape) for a, v in zip(arrays, variables)):
        raise ValueError(f"{path}: holds other weights than this pre-training's; delete {folder} to start again")
    for v, a in zip(variables, arrays):
        v.assign(a)
    return saved


def encoder_arrays(model: keras.Model) -> dict[str, np.ndarray]:
    """The encoder layers' weights as ``{"conv1/kernel": array, ...}``."""
    out = {}
    for name in ENCODER_LAYERS:
        layer = model.get_layer(name)
        for v in layer.weights:
            out[f"{name}/{v.name}"] = np.asarray(keras.ops.convert_to_numpy(v))
    return out


def save_encoder(out_dir: str | os.PathLike, model: keras.Model, config: BranchConfig, info: dict[str, Any]) -> Path:
    """Write ``encoder.npz`` and ``pretrain.json`` (with the npz's SHA-256) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ENCODER_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **encoder_arrays(model))
    write_json_atomic(out / INFO_FILE, {
        **info, "view": config.view, "image_size": config.image_size, "base_filters": config.base_filters,
        "block_order": config.block_order,
        "color_constancy": config.color_constancy, "encoder": {"file": ENCODER_FILE,
                                                               "sha256": sha256_file(out / ENCODER_FILE)}})
    return out


def read_encoder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(pretrain.json, arrays)`` of an encoder directory, hash-checked, without unpickling anything.

    Raises:
        FileNotFoundError: if the directory or a file is missing.
        ValueError: naming the damaged file and what to do.
    """
    d = Path(directory)
    redo = f"re-run `skinfusion pretrain` to rewrite {d}"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such encoder directory (`skinfusion pretrain --out {d}` writes one)")
    info = read_json_object(d / INFO_FILE, required=("view", "base_filters", "encoder"), hint=redo)
    enc = info["encoder"]
    if not (isinstance(enc, dict) and isinstance(enc.get("sha256"), str)):
        raise ValueError(f"{d / INFO_FILE}: damaged, 'encoder' must hold the file's 'sha256'; {redo}")
    path = d / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {redo}")
    if sha256_file(path) != enc["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from {d / INFO_FILE}; the encoder was modified, refusing it; {redo}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"cannot load {path}: {type(exc).__name__}: {exc}; {redo}") from None
    return info, arrays


def check_init_from(config: BranchConfig, directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``read_encoder(directory)``, refused unless it was pre-trained for ``config``'s view and width."""
    try:
        info, arrays = read_encoder(directory)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--init-from: {exc}") from None
    if info["view"] != config.view or info["base_filters"] != config.base_filters:
        raise ValueError(f"--init-from {directory}: the encoder was pre-trained for view {info['view']!r} with "
                         f"--base-filters {info['base_filters']}, this branch is {config.view!r} with "
                         f"{config.base_filters}; pre-train one for this view and width")
    # Encoders written before block_order existed were built in the only order there was then.
    order = info.get("block_order", SAVED_BEFORE_FIELD["block_order"])
    if order != config.block_order:
        raise ValueError(f"--init-from {directory}: the encoder was pre-trained with --block-order {order}, this "
                         f"branch uses {config.block_order}; pre-train one with `skinfusion pretrain --block-order "
                         f"{config.block_order}`")
    return info, arrays


def init_from_encoder(model: keras.Model, config: BranchConfig, directory: str | os.PathLike) -> dict[str, Any]:
    """Copy a pre-trained encoder's weights into ``model`` (a new branch of ``config``); returns its ``pretrain.json``.

    Raises:
        ValueError: if the encoder was trained for another view or width (naming both), or a
            weight is missing or of another shape.
    """
    info, arrays = check_init_from(config, directory)
    for name in ENCODER_LAYERS:
        layer = model.get_layer(name)
        values = []
        for v in layer.weights:
            key = f"{name}/{v.name}"
            if key not in arrays or arrays[key].shape != tuple(v.shape):
                got = arrays[key].shape if key in arrays else "nothing"
                raise ValueError(f"--init-from {directory}: {ENCODER_FILE} holds {got} for {key}, the branch needs "
                                 f"{tuple(v.shape)}; re-run `skinfusion pretrain`")
            values.append(arrays[key])
        layer.set_weights(values)
    if info.get("image_size") not in (None, config.image_size):
        logger.info("[%s] encoder pre-trained at %s px, fine-tuned at %d px (convolutions do not depend on the size)",
                    config.view, info.get("image_size"), config.image_size)
    return info
