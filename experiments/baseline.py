"""A standard CNN to compare the ensemble with: a Keras application trained from scratch on a run's split.

``python -m experiments.baseline --run RUN`` trains ``keras.applications.MobileNetV3Small``
(``weights=None``) on the run's own train/validation split, at the run's image size, with the
same input pipeline, class weights, augmentation and early stopping as a branch, inside the same
time budget as the run's three branches together; then scores the run's test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from colorspaces import VIEWS
from colorspaces.files import write_json_atomic
from ensemble.metrics import binary_report, choose_threshold
from experiments.common import run_experiment
from skinfusion.data.cache import cached_images
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split

logger = logging.getLogger(__name__)

ARCHITECTURES = ("mobilenetv3small", "efficientnetb0")


def build_standard(arch: str, bn_momentum: float = 0.9):
    """A builder for ``fit_branch``: the named Keras application, random weights, one sigmoid output.

    ``bn_momentum`` replaces the applications' BatchNorm momentum (0.999 in MobileNetV3, 0.99
    in EfficientNet). Those values suit long ImageNet schedules; trained from scratch for a
    few hundred steps, the moving statistics stay near their initial values, and at inference
    (``training=False``) every image then gets the same probability: validation AUC 0.500 in
    every epoch on the ISIC data, measured.
    """
    import keras  # here, not at the top: `--help` and flag errors need no TensorFlow

    def build(config) -> keras.Model:
        shape = (config.image_size, config.image_size, 3)
        if arch == "mobilenetv3small":
            # The rgb view is already in [0, 1]; the built-in rescaling expects 0-255.
            body = keras.applications.MobileNetV3Small(input_shape=shape, weights=None, include_top=False,
                                                       include_preprocessing=False)
        elif arch == "efficientnetb0":
            body = keras.applications.EfficientNetB0(input_shape=shape, weights=None, include_top=False)
        else:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
        for layer in body.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
        inputs = keras.Input(shape, name="rgb")
        x = keras.layers.GlobalAveragePooling2D()(body(inputs))
        x = keras.layers.Dropout(config.dropout)(x)
        outputs = keras.layers.Dense(1, activation="sigmoid", name="melanoma_proba")(x)
        return keras.Model(inputs, outputs, name=f"baseline_{arch}")
    return build


def time_budget(seconds: float):
    """A Keras callback that stops training at the end of the first epoch that ends past ``seconds``."""
    import keras

    class TimeBudget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._t0 = 0.0

        def on_train_begin(self, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if time.perf_counter() - self._t0 > seconds:
                logger.info("time budget of %.0fs reached after epoch %d", seconds, epoch + 1)
                self.model.stop_training = True

    return TimeBudget()


def main(argv: Sequence[str] | None = None) -> int:
    """Train and score the baseline; print one results row and write RUN/baseline-<arch>/metrics.json."""
    p = argparse.ArgumentParser(prog="python -m experiments.baseline", description=__doc__)
    p.add_argument("--run", required=True, type=Path, help="a run with trained branches (its split, size and budget are reused)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="mobilenetv3small", help="Keras application (default mobilenetv3small)")
    p.add_argument("--budget-seconds", type=float,
                   help="training time budget (default: the run's three branches' training time together, which "
                        "is right for branches trained one after another; for `train --view all` in parallel "
                        "processes, pass the run's wall-clock training time instead)")
    p.add_argument("--epochs", type=int,
                   help="maximum epochs (default: the run's, so a cosine schedule decays over the same epochs)")
    p.add_argument("--bn-momentum", type=float, default=0.9,
                   help="BatchNorm momentum of the application's layers (default 0.9; see build_standard)")
    args = p.parse_args(argv)
    return run_experiment(_run, args, p, log_format="%(asctime)s %(message)s")


def _run(args: argparse.Namespace) -> int:
    """Train the standard CNN within the budget, score it and write its metrics."""
    from models import BranchConfig, predict_images_proba
    from models.train import fit_branch

    run = args.run
    metas = {v: json.loads((run / "branches" / v / "metadata.json").read_text()) for v in VIEWS
             if (run / "branches" / v / "metadata.json").is_file()}
    if not metas:
        raise SystemExit(f"{run}: no trained branches to take the split, image size and time budget from")
    rgb_config = json.loads((run / "branches" / next(iter(metas)) / "config.json").read_text())
    budget = args.budget_seconds or sum(m["training"]["train_seconds"] for m in metas.values())
    config = BranchConfig.from_dict({**rgb_config, "view": "rgb", "epochs": args.epochs or rgb_config["epochs"]})

    assign, info = load_split(run)
    index = index_dataset(info["data_dir"])
    sets = {}
    for split in ("train", "val", "test"):
        recs = [r for r in index.records if assign.get(r.image_id) == split]
        imgs, ok, _ = cached_images([r.path for r in recs], config.load_size, desc=f"{split} images")
        sets[split] = (imgs, np.array([recs[i].label for i in ok]))
    logger.info("baseline %s, budget %.0fs, image size %d", args.arch, budget, config.image_size)
    model, history = fit_branch(config, *sets["train"], *sets["val"], build=build_standard(args.arch, args.bn_momentum),
                                callbacks=[time_budget(budget)])
    val_proba = predict_images_proba(model, "rgb", sets["val"][0], crop_stride=config.crop_stride)
    threshold = choose_threshold(sets["val"][1], val_proba)
    test_proba = predict_images_proba(model, "rgb", sets["test"][0], crop_stride=config.crop_stride)
    report = binary_report(sets["test"][1], test_proba, threshold)
    spread = float(np.std(test_proba))
    if spread < 1e-6:
        logger.warning("the baseline gives every test image the same probability (std %.2g): its BatchNorm "
                       "statistics or training failed; its AUC means nothing", spread)
    out = run / f"baseline-{args.arch}"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", {"arch": args.arch, "budget_seconds": budget, "config": config.to_dict(),
                                             "parameters": int(model.count_params()), "bn_momentum": args.bn_momentum,
                                             "test_proba_std": spread,
                                             "training": {k: v for k, v in history.items() if k != "per_epoch"},
                                             "test": report})
    print(f"| {args.arch} (weights=None, {model.count_params():,} parameters) | {report['auc']:.3f} "
          f"({report['auc_ci95'][0]:.3f}–{report['auc_ci95'][1]:.3f}) | {report['sensitivity']:.3f} | "
          f"{report['specificity']:.3f} | {history['epochs_run']} epochs, {history['train_seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
