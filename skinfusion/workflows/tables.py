"""Plain-text tables of metrics for the command line."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from skinfusion.workflows.coverage import result_rows

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


def format_dx_type_table(per_dx_type: dict[str, dict], views: Sequence[str]) -> str:
    """A plain-text table of AUC per diagnosis-confirmation type (``metrics.json`` ``per_dx_type``), per
    branch and fused, with the fused sensitivity and specificity; a one-class row says why it has no AUC."""
    cols = [*views, "fused"]
    lines = [f"{'dx_type':16} {'n':>5} {'mel':>4} {'nev':>5} " + " ".join(f"{c:>6}" for c in cols)
             + f" {'sens':>6} {'spec':>6}"]
    for dx, row in per_dx_type.items():
        # NaN (one class) shows as "-", and the note at the end of the row says why.
        cells = [row[c]["auc"] for c in cols] + [row["fused_sensitivity"], row["fused_specificity"]]
        lines.append(f"{dx:16} {row['n']:5d} {row['n_melanoma']:4d} {row['n_nevus']:5d} "
                     + " ".join("     -" if v != v else f"{v:6.3f}" for v in cells) + (f"  {row['note']}" if row["note"] else ""))
    return "\n".join(lines)


def _auc_cells(row: dict) -> str:
    """``AUC [low, high]`` of a row, or its note (``too few melanomas (n=3)``) when it has no AUC."""
    if row["note"]:
        return row["note"]
    lo, hi = row["auc_ci95"]
    return f"{row['auc']:6.3f} {f'[{lo:.3f}, {hi:.3f}]':>15}"


def format_subgroup_table(report: dict) -> str:
    """A plain-text table of the fused AUC (95% CI) per age band, sex and site (``subgroup_report``)."""
    lines = [f"{'field':5} {'group':18} {'n':>5} {'mel':>4} {'nev':>5} {'AUC':>6} {'95% CI':>15}"]
    for field, rows in report["groups"].items():
        if not rows:
            lines.append(f"{field:5} {'(not recorded)':18}")
        for group, r in rows.items():
            lines.append(f"{field:5} {group:18} {r['n']:5d} {r['n_melanoma']:4d} {r['n_nevus']:5d} {_auc_cells(r)}")
    return "\n".join(lines)


def format_risk_coverage_table(result: dict) -> str:
    """A plain-text table of AUC (95% CI) and error rate against coverage, per ranking (``risk_coverage``)."""
    lines = [f"{'accepted by':16} {'coverage':>8} {'n':>5} {'mel':>4} {'error':>6}  {'AUC':>6} {'95% CI':>15}"]
    for ranking, r in result_rows(result):
        lines.append(f"{ranking:16} {r['coverage']:8.3f} {r['n']:5d} {r['n_melanoma']:4d} {r['error_rate']:6.3f}  "
                     f"{_auc_cells(r)}")
    lines.append("mean error rate over all coverages (AURC, lower = errors rejected first): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in result["aurc"].items()))
    return "\n".join(lines)
