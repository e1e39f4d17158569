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


OPERATING_POINTS = (0.80, 0.90, 0.95)


def sensitivity_at_specificity(y, proba, specificity: float) -> float:
    """Highest sensitivity whose ROC point has at least the given specificity (NaN for one class)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(y, np.asarray(proba, dtype=np.float64), drop_intermediate=False)  # every threshold is a candidate
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def specificity_at_sensitivity(y, proba, sensitivity: float) -> float:
    """Highest specificity whose ROC point has at least the given sensitivity (NaN for one class)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(y, np.asarray(proba, dtype=np.float64), drop_intermediate=False)  # every threshold is a candidate
    ok = tpr >= sensitivity - 1e-12
    return float((1.0 - fpr[ok]).max()) if ok.any() else 0.0


def expected_calibration_error(y, proba, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins.

    The weighted mean, over bins, of |mean predicted probability − observed melanoma rate|.
    """
    y, proba = np.asarray(y, dtype=np.float64), np.asarray(proba, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    bins = np.minimum((proba * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(proba[m].mean() - y[m].mean())
    return float(ece)


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
        ``brier`` (mean squared error of the probabilities), ``ece`` (expected calibration error,
        10 bins), ``balanced_accuracy``, ``sensitivity`` and ``specificity`` at ``threshold``,
        ``confusion_matrix`` ({tn, fp, fn, tp}) at ``threshold``, ``sensitivity_at_specificity`` and
        ``specificity_at_sensitivity`` (keys "0.80", "0.90", "0.95"), and the ``threshold`` itself.
        Undefined values (one class only) are NaN.
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
        "ece": expected_calibration_error(y, proba),
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "threshold": float(threshold),
        "confusion_matrix": {
            "tn": int((~pred & neg).sum()), "fp": int((pred & neg).sum()),
            "fn": int((~pred & pos).sum()), "tp": int((pred & pos).sum()),
        },
        "sensitivity_at_specificity": {f"{t:.2f}": sensitivity_at_specificity(y, proba, t) for t in OPERATING_POINTS},
        "specificity_at_sensitivity": {f"{t:.2f}": specificity_at_sensitivity(y, proba, t) for t in OPERATING_POINTS},
    }


def paired_auc_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same images, with a paired percentile bootstrap 95% CI."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            deltas.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    d = float(roc_auc_score(y, a) - roc_auc_score(y, b))
    lo, hi = np.percentile(deltas, [2.5, 97.5]) if deltas else (np.nan, np.nan)
    return {"delta": round(d, 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4)}
