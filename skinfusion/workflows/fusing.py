"""The fuse workflow: fit a fusion on the branches' held-out probabilities and write ``RUN/ensemble/``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces import VIEWS
from ensemble import make_fusion, save_ensemble
from ensemble.metadata import clean_age, clean_text, parse_fields
from ensemble.metrics import binary_report, choose_threshold, roc_auc_ci
from models.store import read_branch_info
from skinfusion.data.index import index_dataset
from skinfusion.data.splits import load_split
from skinfusion.workflows.oof import oof_member_proba

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)


def read_val_predictions(branch_dir: Path) -> dict[str, tuple[int, float]]:
    path = branch_dir / "val_predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; train this branch with `skinfusion train` first")
    with open(path, newline="") as fh:
        return {r["image_id"]: (int(r["label"]), float(r["melanoma_proba"])) for r in csv.DictReader(fh)}


def fuse_run(run_dir: str, method: str = "mean", views: Sequence[str] = tuple(VIEWS), folds: int = 0,
             jobs: int | None = None, metadata: Sequence[str] | str = ()) -> dict[str, Any]:
    """Fit the fusion on the branches' validation probabilities and write ``RUN/ensemble/``.

    The decision threshold is chosen on validation data: on the fused probabilities for
    ``mean``, and on the stacker's out-of-fold probabilities for ``stack`` (so the threshold
    is not chosen on the very predictions the stacker was fitted to).

    With ``folds`` K >= 2 (``stack`` only), the stacker is instead fitted on out-of-fold
    probabilities of the training split (each branch trained K more times, see
    :mod:`skinfusion.workflows.oof`), and the threshold is chosen on the validation split, which the
    stacker then never saw. ``jobs`` parallel training processes per fold (default one per branch).

    With ``metadata`` fields (``stack`` only; "age", "sex", "site"), the stacker also takes
    each image's metadata from the run's dataset, and every later prediction needs it.

    Raises:
        FileNotFoundError: if a branch is missing.
        ValueError: if branches were trained on different splits or settings.
    """
    if folds and method != "stack":
        raise ValueError(f"--folds only applies to --method stack (got --method {method})")
    metadata = parse_fields(metadata)
    make_fusion(method, metadata)  # refuse metadata with mean before reading anything
    if folds and folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    run = Path(run_dir)
    branch_dirs = [run / "branches" / v for v in views]
    infos = [read_branch_info(b) for b in branch_dirs]
    for bdir, (config, _) in zip(branch_dirs, infos):
        if config.view != bdir.name:
            raise ValueError(f"{bdir}: holds a {config.view!r} branch, not {bdir.name!r}; refusing to fuse it")
    for key in ("dataset_fingerprint", "split_seed"):
        values = {m.get(key) for _, m in infos}
        if len(values) != 1:
            raise ValueError(f"{run}: branches disagree on {key} ({values}); retrain them in one run")
    sizes = {(c.image_size, c.load_size, c.crop_stride) for c, _ in infos}
    if len(sizes) != 1:
        raise ValueError(f"{run}: branches were trained at different image sizes or crop settings "
                         f"(image_size, load_size, crop_stride) = {sorted(sizes)}; retrain them alike")
    preds = [read_val_predictions(b) for b in branch_dirs]
    ids = sorted(set.intersection(*(set(p) for p in preds)))
    if len(ids) != len(preds[0]):
        logger.warning("branches share %d of %d validation images; fusing on the shared ones", len(ids), len(preds[0]))
    y = np.array([preds[0][i][0] for i in ids])
    P = np.array([[p[i][1] for p in preds] for i in ids])
    meta_of = _dataset_metadata(run, metadata) if metadata else {}
    M = [meta_of.get(i) for i in ids] if metadata else None
    stack_fit: dict[str, Any] = {}
    if folds:
        oof_ids, y_oof, P_oof = oof_member_proba(run, views, folds, jobs=jobs)
        M_oof = [meta_of.get(i) for i in oof_ids] if metadata else None
        fusion = make_fusion(method, metadata).fit(P_oof, y_oof, M_oof)
        fused = fusion.predict_proba(P, M)[:, 1]  # validation: unseen by the stacker and by every branch
        val_only = make_fusion(method, metadata).fit(P, y, M).oof_proba_
        stack_fit = {"stack_fit": {"on": "train out-of-fold", "folds": folds, "n_images": len(oof_ids),
                                   "oof_member_auc": {v: float(roc_auc_ci(y_oof, P_oof[:, j], n_boot=0)[0])
                                                      for j, v in enumerate(views)},
                                   "val_auc_oof_stacker": float(roc_auc_ci(y, fused, n_boot=0)[0]),
                                   "val_auc_val_stacker_cv": float(roc_auc_ci(y, val_only, n_boot=0)[0])}}
        logger.info("stacker fitted on %d out-of-fold training images: validation AUC %.4f "
                    "(stacker fitted on validation itself, cross-validated: %.4f)", len(oof_ids),
                    stack_fit["stack_fit"]["val_auc_oof_stacker"], stack_fit["stack_fit"]["val_auc_val_stacker_cv"])
    else:
        fusion = make_fusion(method, metadata).fit(P, y, M) if metadata else make_fusion(method).fit(P, y)
        fused = fusion.oof_proba_ if method == "stack" else fusion.predict_proba(P)[:, 1]
        if method == "stack":
            stack_fit = {"stack_fit": {"on": "validation", "folds": 0, "n_images": int(len(y))}}
    threshold = choose_threshold(y, fused)
    val = {v: binary_report(y, P[:, j], choose_threshold(y, P[:, j])) for j, v in enumerate(views)}
    val["fused"] = binary_report(y, fused, threshold)
    save_ensemble(run / "ensemble", fusion, method, threshold, branch_dirs, extra={
        "validation_metrics": val,
        "dataset_fingerprint": infos[0][1].get("dataset_fingerprint"),
        "split_seed": infos[0][1].get("split_seed"),
        "n_validation": int(len(y)),
        **stack_fit,
    })
    if method == "stack":
        logger.info("stacker log-odds weights %s", fusion.weights(views))
    return {"method": method, "threshold": threshold, "validation": val, "ensemble_dir": str(run / "ensemble"),
            "metadata": list(metadata), **stack_fit}


def _dataset_metadata(run: Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """image_id → metadata dict for the run's dataset; logs how much of each field is known."""
    _, info = load_split(run)
    records = index_dataset(info["data_dir"]).records
    known = {f: sum((clean_age(r.age) is not None) if f == "age" else bool(clean_text(getattr(r, f))) for r in records)
             for f in fields}
    logger.info("metadata known for %s of %d images", ", ".join(f"{f} {n}" for f, n in known.items()), len(records))
    if not any(known.values()):
        raise ValueError(f"{info['data_dir']}: no image has any of the metadata fields {list(fields)}; "
                         "metadata fusion needs age/sex/site columns in the dataset's metadata")
    return {r.image_id: r.metadata() for r in records}


