"""Training input pipelines: streamed, (re)sampled, augmented batches of a branch's view, and validation batches.

NumPy/OpenCV work (reading the image cache, augmenting, computing the view) runs in tf.data's
thread pool, so input preparation overlaps the training step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from colorspaces import VIEWS, apply_constancy, apply_view, centre_crop, random_crops
from models.augment import augment_batch, mixup
from models.branch import BranchConfig
from models.sampling import epoch_order

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
        labels, weights_ = y[idx], sample_weight[idx]
        if config.mixup > 0:
            # Blended over the whole global batch, as the augmentation, before each replica's slice.
            batch, labels, weights_ = mixup(batch, labels, weights_, np.random.default_rng([config.seed, epoch, b, 2]),
                                            config.mixup)
        batch, labels, weights_ = batch[mine], labels[mine], weights_[mine]
        return apply_view(config.view, batch).astype(np.float32, copy=False), labels, weights_

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


def _my_replicas(ctx: tf.distribute.InputContext) -> tuple[int, int]:
    """``(first replica, replica count)`` of the input pipeline ``ctx`` describes (one per worker)."""
    local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    return ctx.input_pipeline_id * local, local
