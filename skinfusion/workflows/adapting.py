"""The adapt workflow: read a clinic's unlabelled images, adapt a run's ensemble to them, write a new run.

The adaptation itself (methods, settings, ``adapt_ensemble``) is ``skinfusion.workflows.adaptation``;
this module is what surrounds it on disk: the image list, the minimum count, the output folder
and the files of the adapted run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces import ImageError
from colorspaces.files import write_json_atomic
from colorspaces.image import IMAGE_SUFFIXES
from colorspaces.pipeline import Preprocess, prepare_image
from ensemble.bundle import load_ensemble, save_ensemble, sha256_file
from ensemble.rundir import MANIFEST_FILE, SPLIT_FILE, SPLIT_INFO_FILE, RunDir
from models.store import CONFIG_FILE, METADATA_FILE, MODEL_FILE, save_branch
from skinfusion.data.index import write_skip_report
from skinfusion.workflows.adaptation import (
    MIN_IMAGES,
    Adapted,
    AdaptOptions,
    adapt_ensemble,
    source_calibration,
)
from skinfusion.workflows.fusing import fit_run_gate
from skinfusion.workflows.predicting import input_paths
from skinfusion.workflows.runlock import run_lock

logger = logging.getLogger(__name__)



def adaptation_paths(spec: str) -> list[str]:
    """The images named by ``--images``: a folder (recursive, sorted) or a text file listing paths.

    Raises:
        FileNotFoundError: if ``spec`` does not exist.
        ValueError: if ``spec`` is one image rather than a folder or a list, or a list that is not UTF-8.
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--images {spec}: no such folder or list file")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"--images {spec} is one image; give a folder of the clinic's images or a text file "
                         "listing them, one path a line")
    try:
        return input_paths(spec)
    except UnicodeDecodeError as exc:
        raise ValueError(f"--images {spec}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a folder, or "
                         "a list of paths saved as UTF-8") from None


def decode_images(paths: Sequence[str], recipe: Preprocess,
                  workers: int = 2) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Prepare images as the bundle's inference does (``prepare_image``); unreadable ones are skipped and reported.

    Returns:
        ``(readable paths, RGB uint8 (n, size, size, 3), [(path, reason)] of the skipped)``.
    """
    def load(path: str):
        try:
            return prepare_image(path, recipe)[0], None
        except ImageError as exc:
            return None, str(exc)

    ok, images, failures = [], [], []
    step = max(1, len(paths) // 10)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (path, (img, err)) in enumerate(zip(paths, pool.map(load, paths)), 1):
            if err is None:
                ok.append(path)
                images.append(img)
            else:
                logger.warning("skipped %s", err)
                failures.append((path, err))
            if i % step == 0 or i == len(paths):
                logger.info("read %d/%d images (%d skipped)", i, len(paths), len(failures))
    array = np.stack(images) if images else recipe.empty_batch()
    return ok, array, failures


def image_set_fingerprint(paths: Sequence[str]) -> str:
    """SHA-256 over the sorted SHA-256 digests of the files' contents: names and order do not matter."""
    digests = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digests.append(h.hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


FINGERPRINT_RULE = "sha256 of the sorted sha256 digests of the used images' file contents (names and order ignored)"


def require_images(n_readable: int, n_listed: int, spec: str, minimum: int = MIN_IMAGES) -> None:
    """Refuse an adaptation set smaller than ``minimum`` readable images, naming ``--images`` and why.

    Raises:
        ValueError: if ``n_readable < minimum``.
    """
    if n_readable < minimum:
        found = f"{n_readable} readable images of {n_listed} listed" if n_listed > n_readable else f"{n_readable} images"
        raise ValueError(f"--images {spec}: {found}; adapt needs at least {minimum}, "
                         "enough to estimate the clinic's melanoma prevalence to about +/-0.05 and BatchNorm "
                         "statistics from dozens of images of each class. Collect more of the clinic's images")


# ---------------------------------------------------------------- writing the adapted run
ADAPTATION_FILE, SKIPPED_FILE = "adaptation.json", "adaptation_skipped.csv"
# What the new run keeps of the source run unchanged: its split, so `evaluate --run NEW_RUN` scores
# the same test images as `evaluate --run RUN`.
CARRIED_FILES = (SPLIT_INFO_FILE, SPLIT_FILE)
# The manifest keys save_ensemble writes itself; every other key of the source manifest is carried over.
_OWN_KEYS = ("format_version", "created", "versions", "branch_order", "branches", "method", "threshold",
             "image_size", "load_size", "crop_stride", "label_map", "metadata", "fusion", "ood")
_SETTINGS = ("bn_alpha", "tent_steps", "tent_lr", "tent_batch", "seed")


def bundle_branch_dirs(run: Path, manifest: dict[str, Any]) -> tuple[Path, list[Path]]:
    """``(ensemble directory, branch directories in member order)`` of a run whose bundle has ``manifest``."""
    ens_dir = RunDir(run).ensemble if (RunDir(run).ensemble / MANIFEST_FILE).is_file() else run
    return ens_dir, [Path(os.path.normpath(ens_dir / b["path"])) for b in manifest["branches"]]


def check_out_dir(run: Path, out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is the source run, inside it or around it, or an existing folder without ``--force``.

    ``--force`` replaces only a run that ``skinfusion adapt`` wrote (one with ``adaptation.json``):
    any other non-empty folder is left alone, so a mistyped path never deletes a training run.

    Raises:
        ValueError: naming ``--out`` and what to do.
    """
    r, o = run.resolve(), out.resolve()
    if o == r:
        raise ValueError(f"--out {out} is the source run (--run {run}); write the adapted run to a new folder, "
                         "so that the source run stays as it was")
    if r in o.parents or o in r.parents:
        raise ValueError(f"--out {out} and --run {run} lie inside one another; give --out a folder beside the run")
    for p in (o, *o.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {out}: {'exists and is not a directory' if p == o else f'{p} is a file'}; "
                             "give a folder")
    if o.is_dir() and any(o.iterdir()):
        if not force:
            raise ValueError(f"--out {out} exists and is not empty; choose a new folder, or pass --force to replace "
                             "the adapted run there")
        if not (o / ADAPTATION_FILE).is_file():
            raise ValueError(f"--out {out}: --force replaces only a run written by skinfusion adapt (it has "
                             f"{ADAPTATION_FILE}); this folder is not one, so it is left alone. Choose another --out")


def _write_branches(adapted: Adapted, src_dirs: Sequence[Path], dest: Path, record: dict[str, Any]) -> list[Path]:
    """Write the branches into ``dest/VIEW``: adapted ones saved anew, unchanged ones copied byte for byte."""
    dirs = []
    for model, config, src in zip(adapted.ensemble.models, adapted.ensemble.configs, src_dirs):
        bdir = dest / config.view
        if not adapted.changed_branches:
            bdir.mkdir(parents=True)
            for name in (MODEL_FILE, CONFIG_FILE, METADATA_FILE):
                shutil.copy2(src / name, bdir / name)
        else:
            meta = json.loads((src / METADATA_FILE).read_text(encoding="utf-8"))
            # validation_metrics stay the source branch's, measured before adaptation: labelled so.
            meta["adaptation"] = {"source_model_sha256": sha256_file(src / MODEL_FILE),
                                  "methods": record["methods"], "date": record["date"],
                                  "changes": record["branches"].get(config.view, {}),
                                  "validation_metrics_are": "the source branch's, before adaptation"}
            save_branch(bdir, model, config, meta)
        dirs.append(bdir)
    return dirs


def adapt_run(run_dir: str, images: str, out_dir: str, options: AdaptOptions | None = None,
              force: bool = False, workers: int = 2, min_images: int = MIN_IMAGES) -> dict[str, Any]:
    """Adapt a run's ensemble to the unlabelled images of ``images`` and write it as the run ``out_dir``.

    ``out_dir`` gets ``branches/`` (adapted, or copied when only ``prior`` runs), a signed
    ``ensemble/`` whose manifest records ``adaptation``, the source run's split files, the
    summary ``adaptation.json`` and ``adaptation_skipped.csv`` (unreadable images). It is built
    in a temporary folder beside ``out_dir`` and moved into place at the end, so an interrupted
    adapt leaves no half-written run.

    Returns:
        The summary written to ``adaptation.json``.

    Raises:
        FileNotFoundError: if the run, its bundle or ``images`` is missing.
        ValueError: for an ``--out`` that ``check_out_dir`` refuses, too few readable images, a
            run fused with metadata or adapted already, or a damaged bundle.
    """
    run, out, options = Path(run_dir), Path(out_dir), options or AdaptOptions()
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such run directory; train and fuse a run there first")
    check_out_dir(run, out, force)
    paths = adaptation_paths(images)
    require_images(len(paths), len(paths), images, min_images)  # before minutes of loading, not after
    with run_lock(run, "skinfusion adapt"):
        ens = load_ensemble(run)
        ens_dir, src_dirs = bundle_branch_dirs(run, ens.manifest)
        if "adaptation" in ens.manifest:
            raise ValueError(f"--run {run} is itself an adapted run (from {ens.manifest['adaptation']['source']['run']}); "
                             "adapt the original run instead, so that adaptations do not compound")
        if ens.metadata_fields:
            raise ValueError(f"--run {run}: its fusion takes metadata ({', '.join(ens.metadata_fields)}), which "
                             "unlabelled clinic images do not carry here; fuse the run without --metadata to adapt it")
        calibration = source_calibration(ens, src_dirs)
        ok, array, failures = decode_images(paths, ens.preprocess, workers)
        require_images(len(ok), len(paths), images, min_images)
        adapted = adapt_ensemble(ens, array, calibration, options)
        record = {
            **adapted.record,
            "images": {"spec": str(images), "n_listed": len(paths), "n_used": len(ok), "n_skipped": len(failures),
                       "fingerprint": image_set_fingerprint(ok), "fingerprint_rule": FINGERPRINT_RULE},
            "source": {"run": str(run.resolve()), "manifest_sha256": sha256_file(ens_dir / MANIFEST_FILE)},
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        record["changed"] = _changed(record)
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = out.resolve().parent / f".{out.name}.adapt-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_run(adapted, run, src_dirs, tmp, record, failures, getattr(ens, "gate", None))
            _move_into_place(tmp, out.resolve())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("adapted run written to %s (%s)", out, ", ".join(options.methods) or "no method")
    return record


def _gate(adapted: Adapted, source_gate, run: Path, branch_dirs: Sequence[Path], record: dict[str, Any]):
    """The new bundle's out-of-distribution gate: the source's when the branches are unchanged, else refitted.

    The gate scores distances in the branches' embedding space, which adapted BatchNorm layers
    move; a gate fitted on the source branches would judge the adapted ones by the wrong
    reference, so it is refitted on the source run's training images through the adapted
    branches (``fit_run_gate``, as fuse does), or left out, with a warning, when those images
    cannot be read. ``record["ood_gate"]`` says which.
    """
    if source_gate is None:
        record["ood_gate"] = "none (the source bundle has none)"
        return None
    if not adapted.changed_branches:
        record["ood_gate"] = "the source bundle's (the branches are unchanged)"
        return source_gate
    gate = fit_run_gate(run, branch_dirs, source_gate.percentile)
    if gate is None:
        logger.warning("the adapted run has no OOD gate: the source gate does not fit the adapted branches, and "
                       "the source run's training images, needed to refit it, cannot be read")
    record["ood_gate"] = ("refitted on the source run's training images through the adapted branches" if gate
                          else "none: the source gate does not fit the adapted branches and could not be refitted")
    return gate


def _write_run(adapted: Adapted, run: Path, src_dirs: Sequence[Path], tmp: Path, record: dict[str, Any],
               failures: Sequence[tuple[str, str]], source_gate=None) -> None:
    tmp.mkdir(parents=True)
    branch_dirs = _write_branches(adapted, src_dirs, RunDir(tmp).branches, record)
    source_manifest = adapted.ensemble.manifest
    carried = {k: v for k, v in source_manifest.items() if k not in _OWN_KEYS}
    shifted = record["logit_offset"] != 0.0
    rule = ("the source run's (max Youden J on its validation data), moved by the prior shift so that it keeps "
            "that operating point") if shifted else source_manifest.get("threshold_rule", "max Youden J on validation data")
    adaptation = {k: record[k] for k in ("methods", "images", "source", "prevalence", "logit_offset", "threshold",
                                         "changed", "date")}
    adaptation["settings"] = {k: record[k] for k in _SETTINGS if k in record}
    gate = _gate(adapted, source_gate, run, branch_dirs, record)
    adaptation["ood_gate"] = record["ood_gate"]
    save_ensemble(RunDir(tmp).ensemble, adapted.ensemble.fusion, source_manifest["method"], record["threshold"]["adapted"],
                  branch_dirs, extra={**carried, "threshold_rule": rule, "adaptation": adaptation}, gate=gate)
    for name in CARRIED_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    write_skip_report(tmp / SKIPPED_FILE, list(failures))
    write_json_atomic(tmp / ADAPTATION_FILE, record)


def _changed(record: dict[str, Any]) -> list[str]:
    """What adaptation changed, in words, for the manifest."""
    out = []
    for view, change in record["branches"].items():
        if "batchnorm" in change:
            out.append(f"{view}: BatchNorm moving statistics")
        if "tent" in change:
            out.append(f"{view}: BatchNorm scale and offset (TENT)")
    if record["logit_offset"]:
        out.append(f"fusion: log-odds offset {record['logit_offset']:+.4f}; threshold moved with it")
    return out or ["nothing"]


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; a replaced adapted run is moved aside first and deleted last."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
