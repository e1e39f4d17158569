"""Grad-CAM for a branch CNN: where, in the branch's own input, its melanoma evidence lies.

Grad-CAM (Selvaraju et al., 2017) weights each feature map ``A_k`` of a convolution by the mean
gradient of a class score over that map, ``alpha_k = mean_ij d score / d A_k[i, j]``, and keeps
the positive part of ``sum_k alpha_k A_k``, upsampled to the input. Here:

* the layer is the branch's last ``Conv2D``, found by type (``last_conv_layer``), not by name:
  its maps are the coarsest and the most class-specific the branch has (for a branch of several
  seeds, each member's own last ``Conv2D`` and logit, the members' maps averaged);
* the score is the melanoma **logit**, the input of the branch's final sigmoid unit, not the
  probability. ``d p = p (1 - p) d logit``: the two maps point the same way, but the probability's
  gradient vanishes (in float32, to exactly 0) for a confident branch, and with sliding windows
  a window's weight in the average should follow its evidence, not how close it sits to 0.5;
* BatchNorm runs in inference mode (``training=False``), as in ``predict``;
* with sliding-window crops each window is explained on its own and the maps are averaged back
  into the coordinates of the image the windows were cut from (overlaps averaged). For a view
  whose axes are frequencies (``ViewSpec.frequency``: fft) a window's position means nothing in
  its spectrum, so its windows' maps are averaged in frequency space instead.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from colorspaces.crops import window_offsets
from colorspaces.interrupts import deferred_sigint
from colorspaces.views import VIEWS
from models.branch import BranchConfig, branch_inputs, mean_over_windows


def is_frequency_view(view: str) -> bool:
    """Whether the view's image axes are frequencies (``ViewSpec.frequency``: fft), not positions.

    Its heat maps stay in the branch's input (frequency) coordinates and are drawn over the
    spectrum, never over the photo.
    """
    spec = VIEWS.get(view)
    return bool(spec is not None and spec.frequency)


# One gradient model per loaded branch (building a keras.Model costs more than explaining an image).
_GRAD_MODELS: weakref.WeakKeyDictionary[keras.Model, tuple[keras.Model, keras.layers.Dense]] = (
    weakref.WeakKeyDictionary())


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The branch's last ``Conv2D`` layer, found by type in the model's (topological) layer order.

    Raises:
        ValueError: if the model has no ``Conv2D`` layer.
    """
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise ValueError(f"model {model.name!r} has no Conv2D layer; Grad-CAM needs a convolutional branch")
    return convs[-1]


def _melanoma_head(model: keras.Model) -> keras.layers.Dense:
    """The layer whose sigmoid units are the branch's members' probabilities: its input times its kernel are the logits.

    A one-CNN branch ends in one sigmoid unit; a ``seeds`` > 1 branch has ``member_proba``, a unit per member.
    """
    names = {layer.name for layer in model.layers}
    head = model.get_layer("member_proba") if "member_proba" in names else model.layers[-1]
    if not (isinstance(head, keras.layers.Dense) and (head.units == 1 or head.name == "member_proba")
            and head.activation is keras.activations.sigmoid):
        raise ValueError(f"model {model.name!r} does not end in one sigmoid unit (got {head.name!r}); "
                         "Grad-CAM explains the melanoma logit of a branch built by models.branch.build_branch")
    return head


def _member_convs(model: keras.Model, members: int) -> list[keras.layers.Layer]:
    """The last ``Conv2D`` of each member: of the whole model for one CNN, of the ``m<k>_`` layers for several."""
    if members == 1:
        return [last_conv_layer(model)]
    convs = []
    for k in range(1, members + 1):
        mine = [layer for layer in model.layers
                if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith(f"m{k}_")]
        if not mine:
            raise ValueError(f"model {model.name!r} has no Conv2D layer of member {k} (m{k}_*)")
        convs.append(mine[-1])
    return convs


def _grad_model(model: keras.Model) -> tuple[keras.Model, keras.layers.Dense]:
    """``(model: input -> [each member's last conv maps..., the head's input], head)``, cached per branch."""
    if model not in _GRAD_MODELS:
        head = _melanoma_head(model)
        convs = _member_convs(model, head.units)
        _GRAD_MODELS[model] = (keras.Model(model.inputs, [*(c.output for c in convs), head.input]), head)
    return _GRAD_MODELS[model]


# Held Ctrl-C (colorspaces.interrupts): a press inside the gradient pass is raised once it returns,
# so TensorFlow's C++ never turns it into a SystemError of its own.
@deferred_sigint()
def gradcam(model: keras.Model, x: np.ndarray, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Raw Grad-CAM maps of a batch of branch inputs, at the input resolution.

    For a branch of several seeds (``BranchConfig.seeds``) each member is explained by its own
    logit at its own last convolution, and the map is the mean of the members' maps: the same
    weight each member has in the branch's probability.

    Args:
        model: a branch model (``build_branch``).
        x: float32 view arrays (N, S, S, C), as ``branch_inputs`` makes them.
        sign: +1 explains melanoma (the logit); -1 explains nevus (the negative logit).

    Returns:
        ``(maps, logits)``: float64 (N, S, S), non-negative and not normalised, and the
        melanoma logits (N,) (``sigmoid(logits)`` is the branch's probability).
    """
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    if x.shape[0] == 0:
        return np.zeros((0, *x.shape[1:3])), np.zeros(0)
    grad_model, head = _grad_model(model)
    with tf.GradientTape() as tape:
        *maps, features = grad_model(x, training=False)  # BatchNorm on its moving statistics; dropout off
        logits = tf.matmul(features, head.kernel) + (head.bias if head.use_bias else 0.0)  # (N, members)
        # Images do not interact in inference mode, nor members (each logit reads its own
        # features only), so the gradient of the sum is each image's and member's own.
        score = tf.reduce_sum(sign * logits)
    grads = tape.gradient(score, maps)
    cams = [tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * m, axis=-1, keepdims=True))
            for g, m in zip(grads, maps)]
    cam = cams[0] if len(cams) == 1 else tf.add_n(cams) / len(cams)
    # Bilinear with half-pixel centres: conv cell i covers input pixels [i*s, (i+1)*s).
    up = tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0]
    logits = np.asarray(logits, np.float64)
    if logits.shape[1] == 1:
        return np.asarray(up, np.float64), logits[:, 0]
    # Several members: the logit of their mean probability, so sigmoid(logits) is still the branch's.
    p = np.clip(np.mean(1.0 / (1.0 + np.exp(-logits)), axis=1), 1e-12, 1 - 1e-12)
    return np.asarray(up, np.float64), np.log(p / (1.0 - p))


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each map (N, H, W) to [0, 1] by its maximum; a map with no positive evidence stays 0."""
    peak = maps.reshape(len(maps), -1).max(axis=1) if maps.size else np.zeros(len(maps))
    return np.where(peak[:, None, None] > 0, maps / np.where(peak > 0, peak, 1.0)[:, None, None], 0.0)


def explain_branch(config: BranchConfig, model: keras.Model, images: np.ndarray,
                   sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heat maps of a branch for RGB images, with the view arrays they belong to.

    The inputs are made by ``branch_inputs``, the inference preprocessing. Without crops the
    maps are in the branch's input coordinates (S × S, S = ``config.image_size``). With
    sliding-window crops, a spatial view's window maps are averaged back into the image's
    coordinates (L × L, L = ``images`` side) and its view is re-assembled from its windows; a
    frequency view (``ViewSpec.frequency``) keeps S × S, the mean over its windows.

    Args:
        config: the branch config.
        model: the branch model.
        images: RGB uint8 (N, L, L, 3), L >= ``config.image_size`` (the bundle's ``load_size``).
        sign: +1 for melanoma (default), -1 for nevus.

    Returns:
        ``(heatmaps, views)``: float64 (N, H, W) in [0, 1] (1 = the strongest melanoma
        evidence in that image; all 0 when nothing raises the logit), and the float32 view
        arrays (N, H, W, C) the maps lie over.
    """
    images = np.asarray(images)
    x, k = branch_inputs(config, images)
    maps, _ = gradcam(model, x, sign)
    if k == 1:
        return normalise_maps(maps), x
    if is_frequency_view(config.view):
        return normalise_maps(mean_over_windows(maps, k)), mean_over_windows(x, k)
    n, side, size = len(images), images.shape[1], config.image_size
    offsets = window_offsets(side, size, config.crop_stride)
    total = np.zeros((n, side, side))
    count = np.zeros((side, side))
    views = np.zeros((n, side, side, x.shape[-1]), np.float32)
    # branch_inputs is window-major, rows of windows first: window w of every image is x[w*n:(w+1)*n].
    for w, (r, c) in enumerate((r, c) for r in offsets for c in offsets):
        total[:, r : r + size, c : c + size] += maps[w * n : (w + 1) * n]
        count[r : r + size, c : c + size] += 1
        # A spatial view is per pixel (after the whole-image colour constancy): windows agree on overlaps.
        views[:, r : r + size, c : c + size] = x[w * n : (w + 1) * n]
    return normalise_maps(total / count), views
