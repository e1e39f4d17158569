"""Checkpoints of a training branch: keep the best validation-AUC weights, and resume after a kill.

``_BestKeeper`` is the Keras callback ``fit_branch`` trains with: each epoch it writes the last
model, the best weights and ``state.json`` atomically, so ``train --resume`` continues exactly
where a killed run stopped (seed-generator states included).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from colorspaces.files import atomic_path, read_json_object, write_json_atomic
from models.branch import BranchConfig, build_branch
from models.precision import recorded_mixed_precision, refuse_other_mixed_precision

logger = logging.getLogger(__name__)

# What a checkpoint's state.json must hold for --resume to continue it.
_STATE_KEYS = ("epoch", "best", "best_epoch", "wait", "stopped", "history", "config", "seconds")

# "plateau" schedule: halve the learning rate after this many epochs without a better val AUC.
PLATEAU_PATIENCE, PLATEAU_FACTOR = 2, 0.5


def _seed_generators(model: keras.Model) -> dict[str, Any]:
    return {layer.name: layer.seed_generator for layer in model.layers if getattr(layer, "seed_generator", None) is not None}


def seed_states(model: keras.Model) -> dict[str, list[int]]:
    """The state of every seed generator in ``model`` (its Dropout layers'), by layer name, JSON-ready."""
    # Dropout's random state is not part of a saved model; without it a resumed run would
    # draw different dropout masks from the uninterrupted one.
    return {name: np.asarray(keras.ops.convert_to_numpy(g.state.value)).tolist() for name, g in _seed_generators(model).items()}


def set_seed_states(model: keras.Model, states: dict[str, list[int]]) -> None:
    """Put back seed generator states from ``seed_states``; generators it does not name keep theirs."""
    for name, g in _seed_generators(model).items():
        if name in states:
            g.state.assign(np.asarray(states[name], dtype=keras.backend.standardize_dtype(g.state.dtype)))


def save_atomically(save: Callable[[Path], Any], path: Path) -> None:
    """``save(file)`` (a Keras ``save``/``save_weights``) written beside ``path`` and renamed over it.

    A kill mid-write leaves the old file or none, never a torn one.
    """
    with atomic_path(path) as tmp:
        real = tmp.with_name(tmp.name + "." + path.name)  # Keras checks the suffix
        try:
            save(real)
            os.replace(real, tmp)
        finally:
            real.unlink(missing_ok=True)


def _uses_ema(model: keras.Model) -> bool:
    optimizer = getattr(model, "optimizer", None)
    return bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))


def averaged_weights(model: keras.Model) -> list:
    """The model's weights with its optimizer's moving averages (``BranchConfig.weight_ema``) in place of the
    trainable ones; its plain weights without EMA. The model keeps its training weights."""
    if not _uses_ema(model):
        return model.get_weights()
    raw = model.get_weights()
    model.optimizer.finalize_variable_values(model.trainable_variables)  # Keras' public way to apply the average
    averaged = model.get_weights()
    model.set_weights(raw)
    return averaged


def _checkpoint_files(state_file: Path, state: dict, fresh: str) -> tuple[str, str]:
    """``(last model, best weights)``: the file names ``state.json`` gives, checked to be plain
    names that exist beside it. A checkpoint written before ``files`` existed used fixed names."""
    files = state.get("files", {"last": "last.keras", "best": "best.weights.h5"})
    names = [files.get(k) if isinstance(files, dict) else None for k in ("last", "best")]
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"{state_file}: damaged, 'files' must name two files beside it; {fresh}")
        if not (state_file.parent / name).is_file():
            raise ValueError(f"{state_file.parent / name}: missing from the checkpoint; {fresh}")
    return names[0], names[1]


class _BestKeeper(keras.callbacks.Callback):
    """Early stopping on validation AUC that keeps the best weights, and (optionally) checkpoints.

    It replaces Keras' ``EarlyStopping`` and ``ReduceLROnPlateau`` so that their state (best
    AUC, best weights, epochs without improvement) can be saved with each epoch's checkpoint:
    a resumed run then stops, halves its learning rate and restores exactly as an
    uninterrupted one would. A checkpoint is ``last-NNNN.keras`` (the model with its optimizer
    state after epoch NNNN), ``best-MMMM.weights.h5`` (the best epoch's weights) and
    ``state.json``, which names the two files. Each is written atomically and ``state.json``
    last, and a file is deleted only once a newer ``state.json`` no longer names it: a kill at
    any moment leaves a ``state.json`` whose files are those of the epoch it names.
    """

    def __init__(self, config: BranchConfig, checkpoint_dir: str | os.PathLike | None,
                 build: Callable[[BranchConfig], keras.Model] = build_branch,
                 resume_dir: str | os.PathLike | None = None, mixed_precision: str = ""):
        super().__init__()
        self.config, self.mixed_precision = config, mixed_precision
        self.build = build  # the architecture the checkpoint's best weights belong to
        self.dir = Path(checkpoint_dir) if checkpoint_dir else None
        # Where restore() reads: the chief's checkpoint, for a multi-worker run's other workers.
        self.source = Path(resume_dir) if resume_dir else self.dir
        self.best, self.best_epoch, self.wait, self.best_weights = -math.inf, -1, 0, None
        self.lr_wait = 0  # epochs without improvement since the last plateau halving
        self.best_file = ""  # the checkpoint's best-weights file, as state.json names it
        self.history: dict[str, list[float]] = {}
        self.stopped, self.seconds_before, self._t0 = False, 0.0, time.perf_counter()

    def restore(self) -> tuple[keras.Model | None, int]:
        """Load the last complete epoch's checkpoint; ``(None, 0)`` if there is none to resume."""
        state_file = self.source / "state.json" if self.source else None
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
            raise ValueError(f"{self.source}: the checkpoint was made with another config ({state['config']}); "
                             "resume with the same settings, or train without --resume")
        try:
            recorded_mixed_precision(state.get("mixed_precision"))
        except ValueError as exc:
            raise ValueError(f"{state_file}: damaged, its mixed_precision is invalid ({exc}); {fresh}") from None
        refuse_other_mixed_precision(self.source, state.get("mixed_precision"), self.mixed_precision, "the checkpoint")
        last, self.best_file = _checkpoint_files(state_file, state, fresh)
        model = keras.saving.load_model(self.source / last, compile=True)
        set_seed_states(model, state.get("seed_states", {}))
        best_model = self.build(self.config)
        best_model.load_weights(self.source / self.best_file)
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
            self.best_weights = averaged_weights(self.model)
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
        # New names each epoch: overwriting last.keras before state.json moved on would pair the
        # previous epoch's state with this epoch's model if the process died in between.
        last = f"last-{epochs_done:04d}.keras"
        save_atomically(self.model.save, self.dir / last)
        if improved or not self.best_file:
            self.best_file = f"best-{epochs_done:04d}.weights.h5"
            save_atomically(self._save_best_weights, self.dir / self.best_file)
        write_json_atomic(self.dir / "state.json", {
            "files": {"last": last, "best": self.best_file},
            "epoch": epochs_done, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
            "lr_wait": self.lr_wait, "mixed_precision": self.mixed_precision,
            "stopped": self.stopped, "history": self.history, "config": self.config.to_dict(),
            "seed_states": seed_states(self.model),
            "seconds": self.seconds_before + time.perf_counter() - self._t0,
        })
        for old in (*self.dir.glob("last*.keras"), *self.dir.glob("best*.weights.h5")):
            if old.name not in (last, self.best_file):
                old.unlink(missing_ok=True)

    def _save_best_weights(self, path: Path) -> None:
        # Called on an improved epoch: the best weights are the model's own, unless averaged (EMA).
        if not _uses_ema(self.model):
            self.model.save_weights(path)
            return
        raw = self.model.get_weights()
        self.model.set_weights(self.best_weights)
        try:
            self.model.save_weights(path)
        finally:
            self.model.set_weights(raw)

    def restore_best(self, model: keras.Model) -> None:
        """Give ``model`` the weights of the best validation-AUC epoch."""
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
