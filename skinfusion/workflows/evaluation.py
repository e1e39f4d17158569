"""The evaluate workflow: the ``Evaluator`` (the metric set and the result files) and ``evaluate``,
which picks a run's test split or another folder, streams it through the ensemble and scores it."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from colorspaces.files import atomic_open, write_json_atomic
from ensemble.bundle import load_ensemble
from ensemble.engine import Ensemble
from ensemble.metrics import binary_report, roc_auc_ci
from skinfusion.data.audit import ARTEFACTS, audit_images
from skinfusion.data.index import Record, write_skip_report
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split
from skinfusion.workflows.auditing import read_audit_flags
from skinfusion.workflows.report import write_curves, write_html, write_isic_csv

logger = logging.getLogger(__name__)

#: Version of the ``metrics.json`` layout that ``Evaluator.evaluate`` builds (README: "metrics.json schema").
METRICS_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Scored:
    """What a run scored: the images that loaded, their member matrix ``P`` (n × views) and fused
    probabilities, the files skipped as ``(path, reason)``, the inference time and whether TTA was on."""

    records: list[Record]
    P: np.ndarray
    fused: np.ndarray
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tta: bool = False


@dataclass(frozen=True)
class RunInfo:
    """What ``metrics.json`` says about the scoring: the run, what was scored, the fusion method
    and the metadata fields the fusion used."""

    run: str
    scope: str
    method: str
    metadata: tuple[str, ...] = ()


class Evaluator:
    """Fixes the metric set and the result files of an evaluation.

    Nothing is tuned on the scored images: each branch is scored at its own validation
    threshold and the fusion at the manifest's.

    Args:
        views: the branch names, i.e. the columns of ``P``, in manifest order.
        threshold: the fused decision threshold, chosen on validation data.
        branch_thresholds: ``{view: threshold}`` chosen on validation data.
        n_boot: bootstrap resamples for every AUC 95% CI.

    Raises:
        ValueError: if ``n_boot`` < 1 or a view has no threshold.
    """

    def __init__(self, views: Sequence[str], threshold: float, branch_thresholds: Mapping[str, float],
                 n_boot: int = 1000):
        if n_boot < 1:
            raise ValueError(f"n_boot must be at least 1, got {n_boot}")
        missing = [v for v in views if v not in branch_thresholds]
        if missing:
            raise ValueError(f"no validation threshold for branch(es) {missing}; have {sorted(branch_thresholds)}")
        self.views = list(views)
        self.threshold = float(threshold)
        self.branch_thresholds = {v: float(branch_thresholds[v]) for v in self.views}
        self.n_boot = n_boot

    @classmethod
    def for_ensemble(cls, ens: Ensemble, n_boot: int = 1000) -> Evaluator:
        """The evaluator of a loaded bundle: its views and the thresholds its manifest recorded."""
        val = ens.manifest["validation_metrics"]
        return cls(ens.views, ens.threshold, {v: val[v]["threshold"] for v in ens.views}, n_boot)

    def evaluate(self, scored: Scored, info: RunInfo, flags: Mapping[str, set[str]] | None = None) -> dict[str, Any]:
        """The ``metrics.json`` document of one scoring (schema ``METRICS_SCHEMA_VERSION``).

        Args:
            scored: the scored images.
            info: the run and what was scored.
            flags: ``{artefact: image ids}`` for the per-artefact-subset AUCs (keys
                ``skinfusion.data.audit.ARTEFACTS``); ``None`` leaves ``per_subset`` empty.

        Returns:
            The metrics, keys in schema order; NaN marks an undefined value.
        """
        y = np.array([r.label for r in scored.records], dtype=int)
        P, fused = scored.P, scored.fused
        sources = np.array([r.source for r in scored.records], dtype=object)
        return {
            "schema_version": METRICS_SCHEMA_VERSION,
            "run": info.run,
            "scope": info.scope,
            "method": info.method,
            "metadata": list(info.metadata),
            "n_images": int(len(y)),
            "n_skipped": len(scored.failures),
            "members": {v: binary_report(y, P[:, j], self.branch_thresholds[v], n_boot=self.n_boot)
                        for j, v in enumerate(self.views)},
            "fused": binary_report(y, fused, self.threshold, n_boot=self.n_boot),
            "per_source": {s: self._auc_row(y, P, fused, sources == s) for s in sorted(set(sources))},
            "per_subset": self._per_subset(y, P, fused, [r.image_id for r in scored.records], flags),
            "inference_seconds": round(scored.seconds, 3),
            "tta": scored.tta,
        }

    def write(self, out_dir: str | Path, metrics: Mapping[str, Any], scored: Scored) -> None:
        """Write ``metrics.json`` and ``predictions.csv`` (``image_id,label,source,<views>,fused``).

        Args:
            out_dir: an existing folder.
            metrics: what ``evaluate`` returned for ``scored``.
            scored: the scored images.
        """
        out = Path(out_dir)
        write_json_atomic(out / "metrics.json", dict(metrics))
        with atomic_open(out / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["image_id", "label", "source", *self.views, "fused"])
            for r, prow, f in zip(scored.records, scored.P, scored.fused):
                w.writerow([r.image_id, r.label, r.source, *(f"{p:.6f}" for p in prow), f"{f:.6f}"])

    def _auc(self, y: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
        auc, lo, hi = roc_auc_ci(y, proba, n_boot=self.n_boot)
        return {"auc": auc, "auc_ci95": [lo, hi]}

    def _auc_row(self, y: np.ndarray, P: np.ndarray, fused: np.ndarray, m: np.ndarray) -> dict[str, Any]:
        """``{n, n_melanoma, <view>: {auc, auc_ci95}, fused: {...}}`` on the images of mask ``m``."""
        return {"n": int(m.sum()), "n_melanoma": int(y[m].sum()),
                **{v: self._auc(y[m], P[m, j]) for j, v in enumerate(self.views)},
                "fused": self._auc(y[m], fused[m])}

    def _per_subset(self, y, P, fused, image_ids: list[str], flags) -> dict[str, Any]:
        # A shortcut (the model reading the artefact, not the lesion) shows up as a gap between
        # the artefact-free images and each artefact's subset, and as lost specificity on its nevi.
        if flags is None:
            return {}
        flagged = set().union(*(flags[a] for a in ARTEFACTS))
        masks = {"artefact-free": [i not in flagged for i in image_ids],
                 **{a: [i in flags[a] for i in image_ids] for a in ARTEFACTS}}
        out = {}
        for name, mask in masks.items():
            m = np.array(mask, dtype=bool)
            nevi = fused[m & (y == 0)]
            out[name] = {**self._auc_row(y, P, fused, m),
                         "fused_mean_proba_nevus": float(nevi.mean()) if len(nevi) else math.nan,
                         "fused_specificity": float((nevi < self.threshold).mean()) if len(nevi) else math.nan}
        return out


@dataclass(frozen=True)
class EvaluateOptions:
    """How ``evaluate`` scores a run; the defaults are ``skinfusion evaluate``'s."""

    n_boot: int = dataclasses.field(default=1000, metadata={"help": "bootstrap resamples for the AUC 95% CI"})
    workers: int = dataclasses.field(default=2, metadata={"help": "image decoding threads"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per forward pass"})
    tta: bool = dataclasses.field(default=False, metadata={
        "help": "test-time averaging: score each image under its 8 rotations and flips and average (8x the compute)"})
    audit: bool = dataclasses.field(default=True, metadata={"help": "report AUC per artefact subset"})
    audit_csv: str | None = dataclasses.field(default=None, metadata={
        "help": "audit CSV whose artefact flags define the subsets (default: detect on the scored images)"})
    isic_csv: str | None = dataclasses.field(default=None, metadata={
        "help": "also write the fused predictions in ISIC challenge format (image,MEL,NV)"})
    plots: bool = dataclasses.field(default=True, metadata={
        "help": "draw the ROC/PR/reliability PNGs and report.html"})


@dataclass(frozen=True)
class _Target:
    records: list[Record]
    missing: list[str]
    scope: str
    out: Path


def _select_images(run: Path, data_dir: str | None, out_dir: str | None) -> _Target:
    """The run's test split, or every image of ``data_dir``, and where the results go."""
    if data_dir is None:
        assign, info = load_split(run)
        index = index_dataset(info["data_dir"])
        if index.fingerprint() != info.get("dataset_fingerprint"):
            raise ValueError(f"{info['data_dir']} changed since {run} was split; its test split cannot be re-scored")
        records = [r for r in index.records if assign.get(r.image_id) == "test"]
        return _Target(records, index.missing_files, "test split", Path(out_dir) if out_dir else run)
    index = index_dataset(data_dir)
    trained_on = load_split(run)[1].get("dataset_fingerprint") if (run / "splits.csv").is_file() else None
    if index.fingerprint() == trained_on:
        logger.warning("%s is the dataset this run trained on: its scores include training and "
                       "validation images and are optimistic; omit --data to score the test split", data_dir)
    folder = Path(data_dir).resolve()
    return _Target(index.records, index.missing_files, f"all images of {folder}",
                   Path(out_dir) if out_dir else run / f"eval-{folder.name}")


def score_records(ens: Ensemble, records: Sequence[Record], options: EvaluateOptions) -> Scored:
    """Stream the records' images through the ensemble in batches, skipping unreadable files.

    A metadata-fused bundle takes each image's metadata from its record.

    Args:
        ens: the loaded ensemble.
        records: the images to score.
        options: batch size, decoding threads and TTA.

    Returns:
        The records that loaded, their ``P`` and fused probabilities, the skipped files and the time.
    """
    by_path = {r.path: r for r in records}
    meta = {p: r.metadata() for p, r in by_path.items()} if ens.metadata_fields else None
    kept, P_parts, fused_parts, failures = [], [], [], []
    t0, step = time.perf_counter(), max(1, len(by_path) // 10)
    for batch in ens.iter_files(list(by_path), batch_size=options.batch_size, workers=options.workers,
                                tta=options.tta, metadata=meta):
        before = len(kept) + len(failures)
        kept += [by_path[p] for p in batch.paths]
        P_parts.append(batch.P)
        fused_parts.append(batch.fused)
        failures += batch.failures
        for _path, reason in batch.failures:
            logger.warning("skipping %s", reason)
        done = len(kept) + len(failures)
        if done == len(by_path) or done // step != before // step:
            logger.info("scored %d/%d images (%.0fs)", done, len(by_path), time.perf_counter() - t0)
    P = np.concatenate(P_parts) if P_parts else np.zeros((0, len(ens.views)))
    fused = np.concatenate(fused_parts) if fused_parts else np.zeros(0)
    return Scored(kept, P, fused, failures, time.perf_counter() - t0, options.tta)


def _artefact_flags(records: Sequence[Record], options: EvaluateOptions) -> dict[str, set[str]] | None:
    if not options.audit:
        return None
    if options.audit_csv:
        return read_audit_flags(options.audit_csv)
    rows = audit_images(records, workers=options.workers)
    return {a: {row["image_id"] for row in rows if row[a]} for a in ARTEFACTS}


def evaluate(run_dir: str, data_dir: str | None = None, out_dir: str | None = None,
             options: EvaluateOptions = EvaluateOptions()) -> dict[str, Any]:
    """Score the run's test split (or every image of ``data_dir``) and write the results.

    Writes ``metrics.json`` (see ``Evaluator``), ``predictions.csv`` and ``skipped.csv``; with
    ``options.plots`` the ROC / precision-recall / reliability PNGs and ``report.html``; with
    ``options.isic_csv`` the predictions in ISIC challenge format. With ``options.audit``, AUC
    is also reported on the artefact-free images and on each artefact subset (flags from
    ``options.audit_csv``, or detected on the scored images).

    Args:
        run_dir: a run with a fused ensemble.
        data_dir: score every image of this labelled folder instead of the test split.
        out_dir: where to write (default: the run, or ``RUN/eval-<folder>`` with ``data_dir``).
        options: see ``EvaluateOptions``.

    Returns:
        The metrics written to ``metrics.json``, plus ``out_dir``.

    Raises:
        FileNotFoundError: if the run, its bundle or split, or the folder is missing.
        ValueError: if the run's dataset changed since it was split.
    """
    run = Path(run_dir)
    ens = load_ensemble(run)
    target = _select_images(run, data_dir, out_dir)
    target.out.mkdir(parents=True, exist_ok=True)
    scored = score_records(ens, target.records, options)
    write_skip_report(target.out / "skipped.csv", scored.failures + [
        (p, "listed in the labels but the file is missing") for p in target.missing])
    evaluator = Evaluator.for_ensemble(ens, options.n_boot)
    info = RunInfo(str(run.resolve()), target.scope, ens.manifest["method"], tuple(ens.metadata_fields))
    metrics = evaluator.evaluate(scored, info, _artefact_flags(scored.records, options))
    evaluator.write(target.out, metrics, scored)
    if options.isic_csv:
        write_isic_csv(options.isic_csv, [r.image_id for r in scored.records], scored.fused)
    if options.plots:
        y = np.array([r.label for r in scored.records], dtype=int)
        columns = {**{v: scored.P[:, j] for j, v in enumerate(evaluator.views)}, "fused": scored.fused}
        write_html(metrics, target.out, write_curves(y, columns, target.out, title=f"({target.scope})"[:60]))
    return {**metrics, "out_dir": str(target.out)}
