"""Training one branch: seeding, class imbalance, augmentation and early stopping on validation AUC."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import keras
import numpy as np

from colorspaces import apply_view
from models.branch import BranchConfig, build_branch

logger = logging.getLogger(__name__)


def class_weights(y: np.ndarray, mode: str) -> dict[int, float]:
    """Per-class loss weights.

    Args:
        y: binary labels (1 = melanoma).
        mode: "balanced" (n / (2 · n_class), so both classes carry equal total weight) or "none".

    Returns:
        A dict {0: w0, 1: w1}.

    Raises:
        ValueError: if ``y`` lacks a class or ``mode`` is unknown.
    """
    y = np.asarray(y).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        raise ValueError(f"training labels need both classes, got counts nevus={counts[0]} melanoma={counts[1]}")
    if mode == "none":
        return {0: 1.0, 1: 1.0}
    if mode == "balanced":
        return {c: float(len(y) / (2.0 * counts[c])) for c in (0, 1)}
    raise ValueError(f"class_weight mode must be 'balanced' or 'none', got {mode!r}")


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 90° rotations and horizontal flips of RGB images (a lesion has no canonical orientation).

    They are applied to the RGB image before the view, so each view sees the same
    geometric change it would see at inference.
    """
    out = np.empty_like(images)
    ks = rng.integers(0, 4, size=len(images))
    flips = rng.random(len(images)) < 0.5
    for i, (img, k, flip) in enumerate(zip(images, ks, flips)):
        img = np.rot90(img, k)
        out[i] = img[:, ::-1] if flip else img
    return out


def epoch_order(y: np.ndarray, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of the training images to visit in one epoch, shuffled.

    Args:
        y: binary labels (1 = melanoma).
        sampling: "none", "undersample" or "oversample" (see ``BranchConfig.sampling``).
        rng: the epoch's random generator.

    Returns:
        An index array; its length depends only on the class counts, not on the epoch.
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if sampling == "none":
        idx = np.arange(len(y))
    elif sampling == "undersample":
        idx = np.concatenate([pos, rng.choice(neg, size=min(len(pos), len(neg)), replace=False)])
    elif sampling == "oversample":
        idx = np.concatenate([neg, rng.choice(pos, size=len(neg), replace=True)])
    else:
        raise ValueError(f"sampling must be none, undersample or oversample, got {sampling!r}")
    return rng.permutation(idx)


class _ViewBatches(keras.utils.PyDataset):
    """Shuffled, augmented training batches; the view is computed per batch from uint8 images."""

    def __init__(self, images, y, config: BranchConfig, weights: dict[int, float]):
        super().__init__()
        self.images, self.y, self.config = images, y.astype(np.float32), config
        self.sample_weight = np.where(self.y > 0.5, weights[1], weights[0]).astype(np.float32)
        self.epoch = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return epoch_order(self.y, self.config.sampling, np.random.default_rng([self.config.seed, self.epoch]))

    def __len__(self) -> int:
        # Fixed per run: Keras reads it once; the sampled order changes each epoch, its length does not.
        return math.ceil(len(self._order) / self.config.batch_size)

    def __getitem__(self, index: int):
        idx = self._order[index * self.config.batch_size : (index + 1) * self.config.batch_size]
        batch = self.images[idx]
        if self.config.augment:
            batch = augment_batch(batch, np.random.default_rng([self.config.seed, self.epoch, index]))
        return apply_view(self.config.view, batch), self.y[idx], self.sample_weight[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._permutation()


class _EpochLogger(keras.callbacks.Callback):
    """Logs one progress line per epoch, so long runs show where they are."""

    def __init__(self, view: str, epochs: int):
        super().__init__()
        self.view, self.epochs, self._t0 = view, epochs, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        logger.info(
            "[%s] epoch %d/%d  loss %.4f  auc %.4f  val_loss %.4f  val_auc %.4f  (%.1fs)",
            self.view, epoch + 1, self.epochs, logs.get("loss", float("nan")),
            logs.get("auc", float("nan")), logs.get("val_loss", float("nan")),
            logs.get("val_auc", float("nan")), time.perf_counter() - self._t0,
        )


def fit_branch(
    config: BranchConfig,
    train_images: np.ndarray,
    y_train: np.ndarray,
    val_images: np.ndarray,
    y_val: np.ndarray,
) -> tuple[keras.Model, dict[str, Any]]:
    """Train one branch from scratch and keep the weights of its best validation-AUC epoch.

    Args:
        config: branch hyper-parameters; its seed is set here.
        train_images: RGB uint8 (N, S, S, 3) with S = ``config.image_size``.
        y_train: binary labels (1 = melanoma), shape (N,).
        val_images: RGB uint8 validation images, same size.
        y_val: validation labels; both classes must be present.

    Returns:
        ``(model, history)``; history holds per-epoch metrics, the best epoch, the class
        weights used and the training time in seconds.

    Raises:
        ValueError: if shapes disagree with the config or a class is missing.
    """
    size = config.image_size
    for name, arr in (("train_images", train_images), ("val_images", val_images)):
        if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or arr.dtype != np.uint8:
            raise ValueError(
                f"{name} must be uint8 of shape (N, {size}, {size}, 3), got {arr.dtype} {arr.shape}"
            )
    y_train, y_val = np.asarray(y_train).astype(int), np.asarray(y_val).astype(int)
    if len(np.unique(y_val)) < 2:
        raise ValueError("validation labels need both classes to compute AUC")
    weights = class_weights(y_train, config.class_weight)

    keras.utils.set_random_seed(config.seed)
    model = build_branch(config)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)],
    )
    x_val = apply_view(config.view, val_images)
    early = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    logger.info(
        "[%s] training on %d images (%d melanoma), validating on %d; class weights %s",
        config.view, len(y_train), int(y_train.sum()), len(y_val),
        {k: round(v, 3) for k, v in weights.items()},
    )
    t0 = time.perf_counter()
    fit = model.fit(
        _ViewBatches(train_images, y_train, config, weights),
        validation_data=(x_val, y_val.astype(np.float32)),
        validation_batch_size=128,
        epochs=config.epochs,
        callbacks=[early, _EpochLogger(config.view, config.epochs)],
        verbose=0,
    )
    seconds = time.perf_counter() - t0
    val_auc = [float(v) for v in fit.history.get("val_auc", [])]
    best = int(np.argmax(val_auc)) if val_auc else -1
    history = {
        "epochs_run": len(val_auc),
        "best_epoch": best + 1,
        "best_val_auc": val_auc[best] if val_auc else float("nan"),
        "class_weights": {str(k): v for k, v in weights.items()},
        "train_seconds": round(seconds, 2),
        "per_epoch": {k: [float(v) for v in vals] for k, vals in fit.history.items()},
    }
    logger.info("[%s] done in %.1fs; best epoch %d with val_auc %.4f", config.view, seconds, best + 1, history["best_val_auc"])
    return model, history
