"""Saving and loading the ensemble bundle: manifest.json + fusion.joblib + branch directories, hash-checked."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import joblib

from ensemble.engine import Ensemble
from ensemble.fusion import FUSION_METHODS, fusion_class
from colorspaces.files import atomic_path, library_versions, write_json_atomic
from colorspaces.labels import LABEL_MAP
from models.store import load_branch, read_branch_info

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST_FILE, FUSION_FILE = "manifest.json", "fusion.joblib"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _branch_files(branch_dir: Path) -> dict[str, str]:
    return {name: sha256_file(branch_dir / name) for name in ("model.keras", "config.json", "metadata.json")}


def save_ensemble(
    out_dir: str | os.PathLike,
    fusion,
    method: str,
    threshold: float,
    branch_dirs: Sequence[str | os.PathLike],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` and ``fusion.joblib`` into ``out_dir``.

    Args:
        out_dir: the ensemble directory (usually ``RUN/ensemble``).
        fusion: a fitted fusion estimator whose member order is ``branch_dirs``.
        method: fusion method name (a key of ``FUSION_METHODS``).
        threshold: decision threshold chosen on validation data.
        branch_dirs: branch directories, in member order.
        extra: more facts for the manifest (validation metrics, dataset fingerprint, ...).

    Returns:
        The ensemble directory.

    Raises:
        KeyError: if ``method`` is not one of ``FUSION_METHODS``.
        ValueError: if ``fusion`` is not that method's estimator, or the branches disagree on
            image size or crops, or repeat a view.
    """
    if type(fusion) is not fusion_class(method):
        raise ValueError(f"fusion method {method!r} is {fusion_class(method).__name__}, got a {type(fusion).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    branches, views = [], []
    for bdir in map(Path, branch_dirs):
        config, meta = read_branch_info(bdir)
        views.append(config.view)
        branches.append({
            "view": config.view,
            "path": os.path.relpath(bdir.resolve(), out_dir.resolve()),
            "image_size": config.image_size,
            "crop": [config.load_size, config.crop_stride],
            "files": _branch_files(bdir),
        })
    if len(set(views)) != len(views):
        raise ValueError(f"each view may appear once in an ensemble, got {views}")
    sizes = {b["image_size"] for b in branches}
    if len(sizes) != 1:
        raise ValueError(f"branches were trained at different image sizes {sorted(sizes)}; retrain them at one size")
    crops = {tuple(b["crop"]) for b in branches}
    if len(crops) != 1:
        raise ValueError(f"branches were trained with different crop settings (load size, stride) {sorted(crops)}; "
                         "retrain them alike")
    load_size, crop_stride = crops.pop()
    with atomic_path(out_dir / FUSION_FILE) as tmp:
        joblib.dump(fusion, tmp)
    manifest = {
        "format_version": BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "branch_order": views,
        "branches": branches,
        "method": method,
        "threshold": float(threshold),
        "threshold_rule": "max Youden J on validation data",
        "image_size": sizes.pop(),
        "load_size": load_size,
        "crop_stride": crop_stride,
        "label_map": LABEL_MAP,
        # Metadata fields the fusion takes next to the images; [] for images only.
        "metadata": list(fusion.metadata_),
        "fusion": {"file": FUSION_FILE, "sha256": sha256_file(out_dir / FUSION_FILE)},
        **(extra or {}),
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return out_dir


# Libraries whose version shapes a bundle: a different major version cannot be trusted to load it
# the same way; a different minor version is worth a warning.
_VERSIONED = ("keras", "tensorflow", "scikit-learn", "skinfusion")


def check_versions(saved: dict[str, str], where: str) -> list[str]:
    """Compare a bundle's recorded library versions with the installed ones.

    Returns:
        Warning messages for minor-version (or skinfusion) differences, also logged.

    Raises:
        ValueError: if Keras, TensorFlow or scikit-learn differ in major version.
    """
    current = library_versions()
    if "tensorflow" not in current and "tensorflow-cpu" in current:
        current["tensorflow"] = current["tensorflow-cpu"]
    saved = dict(saved or {})
    if "tensorflow" not in saved and "tensorflow-cpu" in saved:
        saved["tensorflow"] = saved["tensorflow-cpu"]
    warnings_out = []
    for lib in _VERSIONED:
        old, new = saved.get(lib), current.get(lib)
        if not old or not new or old == new:
            continue
        old_mm, new_mm = old.split(".")[:2], new.split(".")[:2]
        if lib != "skinfusion" and old_mm[0] != new_mm[0]:
            raise ValueError(f"{where}: saved with {lib} {old}, but {lib} {new} is installed; a different major "
                             f"version cannot load it reliably. Install {lib}=={old} or retrain.")
        if old_mm != new_mm or lib == "skinfusion":
            msg = f"{where}: saved with {lib} {old}, running {lib} {new}; predictions may differ slightly"
            logger.warning("%s", msg)
            warnings_out.append(msg)
    return warnings_out


def load_ensemble(path: str | os.PathLike) -> Ensemble:
    """Load a bundle after checking every file against the manifest's SHA-256.

    Nothing is deserialised, and ``fusion.joblib`` is never unpickled, until all hashes match.

    Args:
        path: a run directory (containing ``ensemble/``) or the ensemble directory itself.

    Returns:
        The loaded ``Ensemble``.

    Raises:
        FileNotFoundError: if the manifest or a bundle file is missing.
        ValueError: if a file's hash differs from the manifest or the format is unsupported.
    """
    path = Path(path)
    ens_dir = path / "ensemble" if (path / "ensemble" / MANIFEST_FILE).is_file() else path
    manifest_path = ens_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: no ensemble manifest found (run `skinfusion fuse --run RUN` first)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != BUNDLE_FORMAT:
        raise ValueError(f"{manifest_path}: bundle format {manifest.get('format_version')!r} is not supported (expected {BUNDLE_FORMAT})")
    if manifest.get("method") not in FUSION_METHODS:
        raise ValueError(f"{manifest_path}: unknown fusion method {manifest.get('method')!r}")
    if manifest.get("label_map") != LABEL_MAP:
        raise ValueError(f"{manifest_path}: label map {manifest.get('label_map')} differs from {LABEL_MAP}")
    check_versions(manifest.get("versions", {}), str(manifest_path))

    checks = [(ens_dir / manifest["fusion"]["file"], manifest["fusion"]["sha256"])]
    for b in manifest["branches"]:
        for name, digest in b["files"].items():
            checks.append((ens_dir / b["path"] / name, digest))
    for file, digest in checks:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: bundle file listed in {manifest_path} is missing")
        if sha256_file(file) != digest:
            raise ValueError(f"{file}: SHA-256 differs from {manifest_path}; the bundle was modified, refusing to load it")

    models, configs = [], []
    for b in manifest["branches"]:
        model, config, meta = load_branch(ens_dir / b["path"])
        if config.view != b["view"] or config.image_size != manifest["image_size"]:
            raise ValueError(f"{ens_dir / b['path']}: branch ({config.view}, {config.image_size}px) does not match "
                             f"the manifest ({b['view']}, {manifest['image_size']}px); refusing to load it")
        if manifest.get("dataset_fingerprint") and meta.get("dataset_fingerprint") != manifest["dataset_fingerprint"]:
            raise ValueError(f"{ens_dir / b['path']}: branch was trained on dataset {meta.get('dataset_fingerprint')}, "
                             f"the ensemble on {manifest['dataset_fingerprint']}; refusing to load it")
        models.append(model)
        configs.append(config)
    fusion = joblib.load(ens_dir / manifest["fusion"]["file"])
    expected = FUSION_METHODS[manifest["method"]]
    if type(fusion) is not expected or getattr(fusion, "n_features_in_", None) != len(models):
        raise ValueError(f"{ens_dir / FUSION_FILE}: holds {type(fusion).__name__} for "
                         f"{getattr(fusion, 'n_features_in_', '?')} members, but the manifest says "
                         f"{manifest['method']} over {len(models)} branches")
    if tuple(fusion.metadata_) != tuple(manifest.get("metadata", ())):
        raise ValueError(f"{ens_dir / FUSION_FILE}: fuses metadata {list(fusion.metadata_)}, but the "
                         f"manifest says {manifest.get('metadata', [])}; refusing to load it")
    logger.info("loaded ensemble %s (%s fusion of %s)", ens_dir, manifest["method"], "+".join(manifest["branch_order"]))
    return Ensemble(manifest, models, configs, fusion)
