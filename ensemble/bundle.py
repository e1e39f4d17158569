"""Saving and loading the ensemble bundle: manifest.json + fusion.joblib (+ ood.npz) + branch directories, hash-checked."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import joblib

from colorspaces.files import atomic_path, library_versions, read_json_object, sha256_file, write_json_atomic
from colorspaces.labels import LABEL_MAP
from ensemble.engine import Ensemble
from ensemble.fusion import FUSION_METHODS, fusion_class
from ensemble.ood import DEFAULT_PERCENTILE, OOD_FILE, OODGate, check_percentile, embedding_layer
from ensemble.rundir import ENSEMBLE_DIR, MANIFEST_FILE, RunDir, default_fuse_views, find_bundle, is_branch_dir
from models.branch import BranchConfig
from models.store import CONFIG_FILE, METADATA_FILE, MODEL_FILE, load_branch

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
FUSION_FILE = "fusion.joblib"


BRANCH_FILES = (MODEL_FILE, CONFIG_FILE, METADATA_FILE)


def _branch_files(branch_dir: Path) -> dict[str, str]:
    return {name: sha256_file(branch_dir / name) for name in BRANCH_FILES}


def retrain_hint(branch_dir: str | os.PathLike) -> str:
    """What to do about a damaged branch: the ``skinfusion train`` command that rewrites it.

    A branch of a run lives in ``RUN/branches/VIEW`` (the layout ``skinfusion train`` writes);
    elsewhere the hint cannot name the run.
    """
    branch_dir = Path(os.path.normpath(branch_dir))
    if is_branch_dir(branch_dir):
        return f"retrain this branch (skinfusion train --view {branch_dir.name} --run {branch_dir.parent.parent})"
    return "retrain this branch"


def check_branch(branch_dir: str | os.PathLike) -> tuple[BranchConfig, dict[str, Any]]:
    """Load a branch exactly as ``load_ensemble`` will, so that a damaged one is never signed.

    Returns:
        The branch's ``(config, metadata)``.

    Raises:
        FileNotFoundError: if a branch file is missing.
        ValueError: "cannot load FILE: REASON; retrain this branch (...)" for a damaged
            ``model.keras``, or naming the damaged ``config.json`` or ``metadata.json``.
    """
    _, config, meta = load_branch(branch_dir, hint=retrain_hint(branch_dir))
    return config, meta


def save_ensemble(
    out_dir: str | os.PathLike,
    fusion,
    method: str,
    threshold: float,
    branch_dirs: Sequence[str | os.PathLike],
    extra: dict[str, Any] | None = None,
    gate: OODGate | None = None,
) -> Path:
    """Write ``manifest.json`` and ``fusion.joblib`` (and ``ood.npz`` with a gate) into ``out_dir``.

    Args:
        out_dir: the ensemble directory (usually ``RUN/ensemble``).
        fusion: a fitted fusion estimator whose member order is ``branch_dirs``.
        method: fusion method name (a key of ``FUSION_METHODS``).
        threshold: decision threshold chosen on validation data.
        branch_dirs: branch directories, in member order.
        extra: more facts for the manifest (validation metrics, dataset fingerprint, ...).
        gate: the fitted out-of-distribution gate, recorded under the manifest's ``ood`` key;
            None writes a bundle without one.

    Returns:
        The ensemble directory.

    Raises:
        KeyError: if ``method`` is not one of ``FUSION_METHODS``.
        ValueError: if ``fusion`` is not that method's estimator, or the branches disagree on
            image size or crops, or repeat a view.
    """
    if type(fusion) is not fusion_class(method):
        raise ValueError(f"fusion method {method!r} is {fusion_class(method).__name__}, got a {type(fusion).__name__}")
    if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    out_dir = Path(out_dir)
    branches, views = [], []
    for bdir in map(Path, branch_dirs):
        # Every file is loaded before it is hashed: the manifest signs what load_ensemble can load.
        config, _ = check_branch(bdir)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / FUSION_FILE) as tmp:
        joblib.dump(fusion, tmp)
    ood = {}
    if gate is not None:
        ood = {"ood": gate.manifest_entry(sha256_file(gate.save(out_dir / OOD_FILE)))}
    else:
        (out_dir / OOD_FILE).unlink(missing_ok=True)  # a previous fuse's gate does not belong to this fusion
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
        **ood,  # after extra: the gate written here is the one the manifest signs, whatever extra carried
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


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def fuse_command(run: str | os.PathLike, manifest: dict[str, Any] | None = None) -> str:
    """The ``skinfusion fuse`` command that rewrites a run's bundle with the settings ``manifest`` records."""
    cmd = f"skinfusion fuse --run {run}"
    if not manifest:
        return cmd
    views = [b["view"] for b in manifest["branches"]]
    if tuple(views) != default_fuse_views(run, warn=False):  # what `fuse` would pick without --views
        cmd += f" --views {','.join(views)}"
    if manifest["method"] != "mean":
        cmd += f" --method {manifest['method']}"
    if manifest.get("metadata"):
        cmd += f" --metadata {','.join(manifest['metadata'])}"
    fit = manifest.get("stack_fit")
    folds = fit.get("folds") if isinstance(fit, dict) else None
    if isinstance(folds, int) and folds > 1:
        cmd += f" --folds {folds}"
    ood = manifest.get("ood")
    percentile = ood.get("percentile") if isinstance(ood, dict) else None
    if _is_number(percentile) and percentile != DEFAULT_PERCENTILE:
        cmd += f" --ood-percentile {percentile:g}"
    return cmd


_MANIFEST_KEYS = ("format_version", "method", "branches", "fusion", "image_size", "threshold", "label_map")


def read_manifest(manifest_path: str | os.PathLike, run: str | os.PathLike) -> dict[str, Any]:
    """Read and check a bundle's ``manifest.json``: every key the loader and the engine use, with its type.

    Args:
        manifest_path: the file.
        run: the run it belongs to, for the ``skinfusion fuse --run RUN`` that rewrites it.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: if it is missing.
        ValueError: naming the file and the damaged key, or an unsupported format, method or label map.
    """
    hint = f"re-run `{fuse_command(run)}` to rewrite it"
    m = read_json_object(manifest_path, required=_MANIFEST_KEYS, hint=hint)

    def damaged(what: str) -> ValueError:
        return ValueError(f"{manifest_path}: damaged, {what}; {hint}")

    if m["format_version"] != BUNDLE_FORMAT:
        raise ValueError(f"{manifest_path}: bundle format {m['format_version']!r} is not supported "
                         f"(expected {BUNDLE_FORMAT}); {hint}")
    if not isinstance(m["method"], str) or m["method"] not in FUSION_METHODS:
        raise ValueError(f"{manifest_path}: unknown fusion method {m['method']!r} (known: "
                         f"{', '.join(FUSION_METHODS)}); {hint}")
    if m["label_map"] != LABEL_MAP:
        raise ValueError(f"{manifest_path}: label map {m['label_map']} differs from {LABEL_MAP}; {hint}")
    branches = m["branches"]
    if not isinstance(branches, list) or not branches:
        raise damaged(f"'branches' must be a non-empty list, got {branches!r}")
    for k, b in enumerate(branches):
        files = b.get("files") if isinstance(b, dict) else None
        if not (isinstance(b, dict) and isinstance(b.get("view"), str) and isinstance(b.get("path"), str)
                and isinstance(files, dict) and sorted(files) == sorted(BRANCH_FILES)
                and all(isinstance(v, str) for v in files.values())):
            raise damaged(f"branches[{k}] must hold 'view', 'path' and the SHA-256 'files' {list(BRANCH_FILES)}")
    fusion = m["fusion"]
    if not (isinstance(fusion, dict) and isinstance(fusion.get("file"), str) and isinstance(fusion.get("sha256"), str)):
        raise damaged(f"'fusion' must hold 'file' and 'sha256', got {fusion!r}")
    for key in ("image_size", "load_size"):
        value = m.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise damaged(f"{key!r} must be a whole number >= 1, got {value!r}")
    if not _is_number(m["threshold"]) or not 0.0 <= m["threshold"] <= 1.0:
        raise damaged(f"'threshold' must be a number in [0, 1], got {m['threshold']!r}")
    if not _is_str_list(m.get("metadata", [])):
        raise damaged(f"'metadata' must be a list of field names, got {m.get('metadata')!r}")
    versions = m.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise damaged(f"'versions' must map library names to version strings, got {versions!r}")
    if "branch_order" in m and m["branch_order"] != [b["view"] for b in branches]:
        raise damaged(f"'branch_order' {m['branch_order']!r} differs from the branches' views")
    ood = m.get("ood")
    if ood is not None:
        _check_ood_entry(ood, damaged)
    if not isinstance(m.get("dataset_fingerprint"), (str, type(None))):
        raise damaged(f"'dataset_fingerprint' must be a string, got {m['dataset_fingerprint']!r}")
    val = m.get("validation_metrics", {})  # evaluate reads each branch's validation threshold from it
    if not isinstance(val, dict) or (val and not all(
            isinstance(val.get(b["view"]), dict) and _is_number(val[b["view"]].get("threshold")) for b in branches)):
        raise damaged("'validation_metrics' must hold each branch's validation 'threshold'")
    return m


def _check_ood_entry(ood: Any, damaged) -> None:
    """Refuse a damaged ``ood`` record (the gate is optional; a record that is there must be whole)."""
    if not (isinstance(ood, dict) and isinstance(ood.get("file"), str) and isinstance(ood.get("sha256"), str)
            and _is_number(ood.get("threshold")) and isinstance(ood.get("layer"), str)):
        raise damaged(f"'ood' must hold 'file', 'sha256', 'layer' and a numeric 'threshold', got {ood!r}")
    try:
        check_percentile(ood.get("percentile"))
    except ValueError:
        raise damaged(f"'ood' percentile must be a number from 50 to 100, got {ood.get('percentile')!r}") from None


def bundle_dir(path: Path) -> Path:
    """The ensemble directory of a run directory (or the ensemble directory itself); see ``ensemble.rundir.find_bundle``."""
    run = path.parent if path.name == ENSEMBLE_DIR and not RunDir(path).ensemble.exists() else path
    return find_bundle(path, fuse_command(run))


# What unpickling a damaged or foreign joblib file raises (a class it names may no longer exist).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError,
                    AttributeError, ImportError)


def load_ensemble(path: str | os.PathLike) -> Ensemble:
    """Load a bundle after checking every file against the manifest's SHA-256.

    Nothing is deserialised, and ``fusion.joblib`` is never unpickled, until all hashes match.

    Args:
        path: a run directory (containing ``ensemble/``) or the ensemble directory itself.

    Returns:
        The loaded ``Ensemble``.

    Raises:
        FileNotFoundError: if the run, its manifest or a bundle file is missing ("RUN: no such
            run directory", "no ensemble in RUN; run `skinfusion fuse --run RUN` first").
        ValueError: if the manifest is damaged, a file's hash differs from the manifest, the format
            is unsupported, or a file cannot be loaded ("cannot load FILE: REASON"); every message
            names the file and says what to do.
    """
    path = Path(path)
    ens_dir = bundle_dir(path)
    run = ens_dir.parent if ens_dir.name == ENSEMBLE_DIR else path
    manifest_path = ens_dir / MANIFEST_FILE
    manifest = read_manifest(manifest_path, run)
    check_versions(manifest.get("versions", {}), str(manifest_path))
    refuse = f"re-run `{fuse_command(run, manifest)}`"

    fusion_file = ens_dir / manifest["fusion"]["file"]
    checks = [(fusion_file, manifest["fusion"]["sha256"], None)]
    ood = manifest.get("ood")
    if ood is not None:  # bundles fused before the gate existed have none, and load without it
        checks.append((ens_dir / ood["file"], ood["sha256"], None))
    for b in manifest["branches"]:
        bdir = Path(os.path.normpath(ens_dir / b["path"]))
        checks += [(bdir / name, digest, bdir) for name, digest in b["files"].items()]
    for file, digest, bdir in checks:
        if not file.is_file():
            todo = f"{retrain_hint(bdir)}, then {refuse}" if bdir else refuse
            raise FileNotFoundError(f"{file}: bundle file listed in {manifest_path} is missing; {todo}")
        if sha256_file(file) != digest:
            todo = (f"if you retrained a branch, {refuse} to re-sign the bundle" if bdir
                    else f"{refuse} to rewrite it")
            raise ValueError(f"{file}: SHA-256 differs from {manifest_path}; the bundle was modified, "
                             f"refusing to load it ({todo})")

    models, configs = [], []
    for b in manifest["branches"]:
        bdir = Path(os.path.normpath(ens_dir / b["path"]))
        model, config, meta = load_branch(bdir, hint=f"{retrain_hint(bdir)}, then {refuse}")
        if config.view != b["view"] or config.image_size != manifest["image_size"]:
            raise ValueError(f"{bdir}: branch ({config.view}, {config.image_size}px) does not match "
                             f"the manifest ({b['view']}, {manifest['image_size']}px); refusing to load it; {refuse}")
        if manifest.get("dataset_fingerprint") and meta.get("dataset_fingerprint") != manifest["dataset_fingerprint"]:
            raise ValueError(f"{bdir}: branch was trained on dataset {meta.get('dataset_fingerprint')}, "
                             f"the ensemble on {manifest['dataset_fingerprint']}; refusing to load it; {refuse}")
        models.append(model)
        configs.append(config)
    try:
        fusion = joblib.load(fusion_file)
    except _UNPICKLE_ERRORS as exc:
        raise ValueError(f"cannot load {fusion_file}: {type(exc).__name__}: {exc}; {refuse}") from None
    expected = FUSION_METHODS[manifest["method"]]
    if type(fusion) is not expected or getattr(fusion, "n_features_in_", None) != len(models):
        raise ValueError(f"{fusion_file}: holds {type(fusion).__name__} for "
                         f"{getattr(fusion, 'n_features_in_', '?')} members, but the manifest says "
                         f"{manifest['method']} over {len(models)} branches; {refuse}")
    if tuple(fusion.metadata_) != tuple(manifest.get("metadata", ())):
        raise ValueError(f"{fusion_file}: fuses metadata {list(fusion.metadata_)}, but the "
                         f"manifest says {manifest.get('metadata', [])}; refusing to load it; {refuse}")
    gate = _load_gate(ens_dir, ood, models, refuse) if ood is not None else None
    logger.info("loaded ensemble %s (%s fusion of %s%s)", ens_dir, manifest["method"],
                "+".join(b["view"] for b in manifest["branches"]), ", with an OOD gate" if gate else "")
    return Ensemble(manifest, models, configs, fusion, gate)


def _load_gate(ens_dir: Path, ood: dict[str, Any], models: list, refuse: str) -> OODGate:
    """The bundle's gate, after its hash matched; refused if it does not fit the loaded branches."""
    path = ens_dir / ood["file"]
    layers = {embedding_layer(m) for m in models}
    if layers != {ood["layer"]}:
        raise ValueError(f"{path}: the gate was fitted on layer {ood['layer']!r}, but the branches' embedding "
                         f"layer is {sorted(layers)}; refusing to load it; {refuse}")
    dims = [int(m.get_layer(ood["layer"]).output.shape[-1]) for m in models]
    return OODGate.load(path, ood, dims, refuse)
