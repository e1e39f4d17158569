"""Training one branch: seeding, class imbalance (models.sampling), streamed (augmented) batches, early stopping on validation AUC.

The augmentation itself lives in ``models.augment``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from colorspaces import VIEWS, apply_constancy, apply_view, centre_crop, random_crops
from models.augment import augment_batch
from models.branch import BranchConfig, build_branch
from models.checkpoint import _BestKeeper
from models.sampling import class_weights, epoch_order

logger = logging.getLogger(__name__)


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
                     sources: np.ndarray | None = None, replicas: int = 1,
                     my_replicas: tuple[int, int] = (0, 1),
                     image_weights: np.ndarray | None = None) -> tuple[Any, int]:
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
        replicas: replicas sharing each global batch of ``config.batch_size`` images (a
            ``tf.distribute`` strategy's ``num_replicas_in_sync``); it must divide the batch size.
        my_replicas: ``(first, count)``: the replicas this input pipeline feeds (a worker's).
        image_weights: a loss weight per training image (N,), multiplying its class weight
            (e.g. ``BranchConfig.follow_up_weight``); default 1.

    Returns:
        ``(dataset, steps_per_epoch)``; the dataset yields ``(x, y, sample_weight)`` for
        ``(epochs - start_epoch) * steps_per_epoch`` steps. Batch ``b`` of epoch ``e`` depends only on
        ``(seed, e, b)``. With ``replicas > 1`` it yields ``count`` per-replica batches per step,
        replica ``r`` taking rows ``r * batch_size / replicas`` onwards of the global batch, which
        is made (sampled, augmented) exactly as on one device; an epoch then has only full global
        batches (the last partial one, different images each epoch, is left out), so that every
        replica's share is equal and the summed update is the one-device update.
    """
    y = np.asarray(y).astype(np.float32)
    sample_weight = np.where(y > 0.5, weights[1], weights[0]).astype(np.float32)
    if image_weights is not None:
        sample_weight = sample_weight * np.asarray(image_weights, dtype=np.float32)
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

    if bs % replicas:
        raise ValueError(f"batch size {bs} is not divisible by the {replicas} replicas")
    per_replica = bs // replicas
    first, count = my_replicas
    # The sampled order changes each epoch; its length does not.
    n = len(order(0))
    steps = math.ceil(n / bs) if replicas == 1 else n // bs
    if steps == 0:
        raise ValueError(f"an epoch has {n} training images, fewer than the batch size {bs} the {replicas} replicas "
                         "share; lower --batch-size")
    # This pipeline's rows of each global batch (all of them on one device).
    mine = slice(first * per_replica, (first + count) * per_replica) if replicas > 1 else slice(None)

    def load(k):
        epoch, b = divmod(int(k), steps)
        idx = order(epoch)[b * bs : (b + 1) * bs]
        batch = apply_constancy(config.color_constancy, images[idx])
        if config.load_size > config.image_size:
            # Its own generator, so switching crops on leaves the augmentation stream unchanged.
            batch = random_crops(batch, config.image_size, np.random.default_rng([config.seed, epoch, b, 1]))
        if config.augment:
            # The whole global batch is augmented, from the generator of (seed, epoch, b), and
            # then sliced: each replica's images are those it would see on one device.
            batch = augment_batch(batch, np.random.default_rng([config.seed, epoch, b]), config)
        idx, batch = idx[mine], batch[mine]
        return apply_view(config.view, batch).astype(np.float32, copy=False), y[idx], sample_weight[idx]

    size, ch = config.image_size, config.channels
    ds = _numpy_batches(load, epochs * steps, [(None, size, size, ch), (None,), (None,)], first=start_epoch * steps)
    if count > 1 and replicas > 1:
        # One element per local replica, in replica order: tf.distribute hands a pipeline's
        # elements to its replicas round-robin.
        ds = ds.rebatch(per_replica)
    return ds, steps


def view_batches(images, view: str, batch_size: int, y: np.ndarray | None = None, constancy: str = "none",
                 crop: int | None = None, replicas: int = 1, my_replicas: tuple[int, int] = (0, 1)):
    """Streaming inference input: the view of ``images`` in order, ``batch_size`` at a time.

    No augmentation: only the preprocessing inference also applies (``constancy``). With
    ``crop``, each image's central ``crop``×``crop`` window (for validating a branch trained
    on crops while it trains; its saved validation scores average the full window grid).

    Yields ``x`` batches, or ``(x, y)`` when labels are given (for Keras validation data). With
    ``replicas > 1`` (validation under a ``tf.distribute`` strategy) the batch size is rounded
    down to a multiple of ``replicas``, each batch is split in ``replicas`` consecutive slices
    (equal but in the last batch) and this pipeline yields those of ``my_replicas`` (as in
    ``training_batches``); every image is still seen once.
    """
    n = len(images)
    batch_size = _validation_batch_size(n, batch_size, replicas)
    steps = math.ceil(n / batch_size)
    first, count = my_replicas
    channels = VIEWS[view].channels
    size = crop or images.shape[1]
    y32 = None if y is None else np.asarray(y).astype(np.float32)

    def load(k):
        step, r = divmod(int(k), count)
        begin, m = step * batch_size, min(batch_size, n - step * batch_size)
        r += first
        sl = slice(begin + r * m // replicas, begin + (r + 1) * m // replicas)
        if sl.start >= sl.stop:  # a replica past the end of the last batch: an empty share
            x = np.zeros((0, size, size, channels), np.float32)
            return (x,) if y32 is None else (x, y32[:0])
        batch = apply_constancy(constancy, images[np.arange(sl.start, sl.stop)])
        if batch.shape[1] > size:
            batch = centre_crop(batch, size)
        x = apply_view(view, batch).astype(np.float32, copy=False)
        return (x,) if y32 is None else (x, y32[sl])

    shapes = [(None, size, size, channels)] + ([] if y32 is None else [(None,)])
    ds = _numpy_batches(load, steps * count, shapes)
    return ds.map(lambda x: x) if y32 is None else ds


def _validation_batch_size(n: int, batch_size: int, replicas: int) -> int:
    # Under several replicas Keras checks that the first batch's slices have one shape: make
    # them equal by rounding the batch down to a multiple of the replicas.
    return batch_size if replicas == 1 else replicas * max(1, min(batch_size, n) // replicas)


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
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: bool = False,
    resume_dir: str | os.PathLike | None = None,
    train_weights: np.ndarray | None = None,
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
        strategy: the ``tf.distribute`` strategy to train under (``models.distribute``); default
            TensorFlow's default (one device). ``config.batch_size`` stays the global batch: each of
            the strategy's replicas takes an equal slice of it, and BatchNorm layers compute their
            batch statistics over the whole global batch (synchronised), as on one device.
        mixed_precision: build the model under Keras' ``mixed_float16`` policy, its output layer in
            float32 (probabilities and loss stay float32); the returned model is float32.
        resume_dir: where to read the checkpoint to resume (default ``checkpoint_dir``): a
            multi-worker run's non-chief workers read the chief's and write their own elsewhere.
        train_weights: a loss weight per training image, multiplying its class weight (default 1).

    Returns:
        ``(model, history)``; history holds per-epoch metrics, the best epoch, the class
        weights used and the training time in seconds. Trained under several replicas or mixed
        precision, the model is a plain float32 copy built outside the strategy.

    Raises:
        ValueError: if shapes disagree with the config, a class is missing, or the batch size
            is not divisible by the strategy's replicas.
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

    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the {replicas} replicas of "
                         f"{type(strategy).__name__}; use a multiple of {replicas}")
    if config.source_balance > 0 and train_sources is None:
        raise ValueError("source_balance needs each training image's source (train_sources)")
    sources = None if train_sources is None else np.asarray(train_sources)
    if sources is not None and len(sources) != len(y_train):
        raise ValueError(f"train_sources has {len(sources)} entries for {len(y_train)} training images")

    keras.utils.set_random_seed(config.seed)
    keeper = _BestKeeper(config, checkpoint_dir, build, resume_dir=resume_dir, mixed_precision=mixed_precision)
    with strategy.scope():  # variables (model, optimizer, metrics) are made as the strategy's
        model, initial_epoch = keeper.restore() if resume else (None, 0)
        _, steps = training_batches(train_images, y_train, config, weights, sources=sources, replicas=replicas,
                                    image_weights=train_weights)
        if model is None:
            model = _build_for_training(build, config, mixed_precision)
            model.compile(
                optimizer=make_optimizer(config, steps),
                loss="binary_crossentropy",
                metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)],
            )
        _synchronise_batchnorm(model, replicas > 1)
    val_size = config.image_size
    if replicas == 1:
        train_ds, _ = training_batches(train_images, y_train, config, weights, start_epoch=initial_epoch,
                                       sources=sources, image_weights=train_weights)
        val_ds = view_batches(val_images, config.view, 128, y=y_val, constancy=config.color_constancy, crop=val_size)
    else:
        # Each worker's input pipeline feeds its own replicas (ctx names which): the data are
        # sharded by batch slices, not by files, so every worker needs the whole training set.
        def train_fn(ctx):
            return training_batches(train_images, y_train, config, weights, start_epoch=initial_epoch,
                                    sources=sources, replicas=replicas, my_replicas=_my_replicas(ctx),
                                    image_weights=train_weights)[0]

        def val_fn(ctx):
            # Repeated: with validation_steps given, Keras keeps one iterator for all epochs.
            return view_batches(val_images, config.view, 128, y=y_val, constancy=config.color_constancy,
                                crop=val_size, replicas=replicas, my_replicas=_my_replicas(ctx)).repeat()

        train_ds = strategy.distribute_datasets_from_function(train_fn)
        val_ds = strategy.distribute_datasets_from_function(val_fn)
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
            validation_data=val_ds,
            # A distributed dataset's length is unknown to Keras: say it, or each epoch warns
            # that the validation input "ran out of data".
            validation_steps=None if replicas == 1 else math.ceil(
                len(y_val) / _validation_batch_size(len(y_val), 128, replicas)),
            initial_epoch=initial_epoch,
            epochs=config.epochs,
            callbacks=[keeper, _EpochLogger(config.view, config.epochs), *callbacks],
            verbose=0,
        )
    keeper.restore_best(model)
    if replicas > 1 or mixed_precision:
        # The branch is stored as a one-device float32 model, whatever trained it: the same
        # file as a one-device run's, loadable without the strategy or a GPU.
        trained, model = model, build(config)
        model.set_weights(trained.get_weights())
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


def _my_replicas(ctx: tf.distribute.InputContext) -> tuple[int, int]:
    """``(first replica, replica count)`` of the input pipeline ``ctx`` describes (one per worker)."""
    local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return ctx.input_pipeline_id * local, local


def _build_for_training(build: Callable[[BranchConfig], keras.Model], config: BranchConfig,
                        mixed_precision: bool) -> keras.Model:
    """``build(config)``, under the ``mixed_float16`` policy when asked, with its output layer in float32.

    Keras' mixed-precision rule: the last layer computes in float32, so the sigmoid's
    probabilities and the loss are not rounded to float16 (which saturates near 0 and 1).
    """
    if not mixed_precision:
        return build(config)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build(config)
        last = model.layers[-1]

        def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
            layer_config = layer.get_config()
            if layer is last:
                layer_config["dtype"] = "float32"
            return layer.__class__.from_config(layer_config)

        mixed = keras.models.clone_model(model, clone_function=clone)
        mixed.set_weights(model.get_weights())  # the seeded initial weights, not a second draw
    finally:
        keras.config.set_dtype_policy(previous)
    return mixed


def _synchronise_batchnorm(model: keras.Model, on: bool) -> None:
    # With several replicas, each would otherwise normalise by the mean and variance of its own
    # slice (batch / replicas images): the global batch's statistics keep the one-device maths.
    # Set on the layers (not in the builder) so the stored branch stays the same model.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


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
