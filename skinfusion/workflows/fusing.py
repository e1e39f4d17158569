"""The fuse workflow: fit a fusion on the branches' held-out probabilities and write ``RUN/ensemble/``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.bundle import check_branch, retrain_hint, save_ensemble, sha256_file
from ensemble.engine import Ensemble
from ensemble.fusion import fusion_class, make_fusion, methods_that
from ensemble.metadata import clean_age, clean_text, parse_fields
from ensemble.metrics import binary_report, choose_threshold, roc_auc_ci
from ensemble.ood import DEFAULT_PERCENTILE, MIN_IMAGES, OODGate, check_percentile, embedding_layer, fit_gate
from ensemble.rundir import HELD_OUT_FILE, SPLIT_FILE, RunDir, default_fuse_views, val_predictions
from models.store import load_branch
from skinfusion.data.cache import cached_images
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, recorded_data_dir
from skinfusion.workflows.labelprocess import fusion_selection
from skinfusion.workflows.oof import oof_member_proba
from skinfusion.workflows.runlock import run_lock

logger = logging.getLogger(__name__)

GATE_MAX_TRAIN = 2000  # training images the OOD gate is fitted on (a seeded subsample): enough for a 128-d covariance


def read_val_predictions(branch_dir: Path) -> dict[str, tuple[int, float]]:
    """A branch's validation predictions, ``{image_id: (label, melanoma_proba)}``.

    Raises:
        FileNotFoundError: if the branch has no ``val_predictions.csv``.
        ValueError: naming the file, if it is not UTF-8 CSV with those three columns.
    """
    path = val_predictions(branch_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; train this branch with `skinfusion train` first")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {r["image_id"]: (int(r["label"]), float(r["melanoma_proba"])) for r in csv.DictReader(fh)}
    except (KeyError, ValueError, TypeError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
        reason = f"lacks column {exc}" if isinstance(exc, KeyError) else exc
        raise ValueError(f"{path}: damaged ({reason}); {retrain_hint(branch_dir)}") from None


def check_same_split(run: Path, views: Sequence[str], metas: Sequence[dict[str, Any]],
                     preds: Sequence[dict[str, tuple[int, float]]]) -> None:
    """Refuse branches that were not trained on one split, the run's own.

    A branch records the SHA-256 of ``RUN/splits.csv`` it trained on (``split_sha256``;
    branches from before that record none); its validation images are those of
    ``val_predictions.csv``. A fusion fitted on part of one branch's validation images
    could sit on another branch's training images, and the test split may be one of them.

    Raises:
        ValueError: naming the branches whose split differs, or that were trained on another
            split than the run's ``splits.csv``.
    """
    split_file = run / SPLIT_FILE
    current = sha256_file(split_file) if split_file.is_file() else None
    stale = [v for v, m in zip(views, metas) if current and m.get("split_sha256") not in (None, current)]
    if stale:
        raise ValueError(f"{run}: branches {', '.join(stale)} were trained on another split than {split_file}; "
                         "retrain them in one run")
    groups: dict[tuple, list[str]] = {}
    for v, m, p in zip(views, metas, preds):
        groups.setdefault((m.get("split_sha256") or current, frozenset(p)), []).append(v)
    if len(groups) > 1:
        sides = " vs ".join(f"{'+'.join(vs)} ({len(key[1])} validation images)" for key, vs in groups.items())
        raise ValueError(f"{run}: branches were trained on different splits: {sides}; retrain them in one run")


def fuse_run(run_dir: str, method: str = "mean", views: Sequence[str] | None = None, folds: int = 0,
             jobs: int | None = None, metadata: Sequence[str] | str = (),
             ood_percentile: float | None = DEFAULT_PERCENTILE) -> dict[str, Any]:
    """Fit the fusion on the branches' validation probabilities and write ``RUN/ensemble/``.

    ``method`` names an estimator of ``ensemble.fusion.FUSION_METHODS``, and what it can do
    decides the rest. The decision threshold is chosen on validation data, on the fusion's
    ``held_out_proba_`` (the mean's own output; the stacker's cross-validated one, so the
    threshold is not chosen on the very predictions the stacker was fitted to).

    With ``folds`` K >= 2 (methods that ``supports_folds``), the fusion is instead fitted on
    out-of-fold probabilities of the training split (each branch trained K more times, see
    :mod:`skinfusion.workflows.oof`), and the threshold is chosen on the validation split, which
    the fusion then never saw. ``jobs`` parallel training processes per fold (default one per branch).

    With ``metadata`` fields (methods that ``supports_metadata``; "age", "sex", "site"), the
    fusion also takes each image's metadata from the run's dataset, and every later
    prediction needs it.

    The out-of-distribution gate (``ensemble.ood``) is fitted on the embeddings of up to
    ``GATE_MAX_TRAIN`` training images of the run's dataset, and its threshold set at the
    ``ood_percentile``-th percentile of the validation images' scores (None: no gate). Without
    the run's dataset at hand the bundle is written without a gate, with a warning.

    Raises:
        KeyError: if ``method`` is not a registered fusion method.
        FileNotFoundError: if a branch is missing.
        ValueError: if the method cannot use ``folds`` or ``metadata``, or the branches were
            trained on different splits or settings.
    """
    if folds and not fusion_class(method).supports_folds:
        raise ValueError(f"--folds only applies to --method {' or '.join(methods_that('supports_folds'))} "
                         f"(got --method {method})")
    metadata = parse_fields(metadata)
    make_fusion(method, metadata)  # refuse metadata the method cannot use before reading anything
    if folds and folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if ood_percentile is not None:
        ood_percentile = check_percentile(ood_percentile)
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such run directory; train its branches with `skinfusion train` first")
    views = default_fuse_views(run) if views is None else tuple(views)
    with run_lock(run, f"skinfusion fuse --method {method}"):
        return _fuse_locked(run, method, views, folds, jobs, metadata, ood_percentile)


def _fuse_locked(run: Path, method: str, views: Sequence[str], folds: int, jobs: int | None,
                 metadata: tuple[str, ...], ood_percentile: float | None) -> dict[str, Any]:
    branch_dirs = [RunDir(run).branch(v) for v in views]
    # Each branch is loaded as load_ensemble will load it, before minutes of fitting, not after.
    infos = [check_branch(b) for b in branch_dirs]
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
    check_same_split(run, views, [m for _, m in infos], preds)
    ids = sorted(preds[0])
    y = np.array([preds[0][i][0] for i in ids])
    P = np.array([[p[i][1] for p in preds] for i in ids])
    meta_of = _dataset_metadata(run, metadata) if metadata else {}
    M = [meta_of.get(i) for i in ids] if metadata else None
    fit_record: dict[str, Any] = {}
    if folds:
        oof_ids, y_oof, P_oof = oof_member_proba(run, views, folds, jobs=jobs)
        M_oof = [meta_of.get(i) for i in oof_ids] if metadata else None
        fusion = make_fusion(method, metadata).fit(P_oof, y_oof, M_oof)
        fused = fusion.predict_proba(P, M)[:, 1]  # validation: unseen by the fusion and by every branch
        val_only = make_fusion(method, metadata).fit(P, y, M).held_out_proba_
        fit_record = {"on": "train out-of-fold", "folds": folds, "n_images": len(oof_ids),
                      "oof_member_auc": {v: float(roc_auc_ci(y_oof, P_oof[:, j], n_boot=0)[0])
                                         for j, v in enumerate(views)},
                      "val_auc_oof_stacker": float(roc_auc_ci(y, fused, n_boot=0)[0]),
                      "val_auc_val_stacker_cv": float(roc_auc_ci(y, val_only, n_boot=0)[0])}
        logger.info("fusion fitted on %d out-of-fold training images: validation AUC %.4f "
                    "(fitted on validation itself, cross-validated: %.4f)", len(oof_ids),
                    fit_record["val_auc_oof_stacker"], fit_record["val_auc_val_stacker_cv"])
    else:
        fusion = make_fusion(method, metadata).fit(P, y, M)
        fused = fusion.held_out_proba_
        if fusion.supports_folds:
            fit_record = {"on": "validation", "folds": 0, "n_images": int(len(y))}
    # "stack_fit" (the manifest key readers know) records where a label-learning fusion was fitted.
    stack_fit = {"stack_fit": fit_record} if fit_record else {}
    sel = fusion_selection(run, ids, [c for c, _ in infos])  # --select-on: the images thresholds are chosen on
    threshold = choose_threshold(y[sel], fused[sel])
    val = {v: binary_report(y, P[:, j], choose_threshold(y[sel], P[sel, j])) for j, v in enumerate(views)}
    val["fused"] = binary_report(y, fused, threshold)
    weights = fusion.describe(views)
    gate = fit_run_gate(run, branch_dirs, ood_percentile) if ood_percentile is not None else None
    save_ensemble(RunDir(run).ensemble, fusion, method, threshold, branch_dirs, gate=gate, extra={
        "validation_metrics": val,
        "dataset_fingerprint": infos[0][1].get("dataset_fingerprint"),
        "split_seed": infos[0][1].get("split_seed"),
        "n_validation": int(len(y)),
        "fusion_weights": weights,
        **stack_fit,
    })
    logger.info("%s fusion weights %s", method, weights)
    ood = None if gate is None else {"threshold": gate.threshold, "percentile": gate.percentile,
                                     "n_fit": gate.n_fit, "n_val": len(gate.val_scores)}
    return {"method": method, "threshold": threshold, "validation": val, "ensemble_dir": str(RunDir(run).ensemble),
            "metadata": list(metadata), "fusion_weights": weights, "ood": ood, **stack_fit}




def held_out_ids(run: Path) -> set[str]:
    """Image ids kept out of the run's training and validation (``RUN/held_out_ids.txt``; empty if none)."""
    path = Path(run) / HELD_OUT_FILE
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def fit_run_gate(run: Path, branch_dirs: Sequence[Path], percentile: float, seed: int = 0,
                 workers: int = 2) -> OODGate | None:
    """Fit the OOD gate of a run: on a seeded subsample of its training images, thresholded on its validation images.

    The embeddings come from the same forward pass the bundle will run (``Ensemble.embed``).

    Returns:
        The gate, or None (with a warning saying why) when the run's dataset cannot be read,
        has changed since the split, or holds fewer than ``MIN_IMAGES`` training or validation images.
    """
    try:
        assign, info = load_split(run)
        data_dir = recorded_data_dir(run, info)
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"{data_dir}: the run's dataset (recorded in {run / 'split.json'}) is not there")
        index = index_dataset(data_dir, log=False)
    except (FileNotFoundError, ValueError) as exc:
        logger.warning("fusing without an OOD gate: its training images cannot be read (%s)", exc)
        return None
    if index.fingerprint() != info.get("dataset_fingerprint"):
        logger.warning("fusing without an OOD gate: %s changed since %s was split", data_dir, run)
        return None
    # Exactly the images the branches saw: a source held out of training (leave-one-source-out)
    # must not shape the gate, or the gate would call that source typical.
    held = held_out_ids(run)
    try:
        val_ids = set(read_val_predictions(Path(branch_dirs[0])))
    except (FileNotFoundError, ValueError):
        val_ids = None  # an adapted run keeps no val_predictions.csv: its split's validation images
    train = [r.path for r in index.records if assign.get(r.image_id) == "train" and r.image_id not in held]
    val = [r.path for r in index.records if assign.get(r.image_id) == "val" and r.image_id not in held
           and (val_ids is None or r.image_id in val_ids)]
    if min(len(train), len(val)) < MIN_IMAGES:
        logger.warning("fusing without an OOD gate: it needs %d training and validation images, the run has %d and %d",
                       MIN_IMAGES, len(train), len(val))
        return None
    if len(train) > GATE_MAX_TRAIN:
        keep = np.random.default_rng(seed).choice(len(train), GATE_MAX_TRAIN, replace=False)
        train = [train[i] for i in sorted(keep)]  # in dataset order: the cache key stays the same per seed
    models, configs = zip(*(load_branch(b)[:2] for b in branch_dirs))
    shape = {"image_size": configs[0].image_size, "load_size": configs[0].load_size, "threshold": 0.5}
    ens = Ensemble(shape, list(models), list(configs), fusion=None)  # only its forward pass is used
    logger.info("fitting the OOD gate on %d training images, thresholded on %d validation images", len(train), len(val))
    embeddings = []
    for paths, what in ((train, "OOD gate training images"), (val, "validation images")):
        # Same lists and size as training decoded (when the subsample is the whole split): the cache is reused.
        imgs, _, _ = cached_images(paths, configs[0].load_size, workers=workers, desc=what)
        embeddings.append(ens.embed(imgs))
    n_fit, n_val = len(embeddings[0][0]), len(embeddings[1][0])  # unreadable files were skipped
    if min(n_fit, n_val) < MIN_IMAGES:
        logger.warning("fusing without an OOD gate: only %d training and %d validation images could be read",
                       n_fit, n_val)
        return None
    gate = fit_gate(embeddings[0], embeddings[1], percentile, embedding_layer(models[0]))
    logger.info("OOD gate: threshold %.3f (%gth percentile of %d validation scores)", gate.threshold, percentile,
                len(gate.val_scores))
    return gate


def _dataset_metadata(run: Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """image_id → metadata dict for the run's dataset; logs how much of each field is known."""
    _, info = load_split(run)
    if not info.get("data_dir"):
        raise ValueError(f"{run / 'split.json'}: names no data folder, so the metadata cannot be read; "
                         "the run's split is damaged; start a new --run")
    records = index_dataset(info["data_dir"]).records
    known = {f: sum((clean_age(r.age) is not None) if f == "age" else bool(clean_text(getattr(r, f))) for r in records)
             for f in fields}
    logger.info("metadata known for %s of %d images", ", ".join(f"{f} {n}" for f, n in known.items()), len(records))
    if not any(known.values()):
        raise ValueError(f"{info['data_dir']}: no image has any of the metadata fields {list(fields)}; "
                         "metadata fusion needs age/sex/site columns in the dataset's metadata")
    return {r.image_id: r.metadata() for r in records}


