"""Greedy forward ensemble selection (Caruana et al., 2004): which branches earn their place."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def greedy_selection(P: np.ndarray, y: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Weights of the members chosen by greedy forward selection with replacement on validation AUC.

    Start from the best single member; in each round add (again, possibly) the member whose
    addition gives the highest AUC of the averaged probabilities; keep the bag of the best round
    (the earliest on ties, so a member is only added when it helps). With replacement, a member
    picked twice counts twice, which is how the method weights members without fitting weights.

    Args:
        P: member probabilities on validation images, shape (n_images, n_members).
        y: binary labels; both classes present.
        rounds: additions after the first member.

    Returns:
        Non-negative weights summing to 1, shape (n_members,); members never picked get 0.

    Raises:
        ValueError: on mismatched shapes or a single class.
    """
    P, y = np.asarray(P, dtype=float), np.asarray(y).astype(int)
    if P.ndim != 2 or len(P) != len(y) or P.shape[1] == 0:
        raise ValueError(f"P must be (n_images, n_members) matching y, got {P.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("greedy selection needs validation labels of both classes")
    counts = np.zeros(P.shape[1])
    total = np.zeros(len(y))
    best_auc, best_counts = -1.0, counts.copy()
    for _ in range(rounds + 1):
        k = counts.sum()
        scores = [roc_auc_score(y, (total + P[:, j]) / (k + 1)) for j in range(P.shape[1])]
        j = int(np.argmax(scores))
        counts[j] += 1
        total += P[:, j]
        if scores[j] > best_auc + 1e-12:
            best_auc, best_counts = scores[j], counts.copy()
    return best_counts / best_counts.sum()
