"""A branch's frozen config (``BranchConfig``): every hyper-parameter with its default, choices and help.

Kept free of Keras and TensorFlow, so that building the ``train`` command's flags (``--help``) and reading
a saved ``config.json`` load neither.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colorspaces import CONSTANCY, VIEWS
from colorspaces.lesion import LESION_CROPS


def _param(default: Any, help: str, **cli: Any) -> Any:
    """A config field whose metadata documents it: ``help``, optional ``choices``, ``flag``, ``metavar``.

    The train CLI generates its flags from this metadata and the field's type and default
    (``skinfusion.cli.train``), and ``__post_init__`` validates ``choices`` from it, so a
    hyper-parameter is added here and nowhere else.
    """
    return dataclasses.field(default=default, metadata={"help": help, **cli})


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
#: ``BranchConfig.select_on`` values: which validation images select the epoch and thresholds.
SELECT_ON = ("all", "histopathology", "not_follow_up")
#: ``BranchConfig.block_order`` values: the layer order inside each conv block.
BLOCK_ORDERS = ("conv-bn-relu-pool", "conv-pool-bn-relu")
#: What a config saved before a field existed was trained with, for fields whose default differs
#: from that behaviour (``BranchConfig.from_saved``): a saved ``config.json`` is read with these,
#: a ``--config`` file or the flags with the current defaults.
SAVED_BEFORE_FIELD = {"block_order": "conv-bn-relu-pool"}


@dataclass(frozen=True)
class BranchConfig:
    """Every hyper-parameter of one branch; defaults, choices and meanings live here and nowhere else.

    Each field's meaning is its metadata ``help`` (``dataclasses.fields(BranchConfig)``), which is
    also the help of its ``skinfusion train`` flag.
    """

    view: str = _param("rgb", "which view the branch sees (a key of colorspaces.VIEWS)")
    # 96 px, chosen by measurement (python -m experiments.sweep, experiments/RESULTS.md): as
    # accurate as 128 and 160 px on validation at 0.6x and 0.37x the training time per epoch.
    image_size: int = _param(96, "square input side in pixels")
    base_filters: int = _param(16, "filters of the first conv layer, doubled by each later conv layer")
    # Pooling first (the default since 2026-12-07; before it, conv-bn-relu-pool) runs BatchNorm and
    # ReLU on a quarter of the activations: 1.42x the training images per CPU-second (skinfusion bench --train).
    # Max pooling commutes with ReLU and with BatchNorm's affine map when its scale is positive, so
    # the orders compute nearly the same function; trained, the rgb branch's validation AUC was
    # 0.904 against 0.896 (paired CI +0.000 to +0.016; experiments/RESULTS.md, "Pooling before
    # BatchNorm").
    block_order: str = _param("conv-pool-bn-relu", "order of the layers in each conv block: conv-pool-bn-relu "
                                                   "(BatchNorm and ReLU on the pooled maps), or conv-bn-relu-pool "
                                                   "(the order of branches trained before 2026-12-07; about 0.67x "
                                                   "the training throughput on CPU)",
                              choices=BLOCK_ORDERS)
    dropout: float = _param(0.3, "dropout rate before the output layer")
    learning_rate: float = _param(1e-3, "initial learning rate of the optimizer (Adam or SGD), before the schedule")
    batch_size: int = _param(32, "training batch size")
    # 30 epochs with cosine decay (lr_schedule below), measured against 20 at a constant rate
    # (experiments/RESULTS.md, acc-96px-cosine30): fused validation AUC 0.895 vs 0.883, rgb's
    # 0.897 vs 0.875; the rate's decay is what lets rgb and hsv keep improving to epoch 23.
    # Patience 8 keeps each branch's best epoch of that run and stops fft (best at epoch 5)
    # after 13 epochs instead of 30.
    epochs: int = _param(30, "maximum training epochs")
    patience: int = _param(8, "early-stopping patience: epochs without a better validation AUC (the best "
                              "epoch's weights are kept)")
    # Oversampling, measured best on ISIC (experiments/RESULTS.md: fused test AUC 0.884 vs 0.867
    # with class weights); its cost is 1.7x the steps per epoch.
    class_weight: str = _param("none", "class-imbalance handling by loss weights: balanced weights each class "
                                       "by n / (2 n_class); pair it with --sampling none",
                               choices=("balanced", "none"))
    sampling: str = _param("oversample", "per-epoch class balancing: none (every image once), undersample "
                                         "(every melanoma plus as many random nevi: most nevi unseen per epoch) "
                                         "or oversample (every nevus plus melanomas drawn with replacement to the "
                                         "same count)", choices=("none", "undersample", "oversample"))
    # Off by default until measured on the leave-one-source-out proxy (experiments/RESULTS.md).
    source_balance: float = _param(0.0, "per-epoch source balancing on top of the class sampling: each source "
                                         "(the dataset's source column, split suffixes such as _train/_val "
                                         "merged) gets a share of each class proportional to its image count "
                                         "to the power 1 - this; 0 = as the data are, 1 = every source equally",
                                    metavar="ALPHA")
    # The nevus label process (experiments/RESULTS.md, label-process rows): HAM10000's follow-up
    # nevi are benign because they did not change, a population of easy lesions unlike the
    # biopsied nevi of the ISIC challenges. Validation and test keep every image either way.
    follow_up_weight: float = _param(1.0, "training weight of images whose diagnosis was confirmed by follow-up "
                                          "only (dx_type follow_up, in practice HAM10000 nevi): 1 = like any "
                                          "image, 0 = left out of training, in between = their loss scaled by "
                                          "this", metavar="W")
    select_on: str = _param("all", "validation images that pick the best epoch (early stopping) and the "
                                   "thresholds: all; histopathology (biopsy-confirmed only); or not_follow_up "
                                   "(all but follow-up-confirmed, so sources that record no dx_type, such as "
                                   "ISIC 2017, still count); validation metrics are still reported on all",
                            choices=SELECT_ON)
    augment: bool = _param(True, "random flips and 90-degree rotations of training batches",
                           flag="--no-augment")
    rotate_degrees: float = _param(0.0, "augmentation: also a random rotation by up to +/- this many degrees "
                                        "(reflected borders); 0 = off")
    scale_jitter: float = _param(0.0, "augmentation: also a random zoom by a factor in 1 +/- this; 0 = off")
    # Hue turns on the colour circle (OpenCV hue is 0-179) so the HSV view stays meaningful.
    color_jitter: float = _param(0.0, "augmentation: brightness +/- 64J grey levels, contrast x(1 +/- J), hue "
                                      "+/- 30J OpenCV units (60J degrees); 0 = off", metavar="J")
    acquisition: float = _param(0.0, "augmentation: random acquisition changes of strength A: JPEG "
                                     "re-encoding, blur or down-then-up scaling, gamma, white balance and "
                                     "colour temperature, aspect squash (see models.augment); 0 = off",
                                 metavar="A")
    # Mixup (Zhang et al., 2018) blends the photographs, before the view, so each view sees a
    # blended image's own HSV or spectrum; labels and loss weights are blended alike.
    mixup: float = _param(0.0, "augmentation: mixup, each training image blended with another of its batch by a "
                               "Beta(M, M) weight, its loss the same blend of the two weighted losses; 0 = off", metavar="M")
    color_constancy: str = _param("none", "preprocessing of every image before its view, in training and "
                                          "inference alike (shades_of_gray: p = 6)", choices=CONSTANCY)
    # Lesion-centred input (colorspaces.lesion): images are cropped to the located lesion when
    # decoded, before the resize, in training and (through the one inference preprocessing) alike.
    lesion_crop: str = _param("none", "box: crop every image to its located lesion's bounding box (plus the margin, "
                                      "squared; the central 80 percent when none is found) before resizing; none: the "
                                      "whole image", choices=LESION_CROPS)
    lesion_margin: float = _param(0.15, "with --lesion-crop box: context around the lesion box on each side, as a "
                                        "fraction of its side (0-1)")
    resized_crop: float = _param(0.0, "augmentation: random resized crops, a random square window of 1 - R to 1 "
                                      "of the image's area resized back to the input; 0 = off", metavar="R")
    crop_scale: float = _param(1.0, "sliding-window crops when > 1: resize images to round(image size x this) "
                                    "(1-2), train on one random image-size window of each, average a grid of "
                                    "windows at inference; 1 = off")
    crop_stride: int = _param(0, "pixels between the inference windows; 0 = (load size - image size) // 2, "
                                 "a 3x3 grid")
    optimizer: str = _param("adam", "adam, or sgd with Nesterov momentum 0.9", choices=("adam", "sgd"))
    # Decoupled (Loshchilov & Hutter, 2019), as Keras' optimizers do it: Adam with it is AdamW.
    weight_decay: float = _param(0.0, "decoupled weight decay, training only: each step scales every weight "
                                      "by 1 - this x the current learning rate; 0 = off")
    # Polyak averaging (Keras' optimizer EMA): weight averages generalise better to new domains
    # (Arpit et al., 2022, "Ensemble of Averages"; Cha et al., 2021, SWAD).
    weight_ema: float = _param(0.0, "training: keep an exponential moving average of the weights with this "
                                    "momentum per step (e.g. 0.998); validation, early stopping and the saved branch "
                                    "use the averaged weights, with BatchNorm statistics re-estimated for them; "
                                    "0 = off", metavar="M")
    lr_schedule: str = _param("cosine", "cosine: decay to 0 over the epochs; plateau: halve the rate after 2 "
                                        "epochs without a better validation AUC; none: constant",
                              choices=("none", "cosine", "plateau"))
    seed: int = _param(0, "seed for weights, shuffling and augmentation")
    # A deep ensemble inside one branch (models.branch.assemble_members): the bundle, fusion, gate,
    # export and serve still see one model per view. Measured on the leave-one-source-out proxy
    # (experiments/RESULTS.md, "3 seeds"): +0.005 (CI -0.009 to +0.019) for 3x the training.
    seeds: int = _param(1, "train this many copies of the branch, with seeds seed, seed+1, ..., each on its own "
                           "(own early stopping), and keep them as one branch: its probability is their mean, "
                           "its OOD-gate embedding their concatenation; N times the training time", metavar="N")
    # Self-supervised pre-training (models.pretrain): the encoder's conv and BatchNorm weights
    # start from `skinfusion pretrain`'s instead of at random; the output layer is new.
    init_from: str = _param("", "fine-tune from a self-supervised encoder: a directory written by `skinfusion "
                                "pretrain` for the same view and --base-filters; empty = random start",
                            metavar="DIR")

    def __post_init__(self) -> None:
        self._check_types()
        if self.view not in VIEWS:
            raise KeyError(f"unknown view {self.view!r}; choose one of {sorted(VIEWS)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {tuple(choices)}, got {getattr(self, f.name)!r}")
        for name in ("image_size", "base_filters", "batch_size", "epochs", "seeds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 (four 2x poolings), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.weight_decay < 10.0:
            raise ValueError(f"weight_decay must be in [0, 10), got {self.weight_decay}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {self.rotate_degrees}")
        if not 1.0 <= self.crop_scale <= 2.0:
            raise ValueError(f"crop_scale must be in [1, 2], got {self.crop_scale}")
        if int(self.crop_stride) < 0:
            raise ValueError(f"crop_stride must be >= 0, got {self.crop_stride}")
        for name in ("source_balance", "acquisition", "lesion_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("scale_jitter", "color_jitter", "resized_crop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_ema != 0.0 and not 0.5 <= self.weight_ema < 1.0:
            raise ValueError(f"weight_ema must be 0 (off) or in [0.5, 1), got {self.weight_ema}")
        if not 0.0 <= self.mixup <= 10.0:
            raise ValueError(f"mixup must be in [0, 10] (the Beta distribution's parameter; 0 = off), got {self.mixup}")
        if not 0.0 < self.learning_rate < 10.0:
            raise ValueError(f"learning_rate must be in (0, 10), got {self.learning_rate}")
        for name in ("patience", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.follow_up_weight <= 1.0:
            raise ValueError(f"follow_up_weight must be in [0, 1] (0 = leave follow-up images out), "
                             f"got {self.follow_up_weight}")

    def _check_types(self) -> None:
        # A --config file is JSON: {"epochs": 1.5}, {"epochs": "two"} or {"augment": "no"} (a
        # non-empty string, so true) must be refused by name, not coerced or taken as true.
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES.get(str(f.type))
            if kind is None:
                continue
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, kind) and not isinstance(value, bool)) if kind is not float else (
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"branch config {f.name!r} must be {kind.__name__}, got {value!r} "
                                 f"({type(value).__name__})")
            if kind is float:
                object.__setattr__(self, f.name, float(value))  # 1 and 1.0 are the same config

    @property
    def load_size(self) -> int:
        """Side images are resized to before cropping (``image_size`` when crops are off)."""
        return int(round(self.image_size * self.crop_scale))

    @property
    def decode_margin(self) -> float | None:
        """The margin decoded images are cropped to their lesion with (``lesion_crop`` box), else None."""
        return self.lesion_margin if self.lesion_crop == "box" else None

    @property
    def channels(self) -> int:
        """Input channels, taken from the view spec."""
        return VIEWS[self.view].channels

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (equal to the constructor arguments)."""
        return dataclasses.asdict(self)

    def matches(self, saved: dict[str, Any]) -> bool:
        """Whether a saved config dict describes this config (keys it lacks read as ``from_saved`` reads them)."""
        return type(self).from_saved(saved) == self

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "BranchConfig":
        """``from_dict`` for a config a run saved: keys it lacks take the behaviour of the code that saved it.

        That is the field's default, except for the fields of ``SAVED_BEFORE_FIELD``, whose default
        changed when they were added.
        """
        return cls.from_dict({**SAVED_BEFORE_FIELD, **values})

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


def read_config_file(path: str) -> dict[str, Any]:
    """Read a JSON ``--config`` file of branch config defaults.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        values = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{p}: expected a JSON object of branch config fields")
    return values
