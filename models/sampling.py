"""Which training images an epoch visits: class weights, class (re)sampling and source balancing."""

from __future__ import annotations

import numpy as np


def class_weights(y: np.ndarray, mode: str) -> dict[int, float]:
    """Per-class loss weights.

    Args:
        y: binary labels (1 = melanoma).
        mode: "balanced" (n / (2 · n_class), so both classes carry equal total weight) or "none".

    Returns:
        A dict {0: w0, 1: w1}.

    Raises:
        ValueError: if ``y`` lacks a class or ``mode`` is unknown.
    """
    y = np.asarray(y).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        raise ValueError(f"training labels need both classes, got counts nevus={counts[0]} melanoma={counts[1]}")
    if mode == "none":
        return {0: 1.0, 1: 1.0}
    if mode == "balanced":
        return {c: float(len(y) / (2.0 * counts[c])) for c in (0, 1)}
    raise ValueError(f"class_weight mode must be 'balanced' or 'none', got {mode!r}")


def class_draws(y: np.ndarray, sampling: str) -> tuple[int, int]:
    """How many nevi and melanomas one epoch visits under ``sampling`` (one rule for
    ``epoch_order`` and ``describe_source_balance``).

    "none" visits every image; "undersample" every melanoma and as many nevi (at most all);
    "oversample" every nevus and as many melanoma draws (with replacement).

    Raises:
        ValueError: if ``sampling`` is unknown.
    """
    y = np.asarray(y).astype(int)
    n_neg, n_pos = (int(c) for c in np.bincount(y, minlength=2)[:2])
    if sampling == "none":
        return n_neg, n_pos
    if sampling == "undersample":
        return min(n_pos, n_neg), n_pos
    if sampling == "oversample":
        return n_neg, n_neg
    raise ValueError(f"sampling must be none, undersample or oversample, got {sampling!r}")


def epoch_order(y: np.ndarray, sampling: str, rng: np.random.Generator, sources: np.ndarray | None = None,
                source_balance: float = 0.0) -> np.ndarray:
    """Indices of the training images to visit in one epoch, shuffled.

    Args:
        y: binary labels (1 = melanoma).
        sampling: "none", "undersample" or "oversample" (see ``BranchConfig.sampling``).
        rng: the epoch's random generator.
        sources: each image's source (any hashable labels), for ``source_balance``.
        source_balance: 0 leaves the class sampling as it is; above 0, each class's images per
            epoch are shared out among the sources in proportion to ``n_source ** (1 - alpha)``
            (1: every source equally), drawn without replacement while a source has enough.

    Returns:
        An index array; its length depends only on the class counts, not on the epoch or the
        source balance (so an epoch keeps its number of steps).
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_neg, n_pos = class_draws(y, sampling)
    if sampling == "none":
        idx = np.arange(len(y))
    elif sampling == "undersample":
        idx = np.concatenate([pos, rng.choice(neg, size=n_neg, replace=False)])
    else:  # oversample
        idx = np.concatenate([neg, rng.choice(pos, size=n_pos, replace=True)])
    if source_balance > 0 and sources is not None and len(set(np.asarray(sources).tolist())) > 1:
        idx = _balance_sources(idx, np.asarray(y), np.asarray(sources), source_balance, rng)
    return rng.permutation(idx)


def _balance_sources(idx: np.ndarray, y: np.ndarray, sources: np.ndarray, alpha: float,
                     rng: np.random.Generator) -> np.ndarray:
    # Keep how many images of each class the class sampling chose; redistribute them over the
    # sources. Weights n_s ** (1 - alpha): alpha = 0 is each source's natural share, alpha = 1
    # gives a 94-image source as many draws as a 7,800-image one (repeated, so an option to
    # measure, not a default).
    out = []
    for c in (0, 1):
        members = [np.flatnonzero((y == c) & (sources == s)) for s in np.unique(sources)]
        members = [m for m in members if len(m)]
        counts = _shares(int(np.sum(y[idx] == c)), [len(m) for m in members], alpha)
        for m, k in zip(members, counts):
            out.append(rng.choice(m, size=k, replace=k > len(m)))
    return np.concatenate(out)


def _shares(total: int, sizes: list[int], alpha: float) -> np.ndarray:
    """``total`` draws shared out ∝ ``size ** (1 - alpha)``, rounded by largest remainders."""
    if not total or not sizes:
        return np.zeros(len(sizes), dtype=int)
    w = np.array(sizes, dtype=float) ** (1.0 - alpha)
    counts = np.floor(total * w / w.sum()).astype(int)
    counts[np.argsort(-(total * w / w.sum() - counts))[: total - counts.sum()]] += 1
    return counts


def describe_source_balance(y: np.ndarray, sources: np.ndarray, sampling: str, alpha: float) -> str:
    """One line saying what ``source_balance`` does to an epoch: each source's draws per class.

    For example ``nevi HAM10000 3700/4691 (x0.8), ...; melanomas ...``: the draws of each source
    and class per epoch against the images it has, so a user sees how often a small source repeats.
    """
    y, sources = np.asarray(y).astype(int), np.asarray(sources)
    totals = class_draws(y, sampling)
    names = [s for s in np.unique(sources)]
    parts = []
    for c, label in ((0, "nevi"), (1, "melanomas")):
        have = [int(np.sum((y == c) & (sources == s))) for s in names]
        kept = [(s, h) for s, h in zip(names, have) if h]
        draws = _shares(int(totals[c]), [h for _, h in kept], alpha)
        parts.append(f"{label} " + ", ".join(f"{s} {k}/{h} (x{k / h:.1f})" for (s, h), k in zip(kept, draws)))
    return "; ".join(parts)
