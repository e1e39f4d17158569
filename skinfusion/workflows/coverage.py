"""Risk–coverage: how the AUC and the error rate improve when the least typical images are set aside.

A bundle that scores how typical (in-distribution) an image is lets a deployment refuse the
images it is least sure to handle and send them to a person. Sorting the images by that score and
keeping the top share (the coverage) shows what the refusal buys; the same curve for plain
confidence (distance of the fused probability from the threshold) shows whether the
in-distribution score selects better than the probability itself already could.

Risk here is the **error rate at the manifest threshold** (1 − accuracy) of the accepted images;
the AUC of the accepted images is reported alongside it. Confidence rejection removes exactly the
images nearest the threshold, so it is a strong baseline on error rate by construction; an
in-distribution score earns its keep by catching confidently wrong images, which confidence cannot.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import atomic_open, atomic_path
from skinfusion.workflows.subgroups import MIN_PER_CLASS, auc_row

logger = logging.getLogger(__name__)

COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
#: The two ways of choosing which images to keep, best kept first.
RANKINGS = ("in_distribution", "confidence")
RISK = "error rate: 1 - accuracy of the accepted images at the manifest threshold"
RISK_COVERAGE_COLUMNS = ("ranking", "coverage", "n", "n_melanoma", "n_nevus", "auc", "auc_ci95_low", "auc_ci95_high",
                         "error_rate", "note")
PNG = "risk_coverage.png"


def accept_order(score: Sequence[float], seed: int = 0) -> np.ndarray:
    """Image indices from first to last accepted: ``score`` descending, NaN last, ties in a seeded random order.

    Ties are shuffled rather than kept in input order: records often come sorted by class or
    source, and an input-order tie-break would then select by label.
    """
    score = np.asarray(score, dtype=np.float64)
    missing = np.isnan(score)
    key = np.where(missing, -np.inf, score)
    tie = np.random.default_rng(seed).permutation(len(score))
    return np.lexsort((tie, missing, -key))  # the last key sorts first


def _accepted(n: int, coverage: float) -> int:
    """How many of ``n`` images a coverage keeps: the nearest whole number, at least one."""
    return min(n, max(1, math.floor(coverage * n + 0.5)))


def coverage_curve(y: np.ndarray, proba: np.ndarray, order: np.ndarray, threshold: float,
                   coverages: Sequence[float], n_boot: int, minimum: int) -> list[dict[str, Any]]:
    """One row per coverage: ``{coverage, n, n_melanoma, n_nevus, auc, auc_ci95, note, error_rate}`` of
    the images ``order`` accepts first."""
    wrong = (proba >= threshold).astype(int) != y
    rows = []
    for c in coverages:
        idx = order[:_accepted(len(y), c)]
        rows.append({"coverage": float(c), **auc_row(y[idx], proba[idx], n_boot, minimum),
                     "error_rate": float(wrong[idx].mean()) if len(idx) else math.nan})
    return rows


def risk_curve(y: np.ndarray, proba: np.ndarray, order: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, error rate)`` at every number of accepted images 1..n, for the plot and AURC."""
    wrong = ((proba >= threshold).astype(int) != y)[order]
    k = np.arange(1, len(y) + 1)
    return k / len(y), np.cumsum(wrong) / k


def risk_coverage(y: Sequence[int], proba: Sequence[float], score: Sequence[float], threshold: float,
                  coverages: Sequence[float] = COVERAGES, n_boot: int = 1000, minimum: int = MIN_PER_CLASS,
                  seed: int = 0) -> dict[str, Any]:
    """AUC (95% bootstrap CI) and error rate of the images accepted at each coverage, two ways.

    Args:
        y: labels, 1 = melanoma.
        proba: fused melanoma probabilities.
        score: in-distribution score per image, higher = more typical; NaN = unscored, accepted last.
        threshold: the manifest's fused decision threshold.
        coverages: shares of the images to accept, each in (0, 1].
        n_boot: bootstrap resamples per AUC.
        minimum: fewest melanomas and nevi an accepted set needs for its AUC to be reported.
        seed: for the tie-break order.

    Returns:
        ``{threshold, risk, n_score_missing, curves: {"in_distribution" | "confidence": [row, ...]},
        aurc: {...}}``: rows as ``coverage_curve``; ``aurc`` is the mean error rate over every
        coverage (area under the risk–coverage curve, lower = the ranking rejects errors first).

    Raises:
        ValueError: if the arrays differ in length or a coverage is outside (0, 1].
    """
    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if not len(y) == len(proba) == len(score):
        raise ValueError(f"risk_coverage: {len(y)} labels, {len(proba)} probabilities, {len(score)} scores")
    bad = [c for c in coverages if not 0.0 < c <= 1.0]
    if bad:
        raise ValueError(f"coverages must be in (0, 1], got {bad}")
    orders = {"in_distribution": accept_order(score, seed),
              "confidence": accept_order(np.abs(proba - threshold), seed)}
    curves = {name: coverage_curve(y, proba, o, threshold, coverages, n_boot, minimum) for name, o in orders.items()}
    aurc = {name: float(risk_curve(y, proba, o, threshold)[1].mean()) if len(y) else math.nan
            for name, o in orders.items()}
    return {"threshold": float(threshold), "risk": RISK, "n_score_missing": int(np.isnan(score).sum()),
            "curves": curves, "aurc": aurc}


def gate_row(y: Sequence[int], proba: Sequence[float], flagged: Sequence[float], threshold: float, n_boot: int,
             minimum: int = MIN_PER_CLASS) -> dict[str, Any] | None:
    """Where the bundle's own out-of-distribution verdict sits on the curve: the row of the images it
    passed (``flagged`` 0), with ``coverage`` their share; ``None`` when no image has a verdict (NaN).

    Raises:
        ValueError: if ``flagged`` and ``y`` differ in length.
    """
    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=np.float64).reshape(-1)
    if len(flagged) != len(y):
        raise ValueError(f"gate_row: {len(y)} labels, {len(flagged)} verdicts")
    if not len(y) or np.isnan(flagged).all():
        return None
    kept = flagged == 0.0  # NaN (no verdict) is not a pass
    wrong = (proba[kept] >= threshold).astype(int) != y[kept]
    return {"coverage": float(kept.mean()), **auc_row(y[kept], proba[kept], n_boot, minimum),
            "error_rate": float(wrong.mean()) if kept.any() else math.nan}


def result_rows(result: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(ranking, row)`` for every row of a ``scored_risk_coverage`` result, the gate's verdict last."""
    rows = [(name, r) for name, curve in result["curves"].items() for r in curve]
    return rows + ([("gate_verdict", result["gate"])] if result.get("gate") else [])


def scored_risk_coverage(scored: Any, threshold: float, n_boot: int) -> dict[str, Any] | None:
    """``risk_coverage`` of a scoring (an evaluation ``Scored``) plus ``gate``, the row of the images
    the bundle's gate passed (``gate_row``); ``None`` when the images carry no in-distribution
    score: a bundle from before the score existed (``None``) or one fused without a gate (all NaN)."""
    score = getattr(scored, "in_distribution_score", None)
    if score is not None and len(score) and np.isnan(np.asarray(score, dtype=np.float64)).all():
        score = None  # a bundle without a gate scores every image NaN: ranking on it would be a coin toss
    if score is None:
        logger.info("risk-coverage skipped: the bundle gives no in-distribution score for the scored images")
        return None
    t0, y = time.perf_counter(), np.array([r.label for r in scored.records], dtype=int)
    out = risk_coverage(y, scored.fused, score, threshold, n_boot=n_boot)
    flagged = getattr(scored, "out_of_distribution", None)
    out["gate"] = None if flagged is None else gate_row(y, scored.fused, flagged, threshold, n_boot)
    logger.info("risk-coverage at %d coverages, two rankings (%.0fs)", len(COVERAGES), time.perf_counter() - t0)
    if out["n_score_missing"]:
        logger.warning("risk-coverage: %d of %d images have no in-distribution score; they are accepted last",
                       out["n_score_missing"], len(y))
    return out


def _num(v: float) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.4f}"


def write_risk_coverage_csv(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Write ``risk_coverage``'s rows as CSV (``RISK_COVERAGE_COLUMNS``); an unreported AUC is an empty cell."""
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(RISK_COVERAGE_COLUMNS)
        for ranking, r in result_rows(result):
            w.writerow([ranking, f"{r['coverage']:.3f}", r["n"], r["n_melanoma"], r["n_nevus"], _num(r["auc"]),
                        _num(r["auc_ci95"][0]), _num(r["auc_ci95"][1]), _num(r["error_rate"]), r["note"]])


def write_risk_coverage_png(path: str | os.PathLike, result: Mapping[str, Any], y: Sequence[int],
                            proba: Sequence[float], score: Sequence[float]) -> None:
    """Draw AUC (with 95% CI bars) and error rate against coverage, one line per ranking."""
    # Imported here, as in report.py: only plotting needs matplotlib, and Agg must be chosen
    # before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    t = result["threshold"]
    orders = {"in_distribution": accept_order(score), "confidence": accept_order(np.abs(proba - t))}
    styles = {"in_distribution": {"color": "black", "lw": 2.0, "label": "in-distribution score"},
              "confidence": {"color": "tab:orange", "lw": 1.4, "ls": "--", "label": "confidence |p − threshold|"}}
    fig, (ax_auc, ax_risk) = plt.subplots(1, 2, figsize=(10.0, 4.4), dpi=110)
    low = min(r["coverage"] for rows in result["curves"].values() for r in rows)
    for name, rows in result["curves"].items():
        cov = np.array([r["coverage"] for r in rows])
        auc = np.array([r["auc"] for r in rows], dtype=np.float64)
        ci = np.array([r["auc_ci95"] for r in rows], dtype=np.float64)
        ok = ~np.isnan(auc)  # too few of a class: no point rather than a number
        yerr = np.nan_to_num(np.abs(ci[ok].T - auc[ok]))  # a CI the bootstrap could not give: no bar
        ax_auc.errorbar(cov[ok], auc[ok], yerr=yerr, marker="o", ms=4, capsize=3, **styles[name])
        if len(y):
            c, risk = risk_curve(y, proba, orders[name], t)
            keep = c >= low - 0.05
            ax_risk.plot(c[keep], risk[keep], **styles[name])
        ax_risk.plot(cov, [r["error_rate"] for r in rows], ls="none", marker="o", ms=4, color=styles[name]["color"])
    gate = result.get("gate")
    if gate:  # where the bundle's own verdict (pass / flag) sits on the curves
        style = {"ls": "none", "marker": "*", "ms": 11, "color": "tab:blue", "label": "the gate's own verdict"}
        if not math.isnan(gate["auc"]):
            ax_auc.plot([gate["coverage"]], [gate["auc"]], **style)
        ax_risk.plot([gate["coverage"]], [gate["error_rate"]], **style)
        low = min(low, gate["coverage"])
    ax_auc.set(xlabel="coverage (share of images accepted)", ylabel="ROC AUC of the accepted images",
               title="AUC against coverage")
    ax_risk.set(xlabel="coverage (share of images accepted)", ylabel=f"error rate at threshold {t:.3f}",
                title="Selective risk (1 − accuracy; lower is better)")
    for ax in (ax_auc, ax_risk):
        ax.set_xlim(low - 0.05, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_risk_coverage(out_dir: str | os.PathLike, result: Mapping[str, Any] | None, scored: Any,
                        plots: bool) -> list[str]:
    """Write ``risk_coverage.csv`` and, with ``plots``, ``risk_coverage.png`` for a scoring.

    Returns:
        The PNG names written (``[]`` without a result or plots), for report.html.
    """
    if result is None:
        return []
    out = Path(out_dir)
    write_risk_coverage_csv(out / "risk_coverage.csv", result)
    if not plots:
        return []
    y = [r.label for r in scored.records]
    write_risk_coverage_png(out / PNG, result, y, scored.fused, scored.in_distribution_score)
    return [PNG]
