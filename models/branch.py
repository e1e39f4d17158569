"""One 5-weight-layer CNN builder for every view, its frozen config, and batch-independent inference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from colorspaces import CONSTANCY, VIEWS, apply_constancy, apply_view, sliding_windows, window_offsets

CLASS_WEIGHT_CHOICES = ("balanced", "none")
SAMPLING_CHOICES = ("none", "undersample", "oversample")
OPTIMIZER_CHOICES = ("adam", "sgd")
LR_SCHEDULE_CHOICES = ("none", "cosine", "plateau")


@dataclass(frozen=True)
class BranchConfig:
    """Every hyper-parameter of one branch; defaults live here and nowhere else.

    Attributes:
        view: which view the branch sees (a key of ``colorspaces.VIEWS``).
        image_size: square input side in pixels.
        base_filters: filters of the first conv layer; each later conv layer doubles it.
        dropout: dropout rate before the output layer.
        learning_rate: Adam learning rate.
        batch_size: training batch size.
        epochs: maximum training epochs.
        patience: early-stopping patience, in epochs without a better validation AUC.
        class_weight: "balanced" weights each class by n / (2 · n_class); "none" disables it.
        sampling: how each epoch draws training images: "none" (every image once),
            "undersample" (every melanoma plus as many randomly drawn nevi: fewer steps, but
            most nevi unseen per epoch) or "oversample" (every nevus plus melanomas drawn with
            replacement up to the same count: balanced, but repeats melanomas and overfits them).
            Combine a sampling choice with class_weight="none". Default: "oversample" with
            class_weight "none".
        augment: random flips and 90° rotations of training batches.
        rotate_degrees: with ``augment``, also a random rotation by up to ± this many degrees
            (reflected borders); 0 turns it off.
        scale_jitter: with ``augment``, also a random zoom by a factor in 1 ± this; 0 = off.
        color_jitter: with ``augment``, with j this value: random brightness (± 64·j grey
            levels), contrast (× 1 ± j) and hue (± 30·j OpenCV hue units, i.e. ± 60·j degrees,
            turned on the colour circle so the HSV view stays meaningful); 0 = off.
        color_constancy: preprocessing applied to every image before its view, in training
            and at inference alike: "none" or "shades_of_gray" (p = 6).
        crop_scale: sliding-window crops when > 1: images are resized to ``load_size`` =
            round(image_size × crop_scale); training takes one random ``image_size`` window of
            each, and inference averages a grid of windows (``crop_stride``) at the same scale.
            1 turns crops off.
        crop_stride: pixels between the test-time windows; 0 means (load_size − image_size) // 2,
            a 3 × 3 grid.
        optimizer: "adam", or "sgd" (Nesterov momentum 0.9).
        weight_decay: decoupled weight decay (Loshchilov & Hutter, 2019), training only: each
            step multiplies every trainable weight by 1 - weight_decay × current learning
            rate, as Keras' optimizers do (Adam with it is AdamW). 0 turns it off.
        lr_schedule: "none", "cosine" (decay to 0 over ``epochs``) or "plateau" (halve the
            rate after 2 epochs without a better validation AUC).
        seed: seed for weights, shuffling and augmentation.
    """

    view: str = "rgb"
    # 96 px, chosen by measurement (python -m experiments.sweep, experiments/RESULTS.md): as
    # accurate as 128 and 160 px on validation at 0.6x and 0.37x the training time per epoch.
    image_size: int = 96
    base_filters: int = 16
    dropout: float = 0.3
    learning_rate: float = 1e-3
    batch_size: int = 32
    # 30 epochs with cosine decay (lr_schedule below), measured against 20 at a constant rate
    # (experiments/RESULTS.md, acc-96px-cosine30): fused validation AUC 0.895 vs 0.883, rgb's
    # 0.897 vs 0.875; the rate's decay is what lets rgb and hsv keep improving to epoch 23.
    # Patience 8 keeps each branch's best epoch of that run and stops fft (best at epoch 5)
    # after 13 epochs instead of 30.
    epochs: int = 30
    patience: int = 8
    # Oversampling, measured best on ISIC (experiments/RESULTS.md: fused test AUC 0.884 vs 0.867
    # with class weights); its cost is 1.7x the steps per epoch.
    class_weight: str = "none"
    sampling: str = "oversample"
    augment: bool = True
    rotate_degrees: float = 0.0
    scale_jitter: float = 0.0
    color_jitter: float = 0.0
    color_constancy: str = "none"
    crop_scale: float = 1.0
    crop_stride: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise KeyError(f"unknown view {self.view!r}; choose one of {sorted(VIEWS)}")
        if self.class_weight not in CLASS_WEIGHT_CHOICES:
            raise ValueError(
                f"class_weight must be one of {CLASS_WEIGHT_CHOICES}, got {self.class_weight!r}"
            )
        if self.sampling not in SAMPLING_CHOICES:
            raise ValueError(f"sampling must be one of {SAMPLING_CHOICES}, got {self.sampling!r}")
        for name in ("image_size", "base_filters", "batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 (four 2x poolings), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.color_constancy not in CONSTANCY:
            raise ValueError(f"color_constancy must be one of {sorted(CONSTANCY)}, got {self.color_constancy!r}")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_CHOICES}, got {self.optimizer!r}")
        if not 0.0 <= self.weight_decay < 10.0:
            raise ValueError(f"weight_decay must be in [0, 10), got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULE_CHOICES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULE_CHOICES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {self.rotate_degrees}")
        if not 1.0 <= self.crop_scale <= 2.0:
            raise ValueError(f"crop_scale must be in [1, 2], got {self.crop_scale}")
        if int(self.crop_stride) < 0:
            raise ValueError(f"crop_stride must be >= 0, got {self.crop_stride}")
        for name in ("scale_jitter", "color_jitter"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def load_size(self) -> int:
        """Side images are resized to before cropping (``image_size`` when crops are off)."""
        return int(round(self.image_size * self.crop_scale))

    @property
    def channels(self) -> int:
        """Input channels, taken from the view spec."""
        return VIEWS[self.view].channels

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (equal to the constructor arguments)."""
        return dataclasses.asdict(self)

    def matches(self, saved: dict[str, Any]) -> bool:
        """Whether a saved config dict describes this config.

        Keys the saved dict lacks take their defaults: a config saved before a field existed
        was trained with the behaviour that is now that field's default.
        """
        return type(self).from_dict(saved) == self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BranchConfig":
        """Build a config from a dict, refusing unknown keys.

        Raises:
            KeyError: if ``values`` has a key that is not a config field.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown branch config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def build_branch(config: BranchConfig) -> keras.Model:
    """Build the branch CNN: four conv blocks and one dense output, five weight layers.

    Each conv block is Conv(3×3) → BatchNorm → ReLU → MaxPool(2); then global average
    pooling, dropout and a sigmoid unit that outputs the melanoma probability.

    Args:
        config: the branch config; input channels come from its view.

    Returns:
        An uncompiled functional ``keras.Model`` named ``branch_<view>``.
    """
    inputs = keras.Input((config.image_size, config.image_size, config.channels), name=config.view)
    x = inputs
    for block in range(4):
        x = keras.layers.Conv2D(
            config.base_filters * 2**block, 3, padding="same", use_bias=False, name=f"conv{block + 1}"
        )(x)
        # momentum 0.9 (not Keras' 0.99): with a few hundred steps per run, slower moving
        # statistics lag the weights and make inference-mode predictions poor.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{block + 1}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{block + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="melanoma_proba")(x)
    return keras.Model(inputs, outputs, name=f"branch_{config.view}")


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
    """
    n, size, load = len(images), int(model.input_shape[1]), int(images.shape[1])
    # k windows per image: take batch_size // k images at a time so a forward pass stays batch_size.
    k = len(window_offsets(load, size, crop_stride)) ** 2
    step = max(1, batch_size // k)
    out = []
    for i in range(0, n, step):
        batch = apply_constancy(constancy, images[np.arange(i, min(n, i + step))])
        wins, k = sliding_windows(batch, size, crop_stride) if batch.shape[1] > size else (batch, 1)
        p = predict_branch_proba(model, apply_view(view, wins), batch_size)
        out.append(p.reshape(k, len(batch)).mean(axis=0))
    return np.concatenate(out) if out else np.zeros(0, np.float64)
