"""One 5-weight-layer CNN builder for every view (optionally a deep ensemble of several), and batch-independent
inference; the config is ``models.config``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

from colorspaces import window_offsets
from colorspaces.pipeline import mean_over_windows, view_inputs  # noqa: F401  (mean_over_windows: re-exported)
from models.config import SELECT_ON, BranchConfig  # noqa: F401  (re-exported: the config lives Keras-free)


def build_branch(config: BranchConfig) -> keras.Model:
    """Build the branch CNN: four conv blocks and one dense output, five weight layers.

    Each conv block is Conv(3×3) → MaxPool(2) → BatchNorm → ReLU (``block_order``
    conv-pool-bn-relu, the default; conv-bn-relu-pool pools last, as branches trained before
    2026-12-07 do); then global average pooling, dropout and a sigmoid unit that outputs the
    melanoma probability.

    With ``config.seeds`` = N > 1 the model holds N such CNNs side by side (a deep ensemble,
    filled by ``assemble_members`` from N separately trained members): its output is the mean
    of their probabilities and its ``gap`` layer the concatenation of their pooled features.

    Args:
        config: the branch config; input channels come from its view.

    Returns:
        An uncompiled functional ``keras.Model`` named ``branch_<view>``.
    """
    inputs = keras.Input((config.image_size, config.image_size, config.channels), name=config.view)
    if config.seeds == 1:
        # The stack first: layers draw their seeds from the global generator as they are created,
        # so creating Dropout before the convs would change the initial weights of every seed.
        features = _conv_stack(inputs, config, "")
        x = keras.layers.Dropout(config.dropout, name="dropout")(features)
        outputs = keras.layers.Dense(1, activation="sigmoid", name="melanoma_proba")(x)
        return keras.Model(inputs, outputs, name=f"branch_{config.view}")
    # N stacks m1_…, mN_, then one Dense of N sigmoid units over the concatenated features whose
    # kernel is block-diagonal (unit k reads member k's features only: exactly member k's head),
    # and a fixed mean. Standard layers only, so saving, export and every runtime need nothing new,
    # and `gap` stays the one embedding layer the OOD gate reads.
    gaps = [_conv_stack(inputs, config, f"m{k + 1}_") for k in range(config.seeds)]
    x = keras.layers.Concatenate(name="gap")(gaps)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    x = keras.layers.Dense(config.seeds, activation="sigmoid", name="member_proba")(x)
    outputs = keras.layers.Dense(1, name="melanoma_proba", trainable=False,
                                 kernel_initializer=keras.initializers.Constant(1.0 / config.seeds),
                                 bias_initializer="zeros")(x)
    return keras.Model(inputs, outputs, name=f"branch_{config.view}")


def _conv_stack(inputs, config: BranchConfig, prefix: str):
    """The four conv blocks and the global average pooling (``<prefix>gap``) of one CNN."""
    x = inputs
    for block in range(4):
        x = keras.layers.Conv2D(
            config.base_filters * 2**block, 3, padding="same", use_bias=False, name=f"{prefix}conv{block + 1}"
        )(x)
        pool_first = config.block_order == "conv-pool-bn-relu"
        if pool_first:
            x = keras.layers.MaxPooling2D(name=f"{prefix}pool{block + 1}")(x)
        # momentum 0.9 (not Keras' 0.99): with a few hundred steps per run, slower moving
        # statistics lag the weights and make inference-mode predictions poor.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{prefix}bn{block + 1}")(x)
        x = keras.layers.ReLU(name=f"{prefix}relu{block + 1}")(x)
        if not pool_first:
            x = keras.layers.MaxPooling2D(name=f"{prefix}pool{block + 1}")(x)
    return keras.layers.GlobalAveragePooling2D(name=f"{prefix}gap")(x)


def member_config(config: BranchConfig, k: int) -> BranchConfig:
    """The config member ``k`` (0-based) of a ``config.seeds`` ensemble trains with: one CNN, seed ``seed + k``."""
    if not 0 <= k < config.seeds:
        raise ValueError(f"member {k} of a {config.seeds}-seed branch does not exist")
    return dataclasses.replace(config, seeds=1, seed=config.seed + k)


def assemble_members(config: BranchConfig, members: Sequence[keras.Model]) -> keras.Model:
    """One branch of ``config`` (``seeds`` = N) holding N trained one-CNN members' weights.

    Member k's conv and BatchNorm layers become ``m{k+1}_*``; its sigmoid head becomes column k of
    ``member_proba`` (zeros elsewhere), so the branch's probability is exactly the members' mean.

    Raises:
        ValueError: if the number of members is not ``config.seeds``, or a member is not a
            one-CNN branch of this config's architecture.
    """
    if len(members) != config.seeds:
        raise ValueError(f"a {config.seeds}-seed branch needs {config.seeds} members, got {len(members)}")
    if config.seeds == 1:
        model = build_branch(config)
        model.set_weights(members[0].get_weights())
        return model
    model = build_branch(config)
    head = model.get_layer("member_proba")
    kernel = np.zeros(tuple(head.kernel.shape), np.float32)
    bias = np.zeros(config.seeds, np.float32)
    width = kernel.shape[0] // config.seeds
    for k, member in enumerate(members):
        for layer in member.layers:
            if layer.weights and layer.name != "melanoma_proba":
                model.get_layer(f"m{k + 1}_{layer.name}").set_weights(layer.get_weights())
        w, b = member.get_layer("melanoma_proba").get_weights()
        if w.shape != (width, 1):
            raise ValueError(f"member {k + 1}'s head has shape {w.shape}, the branch needs ({width}, 1)")
        kernel[k * width:(k + 1) * width, k] = w[:, 0]
        bias[k] = b[0]
    head.set_weights([kernel, bias])
    return model


def predict_branch_proba(model: keras.Model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Melanoma probabilities for a batch of view arrays, with BatchNorm in inference mode.

    Calling the model with ``training=False`` makes BatchNorm use its moving statistics,
    so an image's probability does not depend on the other images in the batch.

    Args:
        model: a branch model.
        x: float32 view arrays, (N, H, W, C).
        batch_size: how many images per forward pass.

    Returns:
        float64 array of shape (N,).
    """
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    out = [
        np.asarray(model(x[i : i + batch_size], training=False)).reshape(-1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def branch_inputs(config: BranchConfig, images: np.ndarray) -> tuple[np.ndarray, int]:
    """The arrays a branch scores for a batch of images: the one inference preprocessing.

    Colour constancy sees the whole image, as in training, and only then is the image cut
    into the test-time windows (when it is larger than the branch input); each window then
    becomes the branch's view. ``predict_images_proba`` and the ensemble engine both call
    this, so a branch is scored the same way alone and inside an ensemble.

    Args:
        config: the branch config (view, ``image_size``, ``color_constancy``, ``crop_stride``).
        images: RGB uint8 (N, L, L, 3) with L >= ``config.image_size`` (L = ``load_size``
            for a branch trained with crops).

    Returns:
        ``(x, k)``: float32 view arrays (k·N, S, S, C), window-major (the first N are window 0
        of every image), and k the number of windows per image (1 without crops).
    """
    # The NumPy recipe lives in colorspaces.pipeline, so the exported runtimes share it without Keras.
    return view_inputs(images, config.view, config.image_size, config.color_constancy, config.crop_stride)


def predict_images_proba(model: keras.Model, view: str, images, batch_size: int = 128,
                         constancy: str = "none", crop_stride: int = 0) -> np.ndarray:
    """Melanoma probabilities for RGB uint8 images, computing the view one batch at a time.

    Args:
        model: a branch model for ``view``.
        view: the branch's view name.
        images: RGB uint8 (N, L, L, 3), an array or an array-like such as an on-disk cache.
            When L exceeds the model's input side (a branch trained with crops), each
            image's probability is the mean over its grid of windows (``crop_stride``).
        batch_size: images per view computation and forward pass.
        constancy: the branch's colour-constancy preprocessing (``BranchConfig.color_constancy``).
        crop_stride: pixels between windows (``BranchConfig.crop_stride``; 0 = a 3 × 3 grid).

    Returns:
        float64 array of shape (N,).

    Raises:
        KeyError: if ``view`` is not one of ``colorspaces.VIEWS``.
    """
    n, size, load = len(images), int(model.input_shape[1]), int(images.shape[1])
    # Only the fields that shape the inputs matter here; the rest keep their defaults.
    config = BranchConfig(view=view, image_size=size, color_constancy=constancy, crop_stride=crop_stride)
    # k windows per image: take batch_size // k images at a time so a forward pass stays batch_size.
    step = max(1, batch_size // len(window_offsets(load, size, crop_stride)) ** 2)
    out = []
    for i in range(0, n, step):
        x, k = branch_inputs(config, images[np.arange(i, min(n, i + step))])
        out.append(mean_over_windows(predict_branch_proba(model, x, batch_size), k))
    return np.concatenate(out) if out else np.zeros(0, np.float64)
