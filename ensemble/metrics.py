"""The fixed evaluation metric set: AUC with a bootstrap CI, threshold choice and threshold metrics."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve


def roc_auc_ci(y, proba, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """ROC AUC with a percentile bootstrap confidence interval.

    Args:
        y: binary labels.
        proba: melanoma probabilities.
        n_boot: bootstrap resamples (images drawn with replacement).
        seed: resampling seed.
        level: confidence level.

    Returns:
        ``(auc, low, high)``; all NaN if ``y`` has a single class.
    """
    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return (math.nan, math.nan, math.nan)
    auc = float(roc_auc_score(y, proba))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        stats.append(roc_auc_score(y[idx], proba[idx]))
    if not stats:
        return (auc, math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return (auc, float(lo), float(hi))


def choose_threshold(y, proba) -> float:
    """Decision threshold that maximises Youden's J (sensitivity + specificity − 1).

    Call it on validation data only; a threshold picked on test data inflates the test metrics.

    Raises:
        ValueError: if ``y`` has a single class.
    """
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("choosing a threshold needs both classes in the labels")
    fpr, tpr, thr = roc_curve(y, np.asarray(proba, dtype=np.float64))
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def binary_report(y, proba, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Headline metrics for one probability column.

    Returns:
        dict with ``n``, ``n_melanoma``, ``auc``, ``auc_ci95`` ([low, high]), ``average_precision``,
        ``brier`` (mean squared error of the probabilities), ``balanced_accuracy``,
        ``sensitivity`` and ``specificity`` at ``threshold``, and the ``threshold`` itself.
    """
    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    auc, lo, hi = roc_auc_ci(y, proba, n_boot=n_boot, seed=seed)
    pred = proba >= threshold
    pos, neg = y == 1, y == 0
    both = pos.any() and neg.any()
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return {
        "n": int(len(y)),
        "n_melanoma": int(pos.sum()),
        "auc": auc,
        "auc_ci95": [lo, hi],
        "average_precision": float(average_precision_score(y, proba)) if both else math.nan,
        "brier": float(brier_score_loss(y, proba, pos_label=1)) if len(y) else math.nan,
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "threshold": float(threshold),
    }
