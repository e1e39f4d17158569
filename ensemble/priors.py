"""Label shift: estimate a new population's melanoma prevalence from unlabelled probabilities and correct for it.

Under label shift the class-conditional image distributions stay as they were and only the
prevalence changes, so a calibrated posterior moves by a constant in log-odds (Bayes' rule):
``logit p_t(x) = logit p_s(x) + logit pi_t - logit pi_s``. Saerens, Latinne & Decaestecker
(2002, "Adjusting the outputs of a classifier to new a priori probabilities: a simple
procedure") estimate ``pi_t`` by EM on the unlabelled probabilities; everything here is numpy,
so it runs without Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CLIP = 1e-6


def logit(p) -> np.ndarray:
    """Log-odds of probabilities, clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    """The inverse of ``logit``."""
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _check_prior(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a prevalence strictly between 0 and 1, got {value!r}")
    return value


def _check_proba(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(p) == 0 or not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must be a non-empty array of finite values in [0, 1]")
    return p


def prior_offset(target_prior: float, source_prior: float) -> float:
    """The log-odds shift ``logit(target) - logit(source)`` that moves posteriors from one prevalence to another."""
    t, s = _check_prior("target_prior", target_prior), _check_prior("source_prior", source_prior)
    return float(math.log(t / (1.0 - t)) - math.log(s / (1.0 - s)))


def shift_proba(p, offset: float) -> np.ndarray:
    """Probabilities moved by ``offset`` in log-odds (a monotone map: rankings, hence AUC, are unchanged)."""
    p = np.asarray(p, dtype=np.float64)
    if offset == 0.0:
        return p
    # sigmoid(logit p + d) written without the logit, so 0 and 1 stay 0 and 1 and nothing is
    # clipped: clipping would tie the most extreme probabilities and could change the AUC.
    odds = math.exp(offset)
    return p * odds / (p * odds + (1.0 - p))


def shift_threshold(threshold: float, offset: float) -> float:
    """The threshold on the shifted scale that makes the same decisions as ``threshold`` on the old one.

    ``p >= t`` if and only if ``shift_proba(p, d) >= shift_threshold(t, d)``, because the shift is
    strictly increasing; 0 and 1 stay 0 and 1 (always / never melanoma).
    """
    return float(shift_proba(float(threshold), offset))


def calibration_offset(p, y, tol: float = 1e-10) -> float:
    """The log-odds shift ``b`` that makes ``mean(sigmoid(logit p + b))`` equal the observed prevalence of ``y``.

    A probability column is rarely calibrated to the prevalence of the data it is applied to:
    branches trained on class-balanced batches speak for 50% melanoma, a stacker fitted on
    validation data for the validation prevalence. Matching the mean on labelled validation
    data says which prevalence the column effectively assumes (see ``effective_prior``).

    Raises:
        ValueError: if ``y`` holds one class only, or the lengths differ.
    """
    p = _check_proba(p)
    y = np.asarray(y).astype(int).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"got {len(y)} labels for {len(p)} probabilities")
    target = float(y.mean())
    if target in (0.0, 1.0):
        raise ValueError("calibration needs labels of both classes")
    z = logit(p)
    lo, hi = -30.0, 30.0  # the mean is increasing in b: bisection always converges
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if sigmoid(z + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return float(0.5 * (lo + hi))


def effective_prior(p, y) -> float:
    """The prevalence a probability column is calibrated to, judged on labelled data ``(p, y)``.

    With ``b = calibration_offset(p, y)``, the column behaves like posteriors at prevalence
    ``pi_s`` where ``logit pi_s = logit mean(y) - b``: shifting it by ``b`` turns it into
    posteriors at the observed prevalence ``mean(y)``.
    """
    b = calibration_offset(p, y)
    return float(sigmoid(logit(float(np.mean(y))) - b))


@dataclass(frozen=True)
class PriorEstimate:
    """What ``estimate_prior`` found: the prevalence, the adjusted posteriors and how EM ended.

    ``edge`` is ``"upper"`` or ``"lower"`` when the likelihood has no maximum inside (0, 1)
    (see ``likelihood_edge``): EM then walks towards 100% or 0% and ``prior`` means nothing.
    """

    prior: float
    posteriors: np.ndarray
    iterations: int
    converged: bool
    edge: str = ""


def likelihood_edge(p, source_prior: float) -> str:
    """``"upper"``/``"lower"`` when the unlabelled likelihood of the prevalence peaks at 100%/0%, else ``""``.

    With ``a_i = p_i / s`` and ``b_i = (1 - p_i) / (1 - s)`` the log-likelihood of prevalence
    ``pi`` is ``sum log(pi a_i + (1 - pi) b_i)``, concave in ``pi``. Its slope at ``pi = 1`` is
    ``sum(1 - b_i / a_i)``, so the maximum sits at 100% exactly when the images' mean likelihood
    ratio nevus:melanoma ``mean(b_i / a_i)`` is at most 1, i.e. when even the least melanoma-like
    image is, on average, better explained as melanoma; symmetrically at 0%. That happens when
    the probabilities separate the images poorly and all lean one way (a weak or miscalibrated
    model on images unlike its training data, which breaks the label-shift assumption): EM then
    runs to the edge however long it iterates, and the shift it implies is unbounded.
    """
    z = logit(_check_proba(p)) - logit(_check_prior("source_prior", source_prior))
    if np.mean(np.exp(-z)) <= 1.0:
        return "upper"
    if np.mean(np.exp(z)) <= 1.0:
        return "lower"
    return ""


def estimate_prior(p, source_prior: float, tol: float = 1e-6, max_iter: int = 1000) -> PriorEstimate:
    """Saerens-Latinne-Decaestecker EM: the prevalence of the population ``p`` was scored on.

    ``p`` are posteriors calibrated at ``source_prior``. Each step re-weights them to the current
    prevalence estimate (E step: Bayes' rule with the prior ratio) and takes their mean as the
    next estimate (M step); this maximises the likelihood of the unlabelled data over the prior.

    Args:
        p: melanoma probabilities of the unlabelled images.
        source_prior: the prevalence ``p`` is calibrated to.
        tol: stop when the estimate moves less than this.
        max_iter: the most EM steps.

    Returns:
        The ``PriorEstimate``; its ``posteriors`` are ``p`` adjusted to the estimated prevalence.
    """
    p = _check_proba(p)
    s = _check_prior("source_prior", source_prior)
    edge = likelihood_edge(p, s)
    z = logit(p)
    pi = s
    for it in range(1, max_iter + 1):
        post = sigmoid(z + prior_offset(pi, s))  # E step
        new = float(np.clip(post.mean(), _CLIP, 1.0 - _CLIP))  # M step
        if abs(new - pi) < tol:
            return PriorEstimate(new, sigmoid(z + prior_offset(new, s)), it, True, edge)
        pi = new
    return PriorEstimate(pi, sigmoid(z + prior_offset(pi, s)), max_iter, False, edge)


def prior_interval(p, source_prior: float, n_boot: int = 200, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``estimate_prior`` (images resampled with replacement)."""
    p = _check_proba(p)
    rng = np.random.default_rng(seed)
    stats = [estimate_prior(p[rng.integers(0, len(p), len(p))], source_prior, tol=1e-5).prior
             for _ in range(n_boot)]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return float(lo), float(hi)


# The range a prevalence estimate must lie in, with its 95% interval, to be acted on. No clinic is
# 0.1% or 99.9% melanoma in a set of a few hundred images; an estimate out there is EM running to
# the edge, and shifting log-odds by logit(0.999) is already +6.9.
PLAUSIBLE_PRIOR = (0.001, 0.999)


class PriorNotSupported(ValueError):
    """The unlabelled probabilities do not support a prevalence estimate worth acting on."""


def check_prior_estimate(est: PriorEstimate, interval: tuple[float, float] | None = None) -> None:
    """Refuse a prevalence estimate that the data do not support.

    The rule: the likelihood must peak inside (0, 1) (``est.edge`` empty), EM must have
    converged, and the estimate and its bootstrap interval (when given) must lie inside
    ``PLAUSIBLE_PRIOR`` with a width above 0.001 (a bootstrap interval that collapses to a point
    means every resample ran to the same edge, not a precise estimate).

    Raises:
        PriorNotSupported: saying which part of the rule failed.
    """
    lo_ok, hi_ok = PLAUSIBLE_PRIOR
    pct = f"{100 * est.prior:.1f}%"
    if est.edge:
        raise PriorNotSupported(
            f"the prevalence estimate runs to {'100' if est.edge == 'upper' else '0'}% (the likelihood has no "
            f"maximum inside 0-100%: the probabilities lean {'high' if est.edge == 'upper' else 'low'} on every "
            "image and do not separate melanoma from nevus here)")
    if not est.converged:
        raise PriorNotSupported(f"EM did not converge (last estimate {pct})")
    if not lo_ok < est.prior < hi_ok:
        raise PriorNotSupported(f"the prevalence estimate {pct} lies outside the plausible "
                                f"{100 * lo_ok:.1f}-{100 * hi_ok:.1f}%")
    if interval is not None and all(math.isfinite(v) for v in interval):
        lo, hi = interval
        if hi - lo < 1e-3 or lo <= lo_ok or hi >= hi_ok:
            raise PriorNotSupported(f"the 95% interval of the estimate ({100 * lo:.1f}-{100 * hi:.1f}%) reaches the "
                                    "edge of the range or collapses to a point: resampled images run to the edge")


def balanced_weights(posteriors, prior: float | None = None) -> np.ndarray:
    """Per-image weights that give the unlabelled set the 50/50 class mix of class-balanced training.

    With labels, image i would weigh ``0.5 / pi`` (melanoma) or ``0.5 / (1 - pi)`` (nevus). Without
    them, its expected weight under its posterior ``r_i`` is
    ``w_i = 0.5 r_i / pi + 0.5 (1 - r_i) / (1 - pi)``. When the ``r_i`` are the population's
    posteriors, the weighted image distribution ``w(x) p_t(x)`` is exactly
    ``0.5 p(x | melanoma) + 0.5 p(x | nevus)``. The weights average to 1.

    Args:
        posteriors: melanoma posteriors for the population (``estimate_prior(...).posteriors``).
        prior: its prevalence; default the posteriors' mean (what EM converges to).
    """
    r = _check_proba(posteriors)
    pi = float(r.mean()) if prior is None else float(prior)
    pi = float(np.clip(pi, _CLIP, 1.0 - _CLIP))
    return 0.5 * r / pi + 0.5 * (1.0 - r) / (1.0 - pi)


def effective_sample_size(weights) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of weighted images."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / np.square(w).sum()) if len(w) else 0.0
