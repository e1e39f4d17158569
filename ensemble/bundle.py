"""The ensemble bundle: manifest.json + fusion.joblib + branch directories, hash-checked on load."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import joblib
import numpy as np

from colorspaces import ImageError, apply_constancy, apply_view, read_image, resize_image, sliding_windows
from ensemble.fusion import FUSION_METHODS
from models import load_branch
from models.store import LABEL_MAP, atomic_path, library_versions, read_branch_info, write_json_atomic

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
        "metadata": list(getattr(fusion, "metadata_", ())),
        "fusion": {"file": FUSION_FILE, "sha256": sha256_file(out_dir / FUSION_FILE)},
        **(extra or {}),
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return out_dir


TTA_TRANSFORMS = ("identity", "rot90", "rot180", "rot270", "flip", "flip+rot90", "flip+rot180", "flip+rot270")


def dihedral(batch: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations/flips of a square image batch (N, S, S, C); k = 0 is the identity."""
    out = np.rot90(batch, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if k >= 4 else out)


class Ensemble:
    """A loaded bundle: branch models in member order, the fusion estimator and the threshold.

    Inference decodes each image once, computes each view once, and runs all branches in
    one compiled forward pass (a ``tf.function`` with a fixed input signature, traced once
    at load time), so neither single images nor batches pay for graph retracing. Branches
    trained with sliding-window crops see each image resized to ``load_size``, as a grid of
    windows whose probabilities are averaged per branch before the fusion.
    """

    def __init__(self, manifest: dict[str, Any], models: list, configs: list, fusion):
        self.manifest = manifest
        self.models = models
        self.configs = configs
        self.fusion = fusion
        self.views = [c.view for c in configs]
        self.image_size = int(manifest["image_size"])
        # Bundles written before crops existed have neither key: no crops.
        self.load_size = int(manifest.get("load_size", self.image_size))
        self.crop_stride = int(manifest.get("crop_stride", 0))
        self.threshold = float(manifest["threshold"])
        # Metadata fields the fusion needs next to the images (empty: images only).
        self.metadata_fields = tuple(manifest.get("metadata", ()))
        self._forward = self._compile_forward()

    def _compile_forward(self):
        import tensorflow as tf

        models, s = self.models, self.image_size
        signature = [tf.TensorSpec([None, s, s, c.channels], tf.float32, name=c.view) for c in self.configs]

        # training=False: BatchNorm uses its moving statistics, so an image's probability
        # does not depend on the rest of the batch.
        @tf.function(input_signature=signature)
        def forward(*xs):
            return tf.concat([tf.reshape(m(x, training=False), [-1, 1]) for m, x in zip(models, xs)], axis=1)

        forward.get_concrete_function()  # trace now, not on the first prediction
        return forward

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """Read and resize images into one RGB uint8 batch (N, L, L, 3), L = ``load_size``.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        if len(images) == 0:
            return np.zeros((0, self.load_size, self.load_size, 3), np.uint8)
        return np.stack([resize_image(read_image(img), self.load_size) for img in images])

    def member_proba_batch(self, batch: np.ndarray) -> np.ndarray:
        """``P`` (n × branches) for RGB uint8 images already at ``load_size``, in one forward pass."""
        if len(batch) == 0:
            return np.zeros((0, len(self.models)), np.float64)
        n, k = len(batch), 1
        # Colour constancy sees the whole image, as in training, and only then is it cut into windows.
        prepared = {m: apply_constancy(m, batch) for m in {c.color_constancy for c in self.configs}}
        if self.load_size > self.image_size:
            for m, imgs in prepared.items():
                prepared[m], k = sliding_windows(imgs, self.image_size, self.crop_stride)
        xs = [np.asarray(apply_view(c.view, prepared[c.color_constancy]), dtype=np.float32) for c in self.configs]
        P = self._forward(*xs).numpy().astype(np.float64)
        return P.reshape(k, n, -1).mean(axis=0)

    def score_batch(self, batch: np.ndarray, tta: bool = False, meta=None) -> tuple[np.ndarray, np.ndarray]:
        """``(P, fused)`` for RGB uint8 images at the bundle's size (``meta``: see ``fuse``).

        With ``tta``, each image is scored under the 8 rotations and flips of the square (the
        transformations training augments with) in one forward pass; ``fused`` is the mean of
        the 8 fused probabilities and ``P`` the mean member matrix.
        """
        if not tta or len(batch) == 0:
            P = self.member_proba_batch(batch)
            return P, self.fuse(P, meta)
        n = len(batch)
        variants = np.concatenate([dihedral(batch, k) for k in range(len(TTA_TRANSFORMS))])
        Ps = self.member_proba_batch(variants).reshape(len(TTA_TRANSFORMS), n, -1)
        fused = np.mean([self.fuse(P, meta) for P in Ps], axis=0)
        return Ps.mean(axis=0), fused

    def member_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """Per-branch melanoma probabilities ``P`` (n × branches), decoding ``batch_size`` images at a time."""
        parts = [self.score_batch(self.prepare(images[i : i + batch_size]), tta)[0]
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.models)), np.float64)

    def fuse(self, P: np.ndarray, meta=None) -> np.ndarray:
        """Fused melanoma probabilities for a member-probability matrix.

        Args:
            P: member probabilities (n × branches).
            meta: for a bundle fused with metadata (``metadata_fields``), one dict per row
                with those fields (missing keys or ``None`` mean unknown); ignored otherwise.

        Raises:
            ValueError: if the bundle needs metadata and ``meta`` is None or the wrong length.
        """
        if len(P) == 0:
            return np.zeros(0, np.float64)
        if self.metadata_fields:
            return self.fusion.predict_proba(P, meta)[:, 1]
        return self.fusion.predict_proba(P)[:, 1]

    def predict_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False,
                      metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """Fused melanoma probabilities, one per image, in input order (``tta``: see ``score_batch``,
        ``metadata``: one dict per image, see ``fuse``)."""
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(images)} images")
        parts = [self.score_batch(self.prepare(images[i : i + batch_size]), tta,
                                  None if metadata is None else metadata[i : i + batch_size])[1]
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float64)

    def _load_file(self, path: str):
        try:
            return resize_image(read_image(path), self.load_size), None
        except ImageError as exc:
            return None, str(exc)

    def iter_files(self, paths: Sequence[str], batch_size: int = 64, workers: int = 2,
                   tta: bool = False, metadata: dict[str, dict] | None = None) -> Iterator[FileBatch]:
        """Score image files in streamed batches; unreadable files are reported, not raised.

        While one batch runs through the branches, ``workers`` threads decode the next one,
        so memory holds two batches whatever the number of files.

        Args:
            paths: image files, scored in this order.
            batch_size: images per batch.
            workers: decoding threads (OpenCV releases the GIL while decoding).
            tta: average over the 8 rotations and flips (see ``score_batch``).
            metadata: path → metadata dict, for a bundle fused with metadata (a path it
                lacks is scored with every field unknown).

        Yields:
            One ``FileBatch`` per batch of ``paths``: the readable paths, their ``P`` and
            fused probabilities, and ``(path, reason)`` for the files that were skipped.
        """
        chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = [pool.submit(self._load_file, p) for p in chunks[0]] if chunks else []
            for ci, chunk in enumerate(chunks):
                current = pending
                pending = [pool.submit(self._load_file, p) for p in chunks[ci + 1]] if ci + 1 < len(chunks) else []
                ok, imgs, failures = [], [], []
                for path, fut in zip(chunk, current):
                    img, err = fut.result()
                    if err is None:
                        ok.append(path)
                        imgs.append(img)
                    else:
                        failures.append((path, err))
                meta = [(metadata or {}).get(p) for p in ok] if self.metadata_fields else None
                P, fused = self.score_batch(np.stack(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8), tta, meta)
                yield FileBatch(ok, P, fused, failures)


@dataclasses.dataclass
class FileBatch:
    """One streamed batch of ``Ensemble.iter_files``."""

    paths: list[str]
    P: np.ndarray
    fused: np.ndarray
    failures: list[tuple[str, str]]


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
    if tuple(getattr(fusion, "metadata_", ())) != tuple(manifest.get("metadata", ())):
        raise ValueError(f"{ens_dir / FUSION_FILE}: fuses metadata {list(getattr(fusion, 'metadata_', ()))}, but the "
                         f"manifest says {manifest.get('metadata', [])}; refusing to load it")
    logger.info("loaded ensemble %s (%s fusion of %s)", ens_dir, manifest["method"], "+".join(manifest["branch_order"]))
    return Ensemble(manifest, models, configs, fusion)
