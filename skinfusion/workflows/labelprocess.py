"""The nevus label process in training: which images a branch learns from and which validation
images select its epoch and thresholds, from each record's ``dx_type`` (``BranchConfig.follow_up_weight``
and ``BranchConfig.select_on``).

HAM10000 confirms about 3,700 of its nevi by follow-up only (the lesion did not change): easy,
benign-looking lesions, unlike the biopsied nevi of the ISIC challenges. The validation and test
splits never change with these options, so that every run's metrics stay comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import BranchConfig
from skinfusion.data.index import Record
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir

logger = logging.getLogger(__name__)

FOLLOW_UP = "follow_up"


def training_records(records: Sequence[Record], config: BranchConfig) -> tuple[list[Record], int]:
    """``(kept, n_dropped)``: the training records without follow-up-confirmed ones when
    ``config.follow_up_weight`` is 0, else all of them."""
    if config.follow_up_weight > 0:
        return list(records), 0
    kept = [r for r in records if r.dx_type != FOLLOW_UP]
    if len(kept) == len(records):
        logger.warning("[%s] --follow-up-weight 0: no training image has dx_type follow_up (the dataset records "
                       "none), so nothing is left out", config.view)
    return kept, len(records) - len(kept)


def training_weights(records: Sequence[Record], config: BranchConfig) -> np.ndarray | None:
    """A loss weight per training record (``follow_up_weight`` on follow-up-confirmed ones, 1 on
    the rest), or ``None`` when every weight would be 1."""
    if config.follow_up_weight in (0.0, 1.0):  # 0: those records were left out by training_records
        return None
    w = np.array([config.follow_up_weight if r.dx_type == FOLLOW_UP else 1.0 for r in records], np.float32)
    if (w == 1.0).all():
        logger.warning("[%s] --follow-up-weight %g: no training image has dx_type follow_up, so nothing is "
                       "down-weighted", config.view, config.follow_up_weight)
        return None
    return w


def selection_mask(records: Sequence[Record], select_on: str) -> np.ndarray:
    """Which validation records select the epoch and thresholds (``BranchConfig.select_on``).

    Raises:
        ValueError: naming the option and the counts, if the selected images lack a class (an
            AUC needs both), e.g. ``histopathology`` on a dataset that records no dx_type.
    """
    dx = np.array([r.dx_type for r in records], dtype=object)
    if select_on == "all":
        return np.ones(len(records), bool)
    if select_on == "histopathology":
        mask = dx == "histopathology"
    elif select_on == "not_follow_up":
        mask = dx != FOLLOW_UP
    else:
        raise ValueError(f"select_on must be one of all, histopathology, not_follow_up; got {select_on!r}")
    y = np.array([r.label for r in records], dtype=int)
    n_mel, n_nev = int(y[mask].sum()), int(mask.sum() - y[mask].sum())
    if not n_mel or not n_nev:
        counts = ", ".join(f"{k}={int((dx == k).sum())}" for k in sorted(set(dx.tolist())))
        raise ValueError(f"--select-on {select_on}: the validation split has {n_mel} melanomas and {n_nev} nevi "
                         f"of that kind (dx_type counts: {counts}); selecting an epoch by AUC needs both classes. "
                         "Use --select-on all, or not_follow_up")
    return mask


def selection_record(mask: np.ndarray, y: np.ndarray, select_on: str, n_dropped: int) -> dict[str, Any]:
    """What ``metadata.json`` records about the label-process options of one branch."""
    y = np.asarray(y).astype(int)
    return {"select_on": select_on, "n_validation_selecting": int(mask.sum()),
            "n_melanoma_selecting": int(y[mask].sum()), "follow_up_dropped_from_training": n_dropped}


def fusion_selection(run: Path, ids: Sequence[str], configs: Sequence[BranchConfig]) -> np.ndarray:
    """Which of a run's validation ids (``ids``) choose the fused and branch thresholds: the
    branches' common ``select_on`` subset (all of them for ``all``), read from the run's dataset.

    Raises:
        ValueError: if the branches were trained with different ``select_on``, or the subset lacks a class.
    """
    chosen = {c.select_on for c in configs}
    if chosen == {"all"}:
        return np.ones(len(ids), bool)
    if len(chosen) > 1:
        raise ValueError(f"{run}: the branches were trained with different --select-on ({sorted(chosen)}); their "
                         "thresholds would be chosen on different images: retrain them with one --select-on")
    _, info = load_split(run)
    by_id = {r.image_id: r for r in index_dataset(recorded_data_dir(run, info), log=False).records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{recorded_data_dir(run, info)}: lacks validation images of {run} (e.g. {missing[0]}), so "
                         f"their dx_type for --select-on {chosen.pop()} is unknown; restore the dataset")
    return selection_mask([by_id[i] for i in ids], chosen.pop())
