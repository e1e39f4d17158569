"""The ensemble bundle: manifest.json + fusion.joblib + branch directories, hash-checked on load."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import joblib
import numpy as np

from colorspaces import apply_view, read_image, resize_image
from ensemble.fusion import FUSION_METHODS
from models import load_branch, predict_branch_proba
from models.store import library_versions, read_branch_info, write_json_atomic

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
        ValueError: if the branches disagree on image size or label map, or repeat a view.
    """
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
            "files": _branch_files(bdir),
        })
    if len(set(views)) != len(views):
        raise ValueError(f"each view may appear once in an ensemble, got {views}")
    sizes = {b["image_size"] for b in branches}
    if len(sizes) != 1:
        raise ValueError(f"branches were trained at different image sizes {sorted(sizes)}; retrain them at one size")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".fusion.", suffix=".joblib")
    os.close(fd)
    try:
        joblib.dump(fusion, tmp)
        os.replace(tmp, out_dir / FUSION_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        "label_map": {"0": "nevus", "1": "melanoma"},
        "fusion": {"file": FUSION_FILE, "sha256": sha256_file(out_dir / FUSION_FILE)},
        **(extra or {}),
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return out_dir


class Ensemble:
    """A loaded bundle: branch models in member order, the fusion estimator and the threshold."""

    def __init__(self, manifest: dict[str, Any], models: list, configs: list, fusion):
        self.manifest = manifest
        self.models = models
        self.configs = configs
        self.fusion = fusion
        self.views = [c.view for c in configs]
        self.image_size = int(manifest["image_size"])
        self.threshold = float(manifest["threshold"])

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """Read and resize images into one RGB uint8 batch (N, S, S, 3).

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        if len(images) == 0:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return np.stack([resize_image(read_image(img), self.image_size) for img in images])

    def member_proba(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Per-branch melanoma probabilities ``P`` (n × branches), each view computed once per image."""
        batch = self.prepare(images)
        P = np.zeros((len(batch), len(self.models)), np.float64)
        for j, (model, view) in enumerate(zip(self.models, self.views)):
            for i in range(0, len(batch), batch_size):
                x = apply_view(view, batch[i : i + batch_size])
                P[i : i + batch_size, j] = predict_branch_proba(model, x, batch_size=batch_size)
        return P

    def fuse(self, P: np.ndarray) -> np.ndarray:
        """Fused melanoma probabilities for a member-probability matrix."""
        if len(P) == 0:
            return np.zeros(0, np.float64)
        return self.fusion.predict_proba(P)[:, 1]

    def predict_proba(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Fused melanoma probabilities, one per image, in input order."""
        return self.fuse(self.member_proba(images, batch_size=batch_size))


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
        model, config, _ = load_branch(ens_dir / b["path"])
        if config.view != b["view"] or config.image_size != manifest["image_size"]:
            raise ValueError(f"{ens_dir / b['path']}: branch ({config.view}, {config.image_size}px) does not match the manifest")
        models.append(model)
        configs.append(config)
    fusion = joblib.load(ens_dir / manifest["fusion"]["file"])
    expected = FUSION_METHODS[manifest["method"]]
    if type(fusion) is not expected or getattr(fusion, "n_features_in_", None) != len(models):
        raise ValueError(f"{ens_dir / FUSION_FILE}: holds {type(fusion).__name__} for "
                         f"{getattr(fusion, 'n_features_in_', '?')} members, but the manifest says "
                         f"{manifest['method']} over {len(models)} branches")
    logger.info("loaded ensemble %s (%s fusion of %s)", ens_dir, manifest["method"], "+".join(manifest["branch_order"]))
    return Ensemble(manifest, models, configs, fusion)
