"""Training one branch: seeding, class imbalance (models.sampling), streamed (augmented) batches, early stopping on validation AUC.

The augmentation itself lives in ``models.augment``, the input pipelines in ``models.batches``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from colorspaces.interrupts import deferred_sigint
from models.augment import augment_batch  # noqa: F401  (re-exported: tests and callers import it from here)
from models.batches import (  # noqa: F401  (re-exported, as before the pipelines had their own module)
    _my_replicas,
    _validation_batch_size,
    training_batches,
    view_batches,
)
from models.branch import BranchConfig, build_branch
from models.checkpoint import _BestKeeper
from models.ema import BatchNormWarmup, SwapEMAWithBatchNorm, batchnorm_sample
from models.precision import mixed_precision_name
from models.sampling import class_weights, describe_source_balance, epoch_order  # noqa: F401  (epoch_order: re-exported)

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="skinfusion")
class DominantLabelAUC(keras.metrics.AUC):
    """ROC AUC whose labels are each image's larger share: the training AUC under mixup's soft labels.

    Keras' AUC casts a label to bool, so a blend with 2% melanoma would count as a melanoma; here
    a label counts as melanoma from 0.5 up. Hard labels (validation) are unchanged. Registered, so a
    checkpoint compiled with it loads on ``--resume``.
    """

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(keras.ops.greater_equal(y_true, 0.5), y_pred.dtype)
        return super().update_state(y_true, y_pred, sample_weight=sample_weight)


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


class _CtrlCBetweenSteps(keras.callbacks.Callback):
    """Holds Ctrl-C during each training and validation step and delivers it between steps.

    A KeyboardInterrupt raised inside TensorFlow's C++ step can come out as another error with a
    traceback TensorFlow prints itself (``colorspaces.interrupts``); held, it is raised here, from
    a Python callback, at most one step later. ``release`` must also run when ``fit`` ends by an
    error, or the holding handler would stay installed.
    """

    def __init__(self):
        super().__init__()
        self._held: contextlib.AbstractContextManager | None = None

    def hold(self, *_args, **_kwargs) -> None:
        self.release()
        self._held = deferred_sigint()
        self._held.__enter__()

    def release(self, *_args, **_kwargs) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)  # raises the held KeyboardInterrupt, if any

    on_train_batch_begin = on_test_batch_begin = hold
    on_train_batch_end = on_test_batch_end = release


@dataclass(frozen=True)
class FitOptions:
    """How ``fit_branch`` trains a branch, beside what it trains (the ``BranchConfig``, the images).

    Attributes:
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
        mixed_precision: "float16" or "bfloat16": build the model under Keras' ``mixed_float16`` or
            ``mixed_bfloat16`` policy, its output layer in float32 (probabilities and loss stay
            float32); "" (or False): float32. ``True`` means "float16". The returned model is float32.
        resume_dir: where to read the checkpoint to resume (default ``checkpoint_dir``): a
            multi-worker run's non-chief workers read the chief's and write their own elsewhere.
        train_weights: a loss weight per training image, multiplying its class weight (default 1).
    """

    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    build: Callable[[BranchConfig], keras.Model] = build_branch
    callbacks: Sequence[keras.callbacks.Callback] = ()
    train_sources: Sequence[str] | None = None
    strategy: tf.distribute.Strategy | None = None
    mixed_precision: str | bool = ""
    resume_dir: str | os.PathLike | None = None
    train_weights: np.ndarray | None = None


@dataclass
class _Fit:
    """One fit_branch call's checked inputs and the state its parts share."""

    config: BranchConfig
    options: FitOptions
    train_images: Any
    y_train: np.ndarray
    val_images: Any
    y_val: np.ndarray
    sources: np.ndarray | None
    weights: dict[int, float]
    strategy: tf.distribute.Strategy
    replicas: int


def fit_branch(config: BranchConfig, train_images: np.ndarray, y_train: np.ndarray, val_images: np.ndarray,
               y_val: np.ndarray, **options: Any) -> tuple[keras.Model, dict[str, Any]]:
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
        **options: the fields of :class:`FitOptions` (checkpointing, resume, builder, callbacks,
            sources, strategy, precision).

    Returns:
        ``(model, history)``; history holds per-epoch metrics, the best epoch, the class
        weights used and the training time in seconds. Trained under several replicas or mixed
        precision, the model is a plain float32 copy built outside the strategy.

    Raises:
        ValueError: if shapes disagree with the config, a class is missing, or the batch size
            is not divisible by the strategy's replicas.
        TypeError: for an option that is not a field of :class:`FitOptions`.
    """
    fit = _checked(config, FitOptions(**options), train_images, y_train, val_images, y_val)
    keras.utils.set_random_seed(config.seed)
    opts = fit.options
    keeper = _BestKeeper(config, opts.checkpoint_dir, opts.build, resume_dir=opts.resume_dir,
                         mixed_precision=mixed_precision_name(opts.mixed_precision))
    model, initial_epoch, steps = _compiled_model(fit, keeper)
    train_ds, val_ds, val_steps = _input_pipelines(fit, initial_epoch)
    logger.info(
        "[%s] training on %d images (%d melanoma), validating on %d; class weights %s",
        config.view, len(fit.y_train), int(fit.y_train.sum()), len(fit.y_val),
        {k: round(v, 3) for k, v in fit.weights.items()},
    )
    if config.source_balance > 0 and fit.sources is not None and len(set(fit.sources.tolist())) > 1:
        logger.info("[%s] source balance %g, draws per epoch of the images each source has: %s", config.view,
                    config.source_balance, describe_source_balance(fit.y_train, fit.sources, config.sampling,
                                                                   config.source_balance))
    t0 = time.perf_counter()
    if initial_epoch < config.epochs and not keeper.stopped:
        ctrl_c = _CtrlCBetweenSteps()
        try:
            model.fit(
                train_ds,
                steps_per_epoch=steps,
                shuffle=False,  # the dataset shuffles (seeded, per epoch) itself
                validation_data=val_ds,
                validation_steps=val_steps,
                initial_epoch=initial_epoch,
                epochs=config.epochs,
                callbacks=[ctrl_c, _batchnorm_callback(fit), keeper, _EpochLogger(config.view, config.epochs),
                           *opts.callbacks],
                verbose=0,
            )
        finally:
            ctrl_c.release()
    keeper.restore_best(model)
    if fit.replicas > 1 or opts.mixed_precision:
        # The branch is stored as a one-device float32 model, whatever trained it: the same
        # file as a one-device run's, loadable without the strategy or a GPU.
        trained, model = model, opts.build(config)
        model.set_weights(trained.get_weights())
    history = _history(keeper, fit.weights, time.perf_counter() - t0 + keeper.seconds_before, initial_epoch)
    logger.info("[%s] done in %.1fs; best epoch %d with val_auc %.4f", config.view, history["train_seconds"],
                history["best_epoch"], history["best_val_auc"])
    return model, history


def _batchnorm_callback(fit: _Fit) -> keras.callbacks.Callback:
    """BatchNorm statistics for validation, re-estimated on a fixed sample of training images:
    with ``weight_ema``, for the averaged weights swapped in for each evaluation (then swapped back);
    otherwise only during the first ``BN_WARMUP_STEPS`` steps, while the moving statistics lag."""
    config = fit.config
    sample: list[np.ndarray] = []

    def batches():
        # Drawn when first needed, then kept: a real training without weight_ema never needs it
        # (its first validation comes after hundreds of steps) and reads no sample.
        if not sample:
            sample.append(fit.train_images[batchnorm_sample(fit.y_train, config.sampling, config.seed, fit.sources,
                                                            config.source_balance)])
        return view_batches(sample[0], config.view, config.batch_size, constancy=config.color_constancy,
                            crop=config.image_size)

    # Under several replicas the statistics are estimated on a one-device twin (reestimate_batchnorm),
    # built here, outside the strategy's scope, so that its variables are plain ones.
    twin = fit.options.build(config) if fit.replicas > 1 else None
    return (SwapEMAWithBatchNorm if config.weight_ema else BatchNormWarmup)(batches, twin)


def _checked(config: BranchConfig, options: FitOptions, train_images, y_train, val_images, y_val) -> _Fit:
    """fit_branch's inputs checked against the config and the strategy, with the class weights."""
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
    strategy = options.strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the {replicas} replicas of "
                         f"{type(strategy).__name__}; use a multiple of {replicas}")
    if config.source_balance > 0 and options.train_sources is None:
        raise ValueError("source_balance needs each training image's source (train_sources)")
    sources = None if options.train_sources is None else np.asarray(options.train_sources)
    if sources is not None and len(sources) != len(y_train):
        raise ValueError(f"train_sources has {len(sources)} entries for {len(y_train)} training images")
    return _Fit(config, options, train_images, y_train, val_images, y_val, sources, weights, strategy, replicas)


def _compiled_model(fit: _Fit, keeper: _BestKeeper) -> tuple[keras.Model, int, int]:
    """``(model, initial epoch, steps per epoch)``: restored from the checkpoint or built and compiled.

    Variables (model, optimizer, metrics) are made in the strategy's scope.
    """
    config, opts = fit.config, fit.options
    with fit.strategy.scope():
        model, initial_epoch = keeper.restore() if opts.resume else (None, 0)
        _, steps = training_batches(fit.train_images, fit.y_train, config, fit.weights, sources=fit.sources,
                                    image_weights=fit.options.train_weights,
                                    replicas=fit.replicas)
        if model is None:
            model = _build_for_training(opts.build, config, opts.mixed_precision)
            if config.init_from:
                from models.pretrain import init_from_encoder
                init_from_encoder(model, config, config.init_from)
                logger.info("[%s] encoder initialised from %s", config.view, config.init_from)
            model.compile(
                optimizer=make_optimizer(config, steps),
                loss="binary_crossentropy",
                metrics=[(DominantLabelAUC if config.mixup else keras.metrics.AUC)(name="auc", num_thresholds=1000)],
            )
        _synchronise_batchnorm(model, fit.replicas > 1)
    return model, initial_epoch, steps


def _input_pipelines(fit: _Fit, initial_epoch: int) -> tuple[Any, Any, int | None]:
    """``(training data, validation data, validation steps)`` for ``model.fit``, from ``initial_epoch`` on."""
    config, val_size = fit.config, fit.config.image_size
    if fit.replicas == 1:
        train_ds, _ = training_batches(fit.train_images, fit.y_train, config, fit.weights, start_epoch=initial_epoch,
                                       sources=fit.sources, image_weights=fit.options.train_weights)
        val_ds = view_batches(fit.val_images, config.view, 128, y=fit.y_val, constancy=config.color_constancy,
                              crop=val_size)
        return train_ds, val_ds, None

    # Each worker's input pipeline feeds its own replicas (ctx names which): the data are
    # sharded by batch slices, not by files, so every worker needs the whole training set.
    def train_fn(ctx):
        return training_batches(fit.train_images, fit.y_train, config, fit.weights, start_epoch=initial_epoch,
                                sources=fit.sources, image_weights=fit.options.train_weights,
                                replicas=fit.replicas, my_replicas=_my_replicas(ctx))[0]

    def val_fn(ctx):
        # Repeated: with validation_steps given, Keras keeps one iterator for all epochs.
        return view_batches(fit.val_images, config.view, 128, y=fit.y_val, constancy=config.color_constancy,
                            crop=val_size, replicas=fit.replicas, my_replicas=_my_replicas(ctx)).repeat()

    # A distributed dataset's length is unknown to Keras: say it, or each epoch warns that the
    # validation input "ran out of data".
    val_steps = math.ceil(len(fit.y_val) / _validation_batch_size(len(fit.y_val), 128, fit.replicas))
    return (fit.strategy.distribute_datasets_from_function(train_fn),
            fit.strategy.distribute_datasets_from_function(val_fn), val_steps)


def _history(keeper: _BestKeeper, weights: dict[int, float], seconds: float, initial_epoch: int) -> dict[str, Any]:
    """fit_branch's history: per-epoch metrics, the best epoch, class weights, training seconds."""
    per_epoch = keeper.history
    val_auc = per_epoch.get("val_auc", [])
    best = int(np.argmax(val_auc)) if val_auc else -1
    return {
        "epochs_run": len(val_auc),
        "best_epoch": best + 1,
        "best_val_auc": val_auc[best] if val_auc else float("nan"),
        "class_weights": {str(k): v for k, v in weights.items()},
        "train_seconds": round(seconds, 2),
        "resumed_from_epoch": initial_epoch,
        "mixed_precision": keeper.mixed_precision or "off",  # what computed the steps: provenance
        "per_epoch": per_epoch,
    }


def _build_for_training(build: Callable[[BranchConfig], keras.Model], config: BranchConfig,
                        mixed_precision: str | bool) -> keras.Model:
    """``build(config)``, under the ``mixed_float16`` or ``mixed_bfloat16`` policy when asked, with its
    output layer in float32.

    Keras' mixed-precision rule: the last layer computes in float32, so the sigmoid's
    probabilities and the loss are not rounded to 16 bits (which saturates near 0 and 1).
    """
    name = mixed_precision_name(mixed_precision)
    if not name:
        return build(config)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(f"mixed_{name}")
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
    ema = {"use_ema": True, "ema_momentum": config.weight_ema} if config.weight_ema else {}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=decay, **ema)
    return keras.optimizers.Adam(lr, weight_decay=decay, **ema)
