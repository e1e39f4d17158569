"""Plain-text tables of metrics for the command line."""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger(__name__)


def format_table(reports: dict[str, dict]) -> str:
    """A plain-text table of AUC (95% CI), balanced accuracy, sensitivity and specificity per row."""
    lines = [f"{'':8} {'AUC':>6} {'95% CI':>15} {'bal.acc':>8} {'sens':>6} {'spec':>6} {'thr':>6} {'n':>6}"]
    for name, r in reports.items():
        lo, hi = r["auc_ci95"]
        lines.append(
            f"{name:8} {r['auc']:6.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r['balanced_accuracy']:8.3f} "
            f"{r['sensitivity']:6.3f} {r['specificity']:6.3f} {r['threshold']:6.3f} {r['n']:6d}"
        )
    return "\n".join(lines)


def format_source_table(per_source: dict[str, dict], views: Sequence[str], header: str = "source") -> str:
    """A plain-text table of AUC per row (a source, or an artefact subset with ``header="subset"``),
    per branch and fused."""
    cols = [*views, "fused"]
    lines = [f"{header:16} {'n':>5} {'mel':>4} " + " ".join(f"{c:>6}" for c in cols)]
    for source, row in per_source.items():
        aucs = " ".join(f"{row[c]['auc']:6.3f}" for c in cols)
        lines.append(f"{source:16} {row['n']:5d} {row['n_melanoma']:4d} {aucs}")
    return "\n".join(lines)
