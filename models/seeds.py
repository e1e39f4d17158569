"""Training a branch of several seeds (``BranchConfig.seeds``): one member after another, assembled into one branch.

Each member is an ordinary one-CNN ``fit_branch`` run with its own seed, early stopping and
checkpoint, so an interrupted run resumes inside the member it was training and keeps those
already finished.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np

from colorspaces.files import read_json_object, write_json_atomic
from models.branch import BranchConfig, assemble_members, build_branch, member_config
from models.checkpoint import save_atomically
from models.precision import recorded_mixed_precision, refuse_other_mixed_precision
from models.train import fit_branch

logger = logging.getLogger(__name__)


def fit_seeds(config: BranchConfig, train: tuple, val_images, y_val: np.ndarray, checkpoint: Path,
               resume_from: Path, resume: bool, **fit_options: Any) -> tuple[keras.Model, dict[str, Any]]:
    """``fit_branch`` once per seed of ``config.seeds``, the members assembled into one branch.

    One seed is ``fit_branch`` itself. With several, member k trains alone (``member_config``: seed
    ``seed + k``, its own early stopping and checkpoint in ``checkpoint/member<k>/``); a finished
    member's best weights are kept there (``done.weights.h5``), so ``--resume`` skips it.
    """
    images, y = train[0], train[1]
    if config.seeds == 1:
        return fit_branch(config, images, y, val_images, y_val, checkpoint_dir=checkpoint, resume=resume,
                          resume_dir=resume_from, **fit_options)
    weights, histories = [], []
    for k in range(config.seeds):
        mc = member_config(config, k)
        mine, theirs = checkpoint / f"member{k + 1}", resume_from / f"member{k + 1}"
        done = _finished_member(theirs, mc, fit_options.get("mixed_precision", "")) if resume else None
        if done is not None:
            logger.info("[%s] member %d of %d (seed %d) already trained; kept", config.view, k + 1, config.seeds,
                        mc.seed)
            member_weights, history = done
        else:
            logger.info("[%s] training member %d of %d (seed %d)", config.view, k + 1, config.seeds, mc.seed)
            member, history = fit_branch(mc, images, y, val_images, y_val, checkpoint_dir=mine, resume=resume,
                                         resume_dir=theirs, **fit_options)
            member_weights = member.get_weights()
            mine.mkdir(parents=True, exist_ok=True)
            save_atomically(member.save_weights, mine / "done.weights.h5")
            # Written after the weights: done.json names a complete member.
            write_json_atomic(mine / "done.json", {"config": mc.to_dict(), "history": history})
            del member
            keras.backend.clear_session()
            gc.collect()
        weights.append(member_weights)
        histories.append({"seed": mc.seed, **history})
    members = []
    for k, w in enumerate(weights):
        members.append(build_branch(member_config(config, k)))
        members[-1].set_weights(w)
    model = assemble_members(config, members)
    first = histories[0]
    history = {
        # The totals a run's cost is read from; the first member's best epoch and curve stand for
        # the run's in tables that show one (every member's are under "members").
        "epochs_run": sum(h["epochs_run"] for h in histories),
        "best_epoch": first["best_epoch"], "best_val_auc": first["best_val_auc"],
        "class_weights": first["class_weights"],
        "train_seconds": round(sum(h["train_seconds"] for h in histories), 2),
        "resumed_from_epoch": first["resumed_from_epoch"],
        "mixed_precision": first.get("mixed_precision", "off"),  # one compute type per branch (refused otherwise)
        "members": [{k: v for k, v in h.items() if k != "class_weights"} for h in histories],
        "per_epoch": first["per_epoch"],
    }
    return model, history


def _finished_member(directory: Path, config: BranchConfig,
                     mixed_precision: str | bool = "") -> tuple[list, dict[str, Any]] | None:
    """``(weights, history)`` of a member that finished in ``directory`` with this config, else None.

    Raises:
        ValueError: if it was trained with another ``--mixed-precision`` compute type (as an
            unfinished member's checkpoint is refused: one branch, one compute type).
    """
    weights_file, record = directory / "done.weights.h5", directory / "done.json"
    if not (weights_file.is_file() and record.is_file()):
        return None
    try:
        done = read_json_object(record, required=("config", "history"))
        if not config.matches(done["config"]):
            return None
        raw = done["history"].get("mixed_precision") if isinstance(done["history"], dict) else None
        recorded_mixed_precision(raw)  # a damaged record is a damaged member
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("[%s] %s: damaged (%s); training that member again", config.view, directory, exc)
        return None
    refuse_other_mixed_precision(directory, raw, mixed_precision, "this member")
    try:
        model = build_branch(config)
        model.load_weights(weights_file)
        return model.get_weights(), done["history"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("[%s] %s: damaged (%s); training that member again", config.view, directory, exc)
        return None
