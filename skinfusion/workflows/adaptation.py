"""Adapting a loaded ensemble to unlabelled images, in memory: the methods, their settings and ``adapt_ensemble``.

Methods (``METHODS``), applied in this order when combined:

* ``bn`` / ``bn-balanced``: re-estimate every branch's BatchNorm statistics on the clinic's
  images, plainly (AdaBN) or with each image weighted so that the classes count 50/50, the mix
  the branches were trained on (``ensemble.priors.balanced_weights``); ``bn_alpha`` is the
  target statistics' share.
* ``tent``: entropy minimisation of the BatchNorm scale and offset (``models.adapt.tent``), with
  the same class-balanced weights.
* ``prior``: estimate the clinic's melanoma prevalence (EM, ``ensemble.priors``) and shift the
  fused log-odds and the threshold by the prior change. AUC cannot change.

Whatever is adapted is frozen: the adapted ensemble predicts with BatchNorm in inference mode,
image by image, like any other. ``skinfusion.workflows.adapting`` writes it as a new run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ensemble.priors import (
    PriorNotSupported,
    balanced_weights,
    check_prior_estimate,
    effective_prior,
    effective_sample_size,
    estimate_prior,
    prior_interval,
    prior_offset,
    shift_threshold,
)

if TYPE_CHECKING:  # the Keras engine is imported where it runs: `skinfusion adapt --help` loads no TensorFlow
    from ensemble.engine import Ensemble

logger = logging.getLogger(__name__)

METHODS = ("bn", "bn-balanced", "tent", "prior")
# Until the leave-one-source-out measurement (experiments/adapt.py) shows a method that does not
# lower AUC, the default is the one that cannot change it: a probe found that plain AdaBN
# lowered fused AUC on held-out clinics (0.959 -> 0.904, 0.685 -> 0.661).
DEFAULT_METHODS = ("prior",)

# The fewest readable images adapt accepts. The estimated prevalence moves the decision scale,
# so it must be precise enough to act on: even a perfect classifier estimates a prevalence of
# 20% from n images with a standard error of sqrt(0.2 * 0.8 / n), and a 95% interval of +/-0.05
# needs n >= 1.96^2 * 0.16 / 0.05^2 = 246. Below that no classifier can do it; above it, an
# imperfect one does worse, and adaptation.json reports the bootstrap interval actually reached.
# At 250 images and 20% melanoma, class-balanced BatchNorm statistics rest on about 50 melanoma
# images (Kish effective sample size 0.64 n = 160 images in all): about the least that per-channel
# means and variances can be estimated from without following single images.
MIN_IMAGES = 250


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """``--method``: comma-separated names of ``METHODS``, returned in the order they are applied.

    ``none`` alone means no adaptation (used by the measurement script as the baseline).

    Raises:
        ValueError: for an unknown or repeated name, an empty list, or ``bn`` with ``bn-balanced``.
    """
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if names == ["none"]:
        return ()
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--method takes comma-separated names from {', '.join(METHODS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"--method names a method twice: {text!r}")
    if {"bn", "bn-balanced"} <= set(names):
        raise ValueError("--method: choose bn or bn-balanced, not both (each replaces the BatchNorm statistics)")
    return tuple(m for m in METHODS if m in names)


@dataclass(frozen=True)
class AdaptOptions:
    """The adaptation's settings: the methods and their hyper-parameters."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    bn_alpha: float = 1.0
    tent_steps: int = 30
    tent_lr: float = 5e-4
    tent_batch: int = 64
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.bn_alpha <= 1.0:
            raise ValueError(f"--bn-alpha must be in (0, 1] (the share of the clinic's statistics), got {self.bn_alpha}")
        if self.tent_steps < 1 or self.tent_batch < 1 or self.batch_size < 1:
            raise ValueError("--tent-steps, --tent-batch and --batch-size must be at least 1")
        if not 0.0 < self.tent_lr < 1.0:
            raise ValueError(f"--tent-lr must be in (0, 1), got {self.tent_lr}")

    def used(self) -> dict[str, Any]:
        """The settings that the chosen methods use, for the record."""
        out: dict[str, Any] = {"methods": list(self.methods)}
        if set(self.methods) & {"bn", "bn-balanced"}:
            out["bn_alpha"] = self.bn_alpha
        if "tent" in self.methods:
            out.update(tent_steps=self.tent_steps, tent_lr=self.tent_lr, tent_batch=self.tent_batch, seed=self.seed)
        return out


@dataclass(frozen=True)
class SourceCalibration:
    """The prevalence the source ensemble's fused probabilities speak for, judged on its validation split.

    ``validation_prior`` is the validation split's melanoma share and ``effective_prior`` the
    prevalence at which the fused probabilities are calibrated on it (``ensemble.priors.effective_prior``):
    a mean of branches trained on class-balanced batches sits near 50%, a stacker fitted on
    validation near the validation share.
    """

    validation_prior: float
    effective_prior: float
    n_validation: int


def source_calibration(ens: Ensemble, branch_dirs: Sequence[Path]) -> SourceCalibration:
    """Fuse the branches' saved validation probabilities and find the prevalence they are calibrated to.

    Raises:
        FileNotFoundError, ValueError: if a branch's ``val_predictions.csv`` is missing or damaged,
            or the branches' validation images differ.
    """
    from skinfusion.workflows.fusing import read_val_predictions

    preds = [read_val_predictions(Path(b)) for b in branch_dirs]
    ids = sorted(preds[0])
    if any(set(p) != set(ids) for p in preds[1:]):
        raise ValueError(f"{branch_dirs[0]}: the branches' val_predictions.csv list different images; "
                         "retrain them in one run")
    y = np.array([preds[0][i][0] for i in ids])
    P = np.array([[p[i][1] for p in preds] for i in ids])
    fused = ens.fusion.predict_proba(P)[:, 1]
    if len(set(y.tolist())) < 2:
        raise ValueError(f"{branch_dirs[0] / 'val_predictions.csv'}: validation holds one class only, so the "
                         "prevalence the ensemble is calibrated to cannot be measured")
    return SourceCalibration(float(y.mean()), effective_prior(fused, y), len(y))


def member_proba(ens: Ensemble, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``P`` (n x branches) for decoded images at the ensemble's load size."""
    parts = [ens.member_proba_batch(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(ens.models)))


@dataclass
class Adapted:
    """An adapted ensemble (``ensemble``: adapted branches, shifted fusion and threshold) and what changed."""

    ensemble: Ensemble
    record: dict[str, Any]
    changed_branches: bool


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _require_supported(est, interval, method: str) -> None:
    """Refuse a method whose prevalence estimate the images do not support (``check_prior_estimate``)."""
    try:
        check_prior_estimate(est, interval)
    except PriorNotSupported as exc:
        raise ValueError(f"--method {method}: {exc}; so the estimate cannot be acted on. Check that --images holds "
                         "dermoscopic images like the run's training images, adapt a better-trained run, or leave "
                         f"{method} out of --method") from None


def _require_spread(fused: np.ndarray, methods: Sequence[str]) -> None:
    """The last check before an adapted run is written: its probabilities must not all be equal.

    A run that gives every image the same probability (to 6 decimals) decides nothing; whatever
    led there, it is refused rather than written.
    """
    if len(fused) > 1 and np.ptp(np.round(fused, 6)) == 0.0:
        raise ValueError(f"--method {','.join(methods)}: the adapted ensemble gives every one of the {len(fused)} "
                         f"images the same probability {fused[0]:.6f}; nothing was written. Leave out the methods "
                         "that caused it, or adapt a better-trained run")


def adapt_ensemble(ens: Ensemble, images: np.ndarray, calibration: SourceCalibration,
                   options: AdaptOptions | None = None, prior_ci: bool = True) -> Adapted:
    """Adapt a loaded ensemble to unlabelled images (RGB uint8 at its load size), in memory.

    The source ensemble is left as it was: adapted branches are copies.

    Args:
        ens: the source ensemble.
        images: the clinic's images.
        calibration: the prevalence its fused probabilities are calibrated to (``source_calibration``).
        options: methods and settings (default: ``AdaptOptions()``).
        prior_ci: also bootstrap a 95% interval of the estimated prevalence.

    Returns:
        The ``Adapted`` ensemble and a record of what changed and what it expects.
    """
    from ensemble.engine import Ensemble
    from models.adapt import clone_branch, reestimate_bn, tent

    options = options or AdaptOptions()
    methods, pi_s = options.methods, calibration.effective_prior
    logger.info("scoring %d images with the source ensemble", len(images))
    P0 = member_proba(ens, images, options.batch_size)
    fused0 = ens.fuse(P0)
    before = estimate_prior(fused0, pi_s)
    logger.info("source ensemble on %d images: mean fused probability %.3f; estimated melanoma prevalence %s "
                "(its probabilities are calibrated to %s)", len(images), fused0.mean(), _pct(before.prior), _pct(pi_s))
    weighted = sorted(set(methods) & {"bn-balanced", "tent"})
    if weighted:  # their class-balancing weights rest on this estimate
        _require_supported(before, None, ",".join(weighted))
    # The posteriors at the estimated prevalence give each image its expected class-balancing weight.
    weights = balanced_weights(before.posteriors, before.prior)
    models, branches = list(ens.models), {}
    adapt_branches = bool(set(methods) & {"bn", "bn-balanced", "tent"})
    for j, (model, config) in enumerate(zip(ens.models, ens.configs) if adapt_branches else ()):
        model, change = clone_branch(model), {}
        if "bn" in methods or "bn-balanced" in methods:
            w = weights if "bn-balanced" in methods else None
            steps = reestimate_bn(model, config, images, w, options.bn_alpha, options.batch_size)
            change["batchnorm"] = {s.layer: {"mean_shift_sd": round(s.mean_shift_sd, 4),
                                            "log_var_ratio": round(s.log_var_ratio, 4)} for s in steps}
            logger.info("%s: BatchNorm statistics re-estimated (%s, alpha %.2f): mean shift %s source SDs",
                        config.view, "class-balanced" if w is not None else "plain", options.bn_alpha,
                        ", ".join(f"{s.layer} {s.mean_shift_sd:.2f}" for s in steps))
        if "tent" in methods:
            result = tent(model, config, images, weights, options.tent_steps, options.tent_lr, options.tent_batch,
                          options.seed)
            change["tent"] = {"steps": result.steps, "entropy_before": round(result.entropy_before, 4),
                              "entropy_after": round(result.entropy_after, 4),
                              "mean_proba_before": round(result.mean_before, 4),
                              "mean_proba_after": round(result.mean_after, 4)}
            logger.info("%s: TENT %d steps: mean prediction entropy %.3f -> %.3f (BatchNorm scale and offset only)",
                        config.view, result.steps, result.entropy_before, result.entropy_after)
        models[j], branches[config.view] = model, change
    adapted = Ensemble(ens.manifest, models, ens.configs, ens.fusion) if adapt_branches else ens
    P1 = member_proba(adapted, images, options.batch_size) if adapt_branches else P0
    fused1 = adapted.fuse(P1)
    after = estimate_prior(fused1, pi_s) if adapt_branches else before
    interval = list(prior_interval(fused1, pi_s)) if prior_ci else [math.nan, math.nan]
    if "prior" in methods:
        _require_supported(after, interval if prior_ci else None, "prior")
    offset = prior_offset(after.prior, pi_s) if "prior" in methods else 0.0
    threshold = shift_threshold(ens.threshold, offset)
    if offset:
        adapted = Ensemble(ens.manifest, models, ens.configs, ens.fusion.with_logit_offset(offset))
        adapted.threshold = threshold
    fused_new = adapted.fuse(P1)
    _require_spread(fused_new, methods)
    flagged0, flagged1 = float(np.mean(fused0 >= ens.threshold)), float(np.mean(fused_new >= threshold))
    record = {
        **options.used(),
        "prevalence": {
            "estimated": after.prior, "ci95": interval,
            "estimated_before_adaptation": before.prior,
            "source_calibrated_to": pi_s, "source_validation": calibration.validation_prior,
            "n_source_validation": calibration.n_validation,
            "rule": "Saerens-Latinne-Decaestecker EM on the fused probabilities, taken as calibrated at "
                    "source_calibrated_to (the prevalence that makes them calibrated in the large on the "
                    "source validation split)",
            "em_iterations": after.iterations, "em_converged": after.converged,
        },
        "logit_offset": offset,
        "threshold": {"source": ens.threshold, "adapted": threshold},
        "branches": branches,
        "class_balance_weights": {"effective_sample_size": round(effective_sample_size(weights), 1),
                                  "used": bool(set(methods) & {"bn-balanced", "tent"})},
        "expected": {"mean_fused_source": float(fused0.mean()), "mean_fused_adapted": float(fused_new.mean()),
                     "flagged_source": flagged0, "flagged_adapted": flagged1},
    }
    ci = f" (95% CI {_pct(interval[0])}-{_pct(interval[1])})" if prior_ci else ""
    logger.info("estimated melanoma prevalence of these images: %s%s", _pct(after.prior), ci)
    if prior_ci and interval[1] - interval[0] > 0.2:
        logger.warning("the prevalence estimate is imprecise (95%% CI %s-%s): the branches separate these images "
                       "poorly, so the recalibration may be far off; check it on labelled images of the clinic",
                       _pct(interval[0]), _pct(interval[1]))
    if offset:
        logger.info("fused log-odds shifted by %+.3f; threshold %.4f -> %.4f (the same operating point)", offset,
                    ens.threshold, threshold)
    logger.info("flagged as melanoma at the threshold: %s of these images (source ensemble: %s)", _pct(flagged1),
                _pct(flagged0))
    return Adapted(adapted, record, adapt_branches)
