"""The evaluate workflow: score a run's test split (or another folder) and write metrics and predictions."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import atomic_open, write_json_atomic
from ensemble import load_ensemble
from ensemble.metrics import binary_report, roc_auc_ci
from skinfusion.data.index import index_dataset, write_skip_report
from skinfusion.data.splits import load_split
from skinfusion.workflows.auditing import read_audit_flags

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)


METRICS_SCHEMA_VERSION = 2


def evaluate_run(run_dir: str, data_dir: str | None = None, out_dir: str | None = None,
                 n_boot: int = 1000, workers: int = 2, batch_size: int = 64,
                 isic_csv: str | None = None, plots: bool = True,
                 audit_csv: str | None = None, audit: bool = True, tta: bool = False) -> dict[str, Any]:
    """Score the run's test split (or every image of ``data_dir``) and write metrics and predictions.

    Branch metrics use each branch's validation threshold and the fused metrics the
    manifest's threshold; nothing is tuned on the scored images. Writes ``metrics.json``
    (schema in the README), ``predictions.csv``, ``skipped.csv``, and with ``plots`` the
    ROC / precision-recall / reliability PNGs and ``report.html``; ``isic_csv`` also writes
    the predictions in ISIC challenge format. With ``audit``, AUC is also reported on the
    artefact-free images and on each artefact subset (flags from ``audit_csv``, or detected
    on the scored images), so that a shortcut shows up as a gap.

    Returns:
        The metrics dict also written to ``metrics.json``.
    """
    run = Path(run_dir)
    ens = load_ensemble(run)
    if data_dir is None:
        assign, info = load_split(run)
        index = index_dataset(info["data_dir"])
        if index.fingerprint() != info.get("dataset_fingerprint"):
            raise ValueError(f"{info['data_dir']} changed since {run} was split; its test split cannot be re-scored")
        records = [r for r in index.records if assign.get(r.image_id) == "test"]
        scope = "test split"
        out = Path(out_dir) if out_dir else run
    else:
        index = index_dataset(data_dir)
        logger.info("%s", index.summary())
        trained_on = load_split(run)[1].get("dataset_fingerprint") if (run / "splits.csv").is_file() else None
        if index.fingerprint() == trained_on:
            logger.warning("%s is the dataset this run trained on: its scores include training and "
                           "validation images and are optimistic; omit --data to score the test split", data_dir)
        records = index.records
        scope = f"all images of {Path(data_dir).resolve()}"
        out = Path(out_dir) if out_dir else run / f"eval-{Path(data_dir).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    by_path = {r.path: r for r in records}
    kept, P_parts, fused_parts, failures = [], [], [], []
    t0 = time.perf_counter()
    step = max(1, len(records) // 10)
    # A metadata-fused bundle takes each image's metadata from the scored dataset.
    meta = {p: r.metadata() for p, r in by_path.items()} if ens.metadata_fields else None
    for batch in ens.iter_files(list(by_path), batch_size=batch_size, workers=workers, tta=tta, metadata=meta):
        kept += [by_path[p] for p in batch.paths]
        P_parts.append(batch.P)
        fused_parts.append(batch.fused)
        failures += batch.failures
        for path, reason in batch.failures:
            logger.warning("skipping %s", reason)
        done = len(kept) + len(failures)
        if done == len(records) or done // step != (done - len(batch.paths) - len(batch.failures)) // step:
            logger.info("scored %d/%d images (%.0fs)", done, len(records), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    write_skip_report(out / "skipped.csv", failures + [(p, "listed in the labels but the file is missing") for p in index.missing_files])
    records = kept
    P = np.concatenate(P_parts) if P_parts else np.zeros((0, len(ens.views)))
    fused = np.concatenate(fused_parts) if fused_parts else np.zeros(0)
    y = np.array([r.label for r in records])
    branch_thr = {v: ens.manifest["validation_metrics"][v]["threshold"] for v in ens.views}
    members = {v: binary_report(y, P[:, j], branch_thr[v], n_boot=n_boot) for j, v in enumerate(ens.views)}
    fused_report = binary_report(y, fused, ens.threshold, n_boot=n_boot)
    per_source = {}
    for source in sorted({r.source for r in records}):
        m = np.array([r.source == source for r in records])
        per_source[source] = {
            "n": int(m.sum()), "n_melanoma": int(y[m].sum()),
            **{v: _auc_block(y[m], P[m, j], n_boot) for j, v in enumerate(ens.views)},
            "fused": _auc_block(y[m], fused[m], n_boot),
        }
    per_subset = {}
    if audit:
        if audit_csv:
            flags = read_audit_flags(audit_csv)
        else:
            from skinfusion.data.audit import audit_images

            rows = audit_images(records, workers=workers)
            flags = {a: {row["image_id"] for row in rows if row[a]} for a in ("colour_disc", "ink")}
        flagged = flags["colour_disc"] | flags["ink"]
        masks = {"artefact-free": [r.image_id not in flagged for r in records],
                 "colour_disc": [r.image_id in flags["colour_disc"] for r in records],
                 "ink": [r.image_id in flags["ink"] for r in records]}
        for name, mask in masks.items():
            m = np.array(mask, dtype=bool)
            per_subset[name] = {
                "n": int(m.sum()), "n_melanoma": int(y[m].sum()),
                **{v: _auc_block(y[m], P[m, j], n_boot) for j, v in enumerate(ens.views)},
                "fused": _auc_block(y[m], fused[m], n_boot),
                "fused_mean_proba_nevus": float(fused[m & (y == 0)].mean()) if (m & (y == 0)).any() else math.nan,
                "fused_specificity": float((fused[m & (y == 0)] < ens.threshold).mean()) if (m & (y == 0)).any() else math.nan,
            }
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "run": str(run.resolve()),
        "scope": scope,
        "method": ens.manifest["method"],
        "metadata": list(ens.metadata_fields),
        "n_images": int(len(y)),
        "n_skipped": len(failures),
        "members": members,
        "fused": fused_report,
        "per_source": per_source,
        "per_subset": per_subset,
        "inference_seconds": round(seconds, 3),
        "tta": tta,
    }
    write_json_atomic(out / "metrics.json", metrics)
    with atomic_open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label", "source", *ens.views, "fused"])
        for r, prow, f in zip(records, P, fused):
            w.writerow([r.image_id, r.label, r.source, *(f"{p:.6f}" for p in prow), f"{f:.6f}"])
    if isic_csv:
        from skinfusion.workflows.report import write_isic_csv

        write_isic_csv(isic_csv, [r.image_id for r in records], fused)
    if plots:
        from skinfusion.workflows.report import write_curves, write_html

        images = write_curves(y, {**{v: P[:, j] for j, v in enumerate(ens.views)}, "fused": fused}, out, title=f"({scope})"[:60])
        write_html(metrics, out, images)
    metrics["out_dir"] = str(out)
    return metrics


def _auc_block(y, proba, n_boot) -> dict[str, Any]:
    auc, lo, hi = roc_auc_ci(y, proba, n_boot=n_boot)
    return {"auc": auc, "auc_ci95": [lo, hi]}


