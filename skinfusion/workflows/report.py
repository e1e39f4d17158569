"""Evaluation artefacts for people: ROC, precision-recall and reliability PNGs, report.html, ISIC CSV."""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

from colorspaces.files import atomic_open, atomic_path
from skinfusion.workflows.coverage import result_rows

CURVES = ("roc.png", "pr.png", "reliability.png")


def write_isic_csv(path: str | os.PathLike, image_ids: Sequence[str], melanoma_proba: Sequence[float]) -> None:
    """Write predictions in ISIC challenge format (``image,MEL,NV``), for ``isic-challenge-scoring``.

    ``NV`` is ``1 − MEL``: skinfusion scores melanoma against nevus only.
    """
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "MEL", "NV"])
        for image_id, p in zip(image_ids, melanoma_proba):
            w.writerow([image_id, f"{p:.6f}", f"{1.0 - p:.6f}"])


def write_curves(y: np.ndarray, columns: dict[str, np.ndarray], out_dir: str | os.PathLike, title: str = "") -> list[str]:
    """Draw ROC, precision-recall and reliability curves, one line per column, as PNGs.

    Args:
        y: binary labels (1 = melanoma).
        columns: name → melanoma probabilities (e.g. each branch and "fused").
        out_dir: where to write ``roc.png``, ``pr.png`` and ``reliability.png``.
        title: a suffix for the plot titles (e.g. the scored split).

    Returns:
        The file names written.
    """
    # Imported here, not at module level: matplotlib takes about half a second to import and only
    # plotting needs it (`evaluate --no-plots`, the ISIC CSV and report.html do not), and the
    # Agg backend must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return []
    styles = {"fused": {"color": "black", "lw": 2.2}}
    figs = {name: plt.subplots(figsize=(5.2, 5.0), dpi=110) for name in CURVES}
    for name, proba in columns.items():
        style = styles.get(name, {"lw": 1.3})
        fpr, tpr, _ = roc_curve(y, proba)
        figs["roc.png"][1].plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})", **style)
        prec, rec, _ = precision_recall_curve(y, proba)
        figs["pr.png"][1].plot(rec, prec, label=f"{name} (AP {average_precision_score(y, proba):.3f})", **style)
        frac, mean = calibration_curve(y, proba, n_bins=10, strategy="uniform")
        figs["reliability.png"][1].plot(mean, frac, marker="o", ms=3, label=name, **style)
    ax = figs["roc.png"][1]
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity", title=f"ROC {title}".strip())
    ax = figs["pr.png"][1]
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision-recall {title}".strip())
    ax = figs["reliability.png"][1]
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.set(xlabel="mean predicted melanoma probability", ylabel="observed melanoma rate", title=f"Reliability {title}".strip())
    for name, (fig, ax) in figs.items():
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if name != "pr.png" else "upper right", fontsize=8)
        fig.tight_layout()
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    return list(CURVES)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _auc_cells(row: dict[str, Any]) -> str:
    """AUC and CI cells, or one cell spanning both with the reason there is no AUC ("too few ...")."""
    if row["note"]:
        return f'<td colspan="2">{html.escape(row["note"])}</td>'
    return f"<td>{_fmt(row['auc'])}</td><td>{_fmt(row['auc_ci95'][0])}–{_fmt(row['auc_ci95'][1])}</td>"


def _subgroup_section(sub: dict[str, Any] | None) -> str:
    """The "AUC per subgroup" heading and table (``subgroups.subgroup_report``), or ``""``."""
    if not sub:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(field)}</th><td>{html.escape(group)}</td><td>{r['n']}</td><td>{r['n_melanoma']}</td>"
        f"<td>{r['n_nevus']}</td>{_auc_cells(r)}</tr>"
        for field, groups in sub["groups"].items() for group, r in groups.items())
    missing = [f for f, groups in sub["groups"].items() if not groups]
    note = f" Not recorded for these images: {html.escape(', '.join(missing))}." if missing else ""
    return (f"<h2>Fused AUC per subgroup</h2><p>No AUC is given for a group with fewer than {sub['min_per_class']} "
            f"melanomas or nevi: its CI would be too wide to read.{note}</p><table><tr><th>field</th><th>group</th>"
            f"<th>n</th><th>melanoma</th><th>nevus</th><th>AUC</th><th>95% CI</th></tr>{rows}</table>")


def _coverage_section(rc: dict[str, Any] | None) -> str:
    """The risk-coverage heading and table (``coverage.risk_coverage``), or ``""``."""
    if not rc:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(ranking)}</th><td>{r['coverage']:.3f}</td><td>{r['n']}</td><td>{r['n_melanoma']}</td>"
        f"<td>{_fmt(r['error_rate'])}</td>{_auc_cells(r)}</tr>"
        for ranking, r in result_rows(rc))
    gate = " gate_verdict: the images the bundle's out-of-distribution gate passed." if rc.get("gate") else ""
    return (f"<h2>Risk against coverage</h2><p>Images accepted most typical first (in-distribution score) or most "
            f"confident first (|p − {rc['threshold']:.3f}|); error = {html.escape(rc['risk'])}.{gate}</p>"
            f"<table><tr>"
            f"<th>accepted by</th><th>coverage</th><th>n</th><th>melanoma</th><th>error</th><th>AUC</th><th>95% CI</th>"
            f"</tr>{rows}</table>")


def _embedded(png: Path) -> str:
    """A PNG as an ``<img>`` inside the page (base64), at its own pixel width (the figures are drawn to be
    read at that size), shrunk only to fit a narrow window; it links to the PNG file beside the report."""
    data = png.read_bytes()
    # A PNG's IHDR chunk holds the width in bytes 16-19, big-endian.
    width = int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 640
    name = html.escape(png.name)
    return (f'<figure><a href="{name}"><img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" '
            f'alt="{name}" style="width:{width}px;max-width:100%"></a><figcaption>{name}</figcaption></figure>')


def write_html(metrics: dict[str, Any], out_dir: str | os.PathLike, images: Sequence[str]) -> Path:
    """Write a one-page ``report.html`` with the metric tables and the figures embedded (the page is self-contained).

    Args:
        metrics: what ``evaluate`` computed.
        out_dir: the folder holding the figures; ``report.html`` is written there.
        images: the figures' file names in ``out_dir``, embedded in this order at their own size.
    """
    out_dir = Path(out_dir)
    rows = {**metrics["members"], "fused": metrics["fused"]}
    head = ("<tr><th></th><th>AUC</th><th>95% CI</th><th>AP</th><th>bal. acc.</th><th>sens</th><th>spec</th>"
            "<th>sens@spec .80/.90/.95</th><th>spec@sens .80/.90/.95</th><th>Brier</th><th>ECE</th><th>TN/FP/FN/TP</th></tr>")
    body = []
    for name, r in rows.items():
        cm = r["confusion_matrix"]
        body.append(
            f"<tr><th>{html.escape(name)}</th><td>{_fmt(r['auc'])}</td><td>{_fmt(r['auc_ci95'][0])}–{_fmt(r['auc_ci95'][1])}</td>"
            f"<td>{_fmt(r['average_precision'])}</td><td>{_fmt(r['balanced_accuracy'])}</td><td>{_fmt(r['sensitivity'])}</td>"
            f"<td>{_fmt(r['specificity'])}</td><td>{' / '.join(_fmt(v) for v in r['sensitivity_at_specificity'].values())}</td>"
            f"<td>{' / '.join(_fmt(v) for v in r['specificity_at_sensitivity'].values())}</td><td>{_fmt(r['brier'])}</td>"
            f"<td>{_fmt(r['ece'])}</td><td>{cm['tn']}/{cm['fp']}/{cm['fn']}/{cm['tp']}</td></tr>"
        )
    cols = [*metrics["members"], "fused"]
    src_rows = "".join(
        f"<tr><th>{html.escape(s)}</th><td>{row['n']}</td><td>{row['n_melanoma']}</td>"
        + "".join(f"<td>{_fmt(row[c]['auc'])}</td>" for c in cols) + "</tr>"
        for s, row in metrics.get("per_source", {}).items()
    )
    dx_rows = "".join(
        f"<tr><th>{html.escape(d)}</th><td>{row['n']}</td><td>{row['n_melanoma']}</td>"
        + (f'<td colspan="{len(cols)}">{html.escape(row["note"])}</td>' if row["note"]
           else "".join(f"<td>{_fmt(row[c]['auc'])}</td>" for c in cols))
        + f"<td>{_fmt(row['fused_sensitivity'])}</td><td>{_fmt(row['fused_specificity'])}</td></tr>"
        for d, row in metrics.get("per_dx_type", {}).items()
    )
    subset_rows = "".join(
        f"<tr><th>{html.escape(s)}</th><td>{row['n']}</td><td>{row['n_melanoma']}</td>"
        + "".join(f"<td>{_fmt(row[c]['auc'])}</td>" for c in cols) + "</tr>"
        for s, row in metrics.get("per_subset", {}).items()
    )
    src_head = "<tr><th></th><th>n</th><th>melanoma</th>" + "".join(f"<th>{html.escape(c)} AUC</th>" for c in cols) + "</tr>"
    imgs = "".join(_embedded(out_dir / n) for n in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>skinfusion evaluation</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1240px}}table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th:first-child{{text-align:left}}
figure{{display:inline-block;margin:0 12px 16px 0;vertical-align:top}}figcaption{{font-size:.8em;color:#666}}</style></head><body>
<h1>skinfusion evaluation</h1>
<p>Run <code>{html.escape(metrics['run'])}</code>; scored: {html.escape(metrics['scope'])};
{metrics['n_images']} images ({metrics['fused']['n_melanoma']} melanoma), {metrics['n_skipped']} unreadable skipped;
{html.escape(metrics['method'])} fusion. Thresholds were chosen on validation data. Not a medical device.</p>
<h2>Per branch and fused</h2><table>{head}{''.join(body)}</table>
<h2>AUC per source</h2><table>{src_head}{src_rows}</table>
{f'<h2>AUC per diagnosis confirmation (dx_type)</h2><table>{src_head[:-5]}<th>fused sens</th><th>fused spec</th></tr>{dx_rows}</table>' if dx_rows else ''}
{f'<h2>AUC per artefact subset</h2><table>{src_head}{subset_rows}</table>' if subset_rows else ''}
{_subgroup_section(metrics.get("subgroups"))}
{_coverage_section(metrics.get("risk_coverage"))}
<h2>Figures</h2>{imgs}
<p>Full numbers: <a href="metrics.json">metrics.json</a>, per-image: <a href="predictions.csv">predictions.csv</a>.</p>
</body></html>
"""
    path = out_dir / "report.html"
    with atomic_open(path) as fh:
        fh.write(page)
    return path
