"""Test-time adaptation of a trained branch without labels: BatchNorm re-estimation and TENT.

Both change BatchNorm only, and both leave a model that is used exactly as before: BatchNorm in
inference mode with fixed statistics (``predict_branch_proba`` calls ``training=False``), so a
prediction still does not depend on the other images of its batch. The weights per image come
from the caller (``ensemble.priors.balanced_weights`` gives the class-balanced ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from colorspaces.interrupts import deferred_sigint
from models.branch import (
    BranchConfig,
    branch_inputs,
    mean_over_windows,
    predict_branch_proba,
)

logger = logging.getLogger(__name__)

_EPS = 1e-6


def bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's BatchNormalization layers, in forward order."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def bn_statistics(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer name: (moving mean, moving variance)}``, copied."""
    return {b.name: (np.array(b.moving_mean.numpy()), np.array(b.moving_variance.numpy())) for b in bn_layers(model)}


def clone_branch(model: keras.Model) -> keras.Model:
    """An independent copy of a branch with the same weights (adapting it leaves ``model`` as it was)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _batches(config: BranchConfig, images, weights: np.ndarray, batch_size: int):
    """``(view arrays, weight per row)`` per batch; every window of an image carries the image's weight."""
    for i in range(0, len(images), batch_size):
        x, k = branch_inputs(config, images[np.arange(i, min(len(images), i + batch_size))])
        yield x, np.tile(weights[i : i + batch_size], k)


def _weighted_channel_moments(sub: keras.Model, config: BranchConfig, images, weights: np.ndarray,
                              batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and (population) variance per channel of ``sub``'s output over images and positions."""
    s0, s1, s2 = 0.0, 0.0, 0.0
    for x, w in _batches(config, images, weights, batch_size):
        with deferred_sigint():  # Ctrl-C raised between batches, never inside TensorFlow's C++
            h = np.asarray(sub(x, training=False), dtype=np.float64)  # (n, H, W, C)
        positions = h.shape[1] * h.shape[2]
        s0 += w.sum() * positions
        s1 = s1 + np.einsum("n,nhwc->c", w, h)
        s2 = s2 + np.einsum("n,nhwc->c", w, h * h)
    mean = s1 / s0
    return mean, np.maximum(s2 / s0 - mean * mean, 0.0)


@dataclass(frozen=True)
class BNChange:
    """How re-estimation moved one BatchNorm layer: mean |shift| of its means in source standard
    deviations, and the mean |log| ratio of its variances."""

    layer: str
    mean_shift_sd: float
    log_var_ratio: float


def reestimate_bn(model: keras.Model, config: BranchConfig, images, weights=None, alpha: float = 1.0,
                  batch_size: int = 64, on_layer: Callable[[str], None] | None = None) -> list[BNChange]:
    """Replace every BatchNorm layer's moving statistics with (weighted) statistics of ``images``.

    Layers are re-estimated in forward order, each from the activations computed with the layers
    before it already re-estimated (in inference mode), because a layer's input statistics depend
    on how the earlier layers normalise. The result is mixed with the source statistics as the
    statistics of a mixture distribution: ``alpha`` of the target, ``1 - alpha`` of the source,
    ``mean = (1-a) m_s + a m_t`` and ``var = (1-a)(v_s + m_s^2) + a(v_t + m_t^2) - mean^2``.

    Args:
        model: a branch (modified in place).
        config: its config (view, input size, colour constancy, windows).
        images: RGB uint8 (N, L, L, 3) at the branch's load size, an array or array-like.
        weights: one non-negative weight per image (default: all 1, plain AdaBN).
        alpha: the target's share, in [0, 1]; 0 leaves the model unchanged.
        batch_size: images per forward pass.
        on_layer: called with each layer's name once it is done (progress).

    Returns:
        One ``BNChange`` per layer.

    Raises:
        ValueError: if ``alpha`` is outside [0, 1], ``images`` is empty or ``weights`` is malformed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the target statistics' share) must be in [0, 1], got {alpha}")
    if len(images) == 0:
        raise ValueError("BatchNorm re-estimation needs at least one image")
    w = np.ones(len(images)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (len(images),) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError(f"weights must be {len(images)} non-negative finite numbers with a positive sum")
    changes = []
    for layer in bn_layers(model):
        m_s = np.asarray(layer.moving_mean.numpy(), np.float64)
        v_s = np.asarray(layer.moving_variance.numpy(), np.float64)
        m_t, v_t = _weighted_channel_moments(keras.Model(model.input, layer.input), config, images, w, batch_size)
        mean = (1.0 - alpha) * m_s + alpha * m_t
        var = (1.0 - alpha) * (v_s + m_s**2) + alpha * (v_t + m_t**2) - mean**2
        var = np.maximum(var, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
        sd = np.sqrt(v_s + layer.epsilon)
        changes.append(BNChange(layer.name, float(np.mean(np.abs(mean - m_s) / sd)),
                                float(np.mean(np.abs(np.log((var + layer.epsilon) / (v_s + layer.epsilon)))))))
        if on_layer is not None:
            on_layer(layer.name)
    return changes


def binary_entropy(p) -> np.ndarray:
    """Entropy in nats of Bernoulli(p), elementwise."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p))


def predict_images(model: keras.Model, config: BranchConfig, images, batch_size: int = 64) -> np.ndarray:
    """A branch's melanoma probability per image (window probabilities averaged), BatchNorm in inference mode."""
    probs = []
    for i in range(0, len(images), batch_size):
        x, k = branch_inputs(config, images[np.arange(i, min(len(images), i + batch_size))])
        with deferred_sigint():
            probs.append(mean_over_windows(predict_branch_proba(model, x, batch_size * k), k))
    return np.concatenate(probs) if probs else np.zeros(0)


def mean_entropy(model: keras.Model, config: BranchConfig, images, weights=None, batch_size: int = 64) -> float:
    """Weighted mean prediction entropy of a branch over images."""
    w = np.ones(len(images)) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(np.average(binary_entropy(predict_images(model, config, images, batch_size)), weights=w))


@dataclass(frozen=True)
class TentResult:
    """What TENT did to one branch: steps taken, the weighted mean entropy and mean probability before and after."""

    steps: int
    entropy_before: float
    entropy_after: float
    mean_before: float
    mean_after: float


def tent(model: keras.Model, config: BranchConfig, images, weights=None, steps: int = 30,
         learning_rate: float = 5e-4, batch_size: int = 64, seed: int = 0) -> TentResult:
    """TENT (Wang et al., 2021): minimise prediction entropy on unlabelled images, BatchNorm scale and offset only.

    Only every BatchNorm layer's gamma and beta move (Adam); convolutions, the output layer and
    the moving statistics stay as they are. BatchNorm runs in inference mode throughout, with the
    fixed (possibly re-estimated) statistics the adapted model will predict with, so what is
    optimised is what is used. Afterwards the model is used as it is: nothing adapts at prediction.

    The loss is the weighted mean entropy of a batch plus ``KL(m0 || m)``, where ``m`` is the
    batch's weighted mean probability and ``m0`` that mean over all images before adaptation.
    Entropy alone can be lowered by moving every prediction towards one class (a shift of the
    last offset does it); the anchor keeps the population's mean prediction where it was, so
    what entropy minimisation can change is how well the classes are separated (the marginal
    term of SHOT's information maximisation, with the starting marginal instead of a uniform
    one, since under label shift the classes are not equally frequent).

    Args:
        model: a branch (modified in place).
        config: its config.
        images: RGB uint8 (N, L, L, 3) at the load size.
        weights: one non-negative weight per image (default all 1); class-balanced weights
            make each class count as much as in class-balanced training.
        steps: optimisation steps (0 changes nothing).
        learning_rate: Adam's step size.
        batch_size: images per step.
        seed: seed of the batch order.

    Returns:
        The ``TentResult``.

    Raises:
        ValueError: if ``images`` is empty, or a count or rate is out of range.
    """
    if len(images) == 0:
        raise ValueError("TENT needs at least one image")
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"TENT needs steps >= 0, batch_size >= 1 and a positive learning rate, "
                         f"got {steps}, {batch_size}, {learning_rate}")
    w = np.ones(len(images)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    p0 = predict_images(model, config, images, batch_size)
    m0 = float(np.clip(np.average(p0, weights=w), _EPS, 1.0 - _EPS))
    variables = [v for b in bn_layers(model) for v in (b.gamma, b.beta)]
    optimizer = keras.optimizers.Adam(learning_rate)
    rng = np.random.default_rng(seed)
    order = np.zeros(0, dtype=int)
    for _ in range(steps):
        if len(order) < min(batch_size, len(images)):
            order = np.concatenate([order, rng.permutation(len(images))])
        idx, order = np.sort(order[:batch_size]), order[batch_size:]
        # One step at a time under held Ctrl-C: a press is raised between steps, after a whole update.
        with deferred_sigint():
            x, k = branch_inputs(config, images[idx])
            wb = tf.constant(np.tile(w[idx], k), tf.float32)
            with tf.GradientTape() as tape:
                p = tf.clip_by_value(tf.reshape(model(x, training=False), [-1]), _EPS, 1.0 - _EPS)
                total = tf.maximum(tf.reduce_sum(wb), _EPS)
                entropy = tf.reduce_sum(wb * -(p * tf.math.log(p) + (1.0 - p) * tf.math.log(1.0 - p))) / total
                m = tf.clip_by_value(tf.reduce_sum(wb * p) / total, _EPS, 1.0 - _EPS)
                anchor = m0 * tf.math.log(m0 / m) + (1.0 - m0) * tf.math.log((1.0 - m0) / (1.0 - m))
                loss = entropy + anchor
            optimizer.apply(tape.gradient(loss, variables), variables)
    p1 = predict_images(model, config, images, batch_size)
    return TentResult(steps, float(np.average(binary_entropy(p0), weights=w)),
                      float(np.average(binary_entropy(p1), weights=w)), m0, float(np.average(p1, weights=w)))
