"""Training one branch: seeding, class imbalance (models.sampling), streamed (augmented) batches, early stopping on validation AUC.

The augmentation itself lives in ``models.augment``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from colorspaces import VIEWS, apply_constancy, apply_view, centre_crop, random_crops
from colorspaces.files import atomic_path, read_json_object, write_json_atomic
from models.augment import augment_batch
from models.branch import BranchConfig, build_branch
from models.sampling import class_weights, epoch_order

logger = logging.getLogger(__name__)

# What a checkpoint's state.json must hold for --resume to continue it.
_STATE_KEYS = ("epoch", "best", "best_epoch", "wait", "stopped", "history", "config", "seconds")

# "plateau" schedule: halve the learning rate after this many epochs without a better val AUC.
PLATEAU_PATIENCE, PLATEAU_FACTOR = 2, 0.5


def _numpy_batches(fn, n_steps: int, out_shapes, first: int = 0) -> Any:
    """A tf.data pipeline whose k-th element is ``fn(k)``, computed in parallel and prefetched.

    ``fn`` is NumPy/OpenCV code (reading the cache, augmenting, computing the view); it runs
    in tf.data's thread pool, so input preparation overlaps the training step. Elements
    come out in order (``deterministic=True``) and each depends only on ``k``, so a run is
    reproducible whatever the parallelism.
    """
    dtypes = [tf.float32] * len(out_shapes)

    def _map(k):
        outs = tf.numpy_function(fn, [k], dtypes, stateful=False)
        for t, shape in zip(outs, out_shapes):
            t.set_shape(shape)
        return tuple(outs)

    options = tf.data.Options()
    options.deterministic = True
    return (tf.data.Dataset.range(first, n_steps)
            .map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def training_batches(images, y: np.ndarray, config: BranchConfig, weights: dict[int, float],
                     epochs: int | None = None, start_epoch: int = 0,
                     sources: np.ndarray | None = None) -> tuple[Any, int]:
    """Streaming training input: shuffled (re)sampled batches, augmented, as view arrays.

    Args:
        images: RGB uint8 images of shape (N, L, L, 3), L = ``config.load_size`` (with crops on,
            each batch takes one random ``config.image_size`` window per image): a NumPy array or any array-like whose
            ``images[index_array]`` returns such a batch (e.g. ``skinfusion.data.cache.ImageCache``).
        y: binary labels (N,).
        config: the branch config (view, batch size, sampling, augmentation, seed).
        weights: per-class loss weights.
        epochs: epochs the dataset spans (default ``config.epochs``).
        start_epoch: first epoch to produce (a resumed run starts where it stopped).
        sources: each training image's source, for ``config.source_balance``.

    Returns:
        ``(dataset, steps_per_epoch)``; the dataset yields ``(x, y, sample_weight)`` for
        ``(epochs - start_epoch) * steps_per_epoch`` steps. Batch ``b`` of epoch ``e`` depends only on
        ``(seed, e, b)``.
    """
    y = np.asarray(y).astype(np.float32)
    sample_weight = np.where(y > 0.5, weights[1], weights[0]).astype(np.float32)
    bs, epochs = config.batch_size, epochs or config.epochs
    orders: dict[int, np.ndarray] = {}

    def order(epoch: int) -> np.ndarray:
        # Called from tf.data's threads: a lost race only recomputes the same seeded order.
        found = orders.get(epoch)
        if found is None:
            found = orders[epoch] = epoch_order(y, config.sampling, np.random.default_rng([config.seed, epoch]),
                                                sources, config.source_balance)
            orders.pop(epoch - 3, None)
        return found

    # The sampled order changes each epoch; its length does not.
    steps = math.ceil(len(order(0)) / bs)

    def load(k):
        epoch, b = divmod(int(k), steps)
        idx = order(epoch)[b * bs : (b + 1) * bs]
        batch = apply_constancy(config.color_constancy, images[idx])
        if config.load_size > config.image_size:
            # Its own generator, so switching crops on leaves the augmentation stream unchanged.
            batch = random_crops(batch, config.image_size, np.random.default_rng([config.seed, epoch, b, 1]))
        if config.augment:
            batch = augment_batch(batch, np.random.default_rng([config.seed, epoch, b]), config)
        return apply_view(config.view, batch).astype(np.float32, copy=False), y[idx], sample_weight[idx]

    size, ch = config.image_size, config.channels
    ds = _numpy_batches(load, epochs * steps, [(None, size, size, ch), (None,), (None,)], first=start_epoch * steps)
    return ds, steps


def view_batches(images, view: str, batch_size: int, y: np.ndarray | None = None, constancy: str = "none",
                 crop: int | None = None):
    """Streaming inference input: the view of ``images`` in order, ``batch_size`` at a time.

    No augmentation: only the preprocessing inference also applies (``constancy``). With
    ``crop``, each image's central ``crop``×``crop`` window (for validating a branch trained
    on crops while it trains; its saved validation scores average the full window grid).

    Yields ``x`` batches, or ``(x, y)`` when labels are given (for Keras validation data).
    """
    n = len(images)
    steps = math.ceil(n / batch_size)
    channels = VIEWS[view].channels
    size = crop or images.shape[1]
    y32 = None if y is None else np.asarray(y).astype(np.float32)

    def load(k):
        sl = slice(int(k) * batch_size, min(n, (int(k) + 1) * batch_size))
        batch = apply_constancy(constancy, images[np.arange(sl.start, sl.stop)])
        if batch.shape[1] > size:
            batch = centre_crop(batch, size)
        x = apply_view(view, batch).astype(np.float32, copy=False)
        return (x,) if y32 is None else (x, y32[sl])

    shapes = [(None, size, size, channels)] + ([] if y32 is None else [(None,)])
    ds = _numpy_batches(load, steps, shapes)
    return ds.map(lambda x: x) if y32 is None else ds


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
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    build: Callable[[BranchConfig], keras.Model] = build_branch,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    train_sources: Sequence[str] | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """Train one branch from scratch and keep the weights of its best validation-AUC epoch.

    Args:
        config: branch hyper-parameters; its seed is set here.
        train_images: RGB uint8 (N, L, L, 3) with L = ``config.load_size`` (``image_size``
            unless the config asks for crops): an array, or an
            array-like read a batch at a time (``skinfusion.data.cache.ImageCache``), so the
            training set need not fit in memory.
        y_train: binary labels (1 = melanoma), shape (N,).
        val_images: RGB uint8 validation images, same size.
        y_val: validation labels; both classes must be present.
        checkpoint_dir: if given, a checkpoint is written there after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir`` (from its last complete
            epoch, with the optimizer and early-stopping state), if there is one.
        build: the model builder (another architecture for a baseline; default the branch CNN).
        callbacks: extra Keras callbacks (e.g. a time budget).
        train_sources: each training image's source, needed when ``config.source_balance`` > 0.

    Returns:
        ``(model, history)``; history holds per-epoch metrics, the best epoch, the class
        weights used and the training time in seconds.

    Raises:
        ValueError: if shapes disagree with the config or a class is missing.
    """
    size = config.load_size
    for name, arr in (("train_images", train_images), ("val_images", val_images)):
        if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or arr.dtype != np.uint8:
            raise ValueError(
                f"{name} must be uint8 of shape (N, {size}, {size}, 3), got {arr.dtype} {arr.shape}"
            )
    y_train, y_val = np.asarray(y_train).astype(int), np.asarray(y_val).astype(int)
    if len(np.unique(y_val)) < 2:
        raise ValueError("validation labels need both classes to compute AUC")
    weights = class_weights(y_train, config.class_weight)
    if config.class_weight == "balanced" and config.sampling != "none":
        logger.warning("[%s] class_weight 'balanced' with sampling %r corrects the class imbalance twice; "
                       "use --class-weight balanced --sampling none, or the default (oversample, no weights)",
                       config.view, config.sampling)

    keras.utils.set_random_seed(config.seed)
    keeper = _BestKeeper(config, checkpoint_dir, build)
    model, initial_epoch = keeper.restore() if resume else (None, 0)
    if config.source_balance > 0 and train_sources is None:
        raise ValueError("source_balance needs each training image's source (train_sources)")
    sources = None if train_sources is None else np.asarray(train_sources)
    if sources is not None and len(sources) != len(y_train):
        raise ValueError(f"train_sources has {len(sources)} entries for {len(y_train)} training images")
    train_ds, steps = training_batches(train_images, y_train, config, weights, start_epoch=initial_epoch,
                                       sources=sources)
    if model is None:
        model = build(config)
        model.compile(
            optimizer=make_optimizer(config, steps),
            loss="binary_crossentropy",
            metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)],
        )
    logger.info(
        "[%s] training on %d images (%d melanoma), validating on %d; class weights %s",
        config.view, len(y_train), int(y_train.sum()), len(y_val),
        {k: round(v, 3) for k, v in weights.items()},
    )
    t0 = time.perf_counter()
    if initial_epoch < config.epochs and not keeper.stopped:
        model.fit(
            train_ds,
            steps_per_epoch=steps,
            shuffle=False,  # the dataset shuffles (seeded, per epoch) itself
            validation_data=view_batches(val_images, config.view, 128, y=y_val, constancy=config.color_constancy,
                                         crop=config.image_size),
            initial_epoch=initial_epoch,
            epochs=config.epochs,
            callbacks=[keeper, _EpochLogger(config.view, config.epochs), *callbacks],
            verbose=0,
        )
    keeper.restore_best(model)
    seconds = time.perf_counter() - t0 + keeper.seconds_before
    per_epoch = keeper.history
    val_auc = per_epoch.get("val_auc", [])
    best = int(np.argmax(val_auc)) if val_auc else -1
    history = {
        "epochs_run": len(val_auc),
        "best_epoch": best + 1,
        "best_val_auc": val_auc[best] if val_auc else float("nan"),
        "class_weights": {str(k): v for k, v in weights.items()},
        "train_seconds": round(seconds, 2),
        "resumed_from_epoch": initial_epoch,
        "per_epoch": per_epoch,
    }
    logger.info("[%s] done in %.1fs; best epoch %d with val_auc %.4f", config.view, seconds, best + 1, history["best_val_auc"])
    return model, history


def _seed_generators(model: keras.Model) -> dict[str, Any]:
    return {layer.name: layer.seed_generator for layer in model.layers if getattr(layer, "seed_generator", None) is not None}


def _seed_states(model: keras.Model) -> dict[str, list[int]]:
    # Dropout's random state is not part of a saved model; without it a resumed run would
    # draw different dropout masks from the uninterrupted one.
    return {name: np.asarray(keras.ops.convert_to_numpy(g.state.value)).tolist() for name, g in _seed_generators(model).items()}


def _set_seed_states(model: keras.Model, states: dict[str, list[int]]) -> None:
    for name, g in _seed_generators(model).items():
        if name in states:
            g.state.assign(np.asarray(states[name], dtype=keras.backend.standardize_dtype(g.state.dtype)))


def make_optimizer(config: BranchConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The config's optimizer, with its learning-rate schedule when that is a per-step one (cosine)."""
    lr: Any = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=config.epochs * steps_per_epoch)
    # Every trainable weight is decayed, BatchNorm's too, as Keras' AdamW does by default:
    # excluding some by name would not survive a --resume (the exclusion is not saved with
    # the optimizer).
    decay = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=decay)
    return keras.optimizers.Adam(lr, weight_decay=decay)


class _BestKeeper(keras.callbacks.Callback):
    """Early stopping on validation AUC that keeps the best weights, and (optionally) checkpoints.

    It replaces Keras' ``EarlyStopping`` and ``ReduceLROnPlateau`` so that their state (best
    AUC, best weights, epochs without improvement) can be saved with each epoch's checkpoint:
    a resumed run then stops, halves its learning rate and restores exactly as an
    uninterrupted one would. A checkpoint is ``last.keras`` (the
    model with its optimizer state), ``best.weights.h5`` and ``state.json``, each written
    atomically; ``state.json`` is written last, so it only ever names a complete epoch.
    """

    def __init__(self, config: BranchConfig, checkpoint_dir: str | os.PathLike | None,
                 build: Callable[[BranchConfig], keras.Model] = build_branch):
        super().__init__()
        self.config = config
        self.build = build  # the architecture the checkpoint's best weights belong to
        self.dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.best, self.best_epoch, self.wait, self.best_weights = -math.inf, -1, 0, None
        self.lr_wait = 0  # epochs without improvement since the last plateau halving
        self.history: dict[str, list[float]] = {}
        self.stopped, self.seconds_before, self._t0 = False, 0.0, time.perf_counter()

    def restore(self) -> tuple[keras.Model | None, int]:
        """Load the last complete epoch's checkpoint; ``(None, 0)`` if there is none to resume."""
        state_file = self.dir / "state.json" if self.dir else None
        if state_file is None or not state_file.is_file():
            logger.info("[%s] no checkpoint to resume from; training from the start", self.config.view)
            return None, 0
        fresh = "train without --resume to start again"
        state = read_json_object(state_file, required=_STATE_KEYS, hint=fresh)
        if not isinstance(state["config"], dict):
            raise ValueError(f"{state_file}: damaged, 'config' is not an object; {fresh}")
        try:
            same = self.config.matches(state["config"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{state_file}: damaged, its config is invalid ({exc}); {fresh}") from None
        if not same:
            raise ValueError(f"{self.dir}: the checkpoint was made with another config ({state['config']}); "
                             "resume with the same settings, or train without --resume")
        model = keras.saving.load_model(self.dir / "last.keras", compile=True)
        _set_seed_states(model, state.get("seed_states", {}))
        best_model = self.build(self.config)
        best_model.load_weights(self.dir / "best.weights.h5")
        self.best_weights = best_model.get_weights()
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.lr_wait = state.get("lr_wait", 0)
        self.history, self.stopped = state["history"], state["stopped"]
        self.seconds_before = state["seconds"]
        logger.info("[%s] resuming after epoch %d of %d (best val_auc %.4f at epoch %d)", self.config.view,
                    state["epoch"], self.config.epochs, self.best, self.best_epoch + 1)
        return model, int(state["epoch"])

    def on_train_begin(self, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))
        current = float(logs.get("val_auc", -math.inf))
        self.wait += 1
        if self.best_weights is None or current > self.best:
            self.best, self.best_epoch, self.wait = current, epoch, 0
            self.best_weights = self.model.get_weights()
            improved = True
        else:
            improved = False
        if self.config.lr_schedule == "plateau":
            self.lr_wait = 0 if improved else self.lr_wait + 1
            if self.lr_wait >= PLATEAU_PATIENCE:
                lr = self.model.optimizer.learning_rate
                lr.assign(lr * PLATEAU_FACTOR)
                self.lr_wait = 0
        if self.wait >= self.config.patience and epoch > 0:
            self.model.stop_training = self.stopped = True
        if self.dir:
            self._save(epoch + 1, improved)

    def _save(self, epochs_done: int, improved: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, save in (("last.keras", self.model.save),
                           *((("best.weights.h5", self.model.save_weights),) if improved else ())):
            with atomic_path(self.dir / name) as tmp:
                real = tmp.with_name(tmp.name + "." + name)  # Keras checks the suffix
                try:
                    save(real)
                    os.replace(real, tmp)
                finally:
                    real.unlink(missing_ok=True)
        write_json_atomic(self.dir / "state.json", {
            "epoch": epochs_done, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
            "lr_wait": self.lr_wait,
            "stopped": self.stopped, "history": self.history, "config": self.config.to_dict(),
            "seed_states": _seed_states(self.model),
            "seconds": self.seconds_before + time.perf_counter() - self._t0,
        })

    def restore_best(self, model: keras.Model) -> None:
        """Give ``model`` the weights of the best validation-AUC epoch."""
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
