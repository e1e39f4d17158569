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
from ensemble.metadata import describe_unreadable, unreadable_values
from ensemble.metrics import binary_report, roc_auc_ci
from ensemble.rundir import RunDir
from skinfusion.data.audit import ARTEFACTS, audit_images
from skinfusion.data.index import DX_TYPES, Record, write_skip_report
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split
from skinfusion.workflows.auditing import read_audit_flags
from skinfusion.workflows.coverage import scored_risk_coverage, write_risk_coverage
from skinfusion.workflows.overlap import run_dataset, warn_training_overlap
from skinfusion.workflows.report import write_curves, write_html, write_isic_csv
from skinfusion.workflows.subgroups import one_class_note, records_subgroups, write_subgroups_csv

logger = logging.getLogger(__name__)

#: Version of the ``metrics.json`` layout that ``Evaluator.evaluate`` builds (docs/cli.md: "metrics.json schema").
METRICS_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Scored:
    """What a run scored: the images that loaded, their member matrix ``P`` (n × views) and fused
    probabilities, the files skipped as ``(path, reason)``, the inference time and whether TTA was on.

    ``in_distribution_score`` (n,) is the OOD gate's score (``ensemble.ood``: the share of validation
    images at least as atypical, 1 = most typical, 0 = failed an image-level check; NaN for a bundle
    without a gate) and ``out_of_distribution`` (n,) its verdict (1.0, 0.0, or NaN when unknown);
    None when not scored."""

    records: list[Record]
    P: np.ndarray
    fused: np.ndarray
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tta: bool = False
    in_distribution_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None


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
        # Every AUC is bootstrapped n_boot times: on thousands of images this phase takes as long
        # as the scoring, so it reports its progress too.
        progress = _Steps(len(self.views) + 2 + (flags is not None), self.n_boot, len(y))
        members = {}
        for j, v in enumerate(self.views):
            members[v] = binary_report(y, P[:, j], self.branch_thresholds[v], n_boot=self.n_boot)
            progress.done(f"branch {v}")
        fused_report = binary_report(y, fused, self.threshold, n_boot=self.n_boot)
        progress.done("fused")
        per_source = {s: self._auc_row(y, P, fused, sources == s) for s in sorted(set(sources))}
        progress.done(f"AUC per source ({len(per_source)})")
        dx = np.array([r.dx_type for r in scored.records], dtype=object)
        # A dataset that records no dx_type gets {}: one "unknown" row would only repeat the total.
        per_dx_type = {} if (dx == "unknown").all() else {
            d: self._dx_row(y, P, fused, dx == d) for d in DX_TYPES if (dx == d).any()}
        per_subset = self._per_subset(y, P, fused, [r.image_id for r in scored.records], flags)
        if flags is not None:
            progress.done("AUC per artefact subset")
        return {
            "schema_version": METRICS_SCHEMA_VERSION,
            "run": info.run,
            "scope": info.scope,
            "method": info.method,
            "metadata": list(info.metadata),
            "n_images": int(len(y)),
            "n_skipped": len(scored.failures),
            "members": members,
            "fused": fused_report,
            "per_source": per_source,
            "per_dx_type": per_dx_type,
            "per_subset": per_subset,
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

    def _dx_row(self, y: np.ndarray, P: np.ndarray, fused: np.ndarray, m: np.ndarray) -> dict[str, Any]:
        """``_auc_row`` plus ``n_nevus``, the fused sensitivity and specificity at the threshold, and a
        ``note`` when one class is absent (a follow-up group is nevi only): its AUCs are then NaN."""
        mel, nev = fused[m & (y == 1)], fused[m & (y == 0)]
        return {**self._auc_row(y, P, fused, m), "n_nevus": len(nev),
                "fused_sensitivity": float((mel >= self.threshold).mean()) if len(mel) else math.nan,
                "fused_specificity": float((nev < self.threshold).mean()) if len(nev) else math.nan,
                "note": one_class_note(len(mel), len(nev))}

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


class _Steps:
    """Logs the metrics phase: one line when it starts, then one per finished step."""

    def __init__(self, n_steps: int, n_boot: int, n_images: int):
        self.n_steps, self.k, self.t0 = n_steps, 0, time.perf_counter()
        logger.info("computing metrics on %d images: %d steps, %d bootstrap resamples per AUC", n_images, n_steps, n_boot)

    def done(self, what: str) -> None:
        self.k += 1
        logger.info("metrics %d/%d: %s done (%.0fs)", self.k, self.n_steps, what, time.perf_counter() - self.t0)


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


SPLIT_SCOPES = {"test": "test split", "val": "validation split"}


def _run_split(run: Path, split: str, out_dir: str | None, data_root: str | None, manifest: Mapping[str, Any]) -> _Target:
    if split not in SPLIT_SCOPES:
        raise ValueError(f"--split {split}: choose one of {', '.join(SPLIT_SCOPES)}")
    assign, info = load_split(run)
    root = run_dataset(run, info, data_root)
    index = index_dataset(root)
    recorded, found = info.get("dataset_fingerprint"), index.fingerprint()
    if found != recorded:
        # The test split is a list of image ids: scored on other data, its "test" images may
        # have been trained on. Only the same images (ids, labels and file sizes) will do.
        if data_root is not None:
            raise ValueError(f"--data-root {root} does not hold the dataset {run} was split on "
                             f"({info.get('data_dir')}, fingerprint {recorded}; {root} has {found}); point "
                             f"--data-root at an unchanged copy of it")
        raise ValueError(f"{root} changed since {run} was split (fingerprint {found}, {run / 'split.json'} "
                         f"records {recorded}); its {SPLIT_SCOPES[split]} cannot be re-scored on changed data: restore the "
                         "folder, or give an unchanged copy with --data-root")
    if data_root is not None and Path(info.get("data_dir") or root).resolve() != root.resolve():
        logger.info("scoring the %s from %s (the run was split on %s, which has moved)", SPLIT_SCOPES[split], root,
                    info.get("data_dir"))
    records = [r for r in index.records if assign.get(r.image_id) == split]
    if not records:
        raise ValueError(f"{RunDir(run).splits}: none of the {len(index.records)} images of {root} is in its "
                         f"{SPLIT_SCOPES[split]}; the file may be damaged: restore it, or train a new run")
    if split == "val":
        # The validation images chose each branch's epoch and the thresholds (and fitted a stack
        # fusion): fine for comparing configurations, optimistic as a result.
        logger.warning("scoring the validation split: it chose the branches' epochs and the thresholds%s, so its "
                       "AUCs suit choosing between runs, not reporting one; report the test split",
                       " and fitted the fusion" if manifest.get("stack_fit", {}).get("on") == "validation" else "")
    out = Path(out_dir) if out_dir else (run if split == "test" else run / "eval-val")
    return _Target(records, index.missing_files, SPLIT_SCOPES[split], out)


def _other_folder(run: Path, data_dir: str, out_dir: str | None, data_root: str | None) -> _Target:
    index = index_dataset(data_dir)
    if index.class_problem():
        logger.warning("%s holds %s images only: its AUCs are undefined (written as null); only sensitivity or "
                       "specificity is measured", data_dir, "melanoma" if index.records[0].label else "nevus")
    warn_training_overlap(run, index, data_dir, data_root)
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
    if meta:
        sites = ens.known_sites
        for message in describe_unreadable(unreadable_values(list(meta.values()), ens.metadata_fields, sites), sites):
            logger.warning("metadata of the scored images: %s", message)
    kept, P_parts, fused_parts, failures, ood_parts = [], [], [], [], []
    t0, step = time.perf_counter(), max(1, len(by_path) // 10)
    for batch in ens.iter_files(list(by_path), batch_size=options.batch_size, workers=options.workers,
                                tta=options.tta, metadata=meta):
        before = len(kept) + len(failures)
        kept += [by_path[p] for p in batch.paths]
        P_parts.append(batch.P)
        fused_parts.append(batch.fused)
        ood_parts.append(batch.ood)
        failures += batch.failures
        for _path, reason in batch.failures:
            logger.warning("skipping %s", reason)
        done = len(kept) + len(failures)
        if done == len(by_path) or done // step != before // step:
            logger.info("scored %d/%d images (%.0fs)", done, len(by_path), time.perf_counter() - t0)
    P = np.concatenate(P_parts) if P_parts else np.zeros((0, len(ens.views)))
    fused = np.concatenate(fused_parts) if fused_parts else np.zeros(0)
    idx = np.concatenate([o.in_distribution_score for o in ood_parts]) if ood_parts else np.zeros(0)
    flag = np.concatenate([o.out_of_distribution for o in ood_parts]) if ood_parts else np.zeros(0)
    return Scored(kept, P, fused, failures, time.perf_counter() - t0, options.tta, idx, flag)


def _artefact_flags(records: Sequence[Record], options: EvaluateOptions) -> dict[str, set[str]] | None:
    if not options.audit:
        return None
    if options.audit_csv:
        return read_audit_flags(options.audit_csv)
    rows = audit_images(records, workers=options.workers)
    return {a: {row["image_id"] for row in rows if row[a]} for a in ARTEFACTS}


def evaluate(run_dir: str, data_dir: str | None = None, out_dir: str | None = None,
             options: EvaluateOptions = EvaluateOptions(), data_root: str | None = None,
             split: str = "test") -> dict[str, Any]:
    """Score the run's test split (or its validation split, or every image of ``data_dir``) and write the results.

    Writes ``metrics.json`` (see ``Evaluator``, plus the ``subgroups`` and ``risk_coverage``
    sections), ``predictions.csv``, ``subgroups.csv`` and ``skipped.csv``, and ``risk_coverage.csv``
    when the images carry an in-distribution score; with ``options.plots`` the ROC /
    precision-recall / reliability (and risk-coverage) PNGs and ``report.html``; with
    ``options.isic_csv`` the predictions in ISIC challenge format. With ``options.audit``, AUC
    is also reported on the artefact-free images and on each artefact subset (flags from
    ``options.audit_csv``, or detected on the scored images). With ``data_dir``, images that
    the run trained or validated on (same image id, or same file bytes) are counted in a warning.

    Args:
        run_dir: a run with a fused ensemble.
        data_dir: score every image of this labelled folder instead of the test split.
        out_dir: where to write (default: the run; ``RUN/eval-val`` for the validation split;
            ``RUN/eval-<folder>`` with ``data_dir``).
        options: see ``EvaluateOptions``.
        data_root: where the run's dataset is now, when it moved since the run was split
            (default: the ``data_dir`` its ``split.json`` recorded); it must hold the same images.
        split: the run's split to score without ``data_dir``: "test", or "val" (the images that
            chose epochs and thresholds: for comparing runs, per source, not for reporting).

    Returns:
        The metrics written to ``metrics.json``, plus ``out_dir``.

    Raises:
        FileNotFoundError: if the run, its bundle or split, the folder or the run's dataset is missing.
        ValueError: if the run's dataset (or ``data_root``) differs from the one it was split on,
            or the split lists no test image of it.
    """
    run = Path(run_dir)
    ens = load_ensemble(run)  # first: it names a missing run or bundle best
    target = (_run_split(run, split, out_dir, data_root, ens.manifest) if data_dir is None
              else _other_folder(run, data_dir, out_dir, data_root))
    target.out.mkdir(parents=True, exist_ok=True)
    scored = score_records(ens, target.records, options)
    write_skip_report(target.out / "skipped.csv", scored.failures + [
        (p, "listed in the labels but the file is missing") for p in target.missing])
    evaluator = Evaluator.for_ensemble(ens, options.n_boot)
    info = RunInfo(str(run.resolve()), target.scope, ens.manifest["method"], tuple(ens.metadata_fields))
    metrics = {**evaluator.evaluate(scored, info, _artefact_flags(scored.records, options)),
               "subgroups": records_subgroups(scored.records, scored.fused, options.n_boot),
               "risk_coverage": scored_risk_coverage(scored, evaluator.threshold, options.n_boot)}
    evaluator.write(target.out, metrics, scored)
    write_subgroups_csv(target.out / "subgroups.csv", metrics["subgroups"])
    pngs = write_risk_coverage(target.out, metrics["risk_coverage"], scored, options.plots)
    if options.isic_csv:
        write_isic_csv(options.isic_csv, [r.image_id for r in scored.records], scored.fused)
    if options.plots:
        logger.info("drawing the curves and report.html")
        y = np.array([r.label for r in scored.records], dtype=int)
        columns = {**{v: scored.P[:, j] for j, v in enumerate(evaluator.views)}, "fused": scored.fused}
        write_html(metrics, target.out, write_curves(y, columns, target.out, title=f"({target.scope})"[:60]) + pngs)
    return {**metrics, "out_dir": str(target.out)}
