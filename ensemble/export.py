"""Writing an export bundle: a run's Keras ensemble as one ONNX or TFLite graph plus pickle-free JSON.

The graph holds every branch of the bundle (inputs named by view, outputs the member probabilities and
each branch's embedding for the OOD gate). The views, colour constancy and test-time windows
stay in NumPy and are recorded as a recipe (``preprocess.json``): the FFT view is a
``scipy.fft`` half spectrum that a graph would reproduce only approximately, and keeping the
preprocessing out of the graph lets ``ensemble.runtime`` share ``colorspaces.pipeline`` with
training. The fusion becomes ``fusion.json`` (weights, or the stacker's coefficients, intercept
and metadata encoding); ``fusion.joblib`` is never copied. Every export is scored against the
Keras bundle before its manifest is written: a float export that differs is refused, and so is
an int8 one further than ``INT8_TOLERANCE``. An int8 graph's embeddings are not the float ones the
run's OOD gate was fitted on, so an int8 export refits the gate on its own embeddings (the same
images and percentile as ``skinfusion fuse``), or leaves it out when those images are not given.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import library_versions, write_json_atomic
from colorspaces.image import RESIZE_RECIPE
from colorspaces.labels import LABEL_MAP
from colorspaces.lesion import LESION_RECIPE
from colorspaces.views import VIEWS
from ensemble.backends import require
from ensemble.converters import probe_images
from ensemble.formats import DEFAULT_FORMAT, EXPORT_FORMATS, export_format
from ensemble.fusion_json import fusion_spec
from ensemble.rundir import MANIFEST_FILE
from ensemble.runtime import (
    EXPORT_FORMAT,
    EXPORT_KIND,
    FUSION_JSON,
    PREPROCESS_JSON,
    ExportedEnsemble,
    sha256_file,
)

logger = logging.getLogger(__name__)

QUANTIZE = ("int8",)
FLOAT_TOLERANCE = 1e-4  # a float export further than this from Keras on the probe images is refused
# An int8 export further than this (max |fused probability difference| on the probe images) is refused.
# Measured (onnx int8): runs/loso/ISIC2017/baseline, 256 calibration images: 0.066 on the 16 probe
# images, 0.10 over its 1,464 test images; the tests' 32 px run: 0.031 (all 168 training images),
# 0.040 (40), but 0.27 with 20, where one branch's probability moved by 0.81: an under-calibrated
# quantisation. 0.25 is 2.5x the worst sound export seen and refuses that one.
INT8_TOLERANCE = 0.25
DEFAULT_CALIBRATION = 256  # training images int8 calibration sees (a seeded subsample)


def _versions() -> dict[str, str]:
    out = library_versions()
    for dist in dict.fromkeys(d for f in EXPORT_FORMATS.values() for d in f.distributions):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the export")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ValueError(f"--out {out} is a non-empty directory that holds no export; give a new or empty directory")
    if out.is_dir() and (out / MANIFEST_FILE).is_file():
        from ensemble.runtime import is_export_dir

        if not is_export_dir(out):
            raise ValueError(f"--out {out} holds a manifest.json that is not an export's (a run's bundle?); "
                             "give a new or empty directory")


def export_bundle(run: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = DEFAULT_FORMAT, quantize: str | None = None,
                  calibration: np.ndarray | None = None, probe: np.ndarray | None = None,
                  gate_images: tuple[np.ndarray, np.ndarray] | None = None,
                  test_images: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Export a run's fused ensemble to ``out_dir`` (see the module docstring).

    Args:
        run: a run directory (or its ``ensemble/``) with a fused bundle; it is hash-checked first.
        out_dir: the export directory; created, or rewritten when it already holds an export.
        fmt: a key of ``ensemble.formats.EXPORT_FORMATS``.
        quantize: None (float32) or ``"int8"`` (post-training quantisation).
        calibration: RGB uint8 training images at the bundle's ``load_size`` (N, L, L, 3); needed for int8.
        probe: images to compare the export with Keras on (default: 16 seeded generated images).
        gate_images: for int8 with a gated bundle, ``(train, val)`` RGB uint8 images at ``load_size``
            that the run's gate was fitted and thresholded on; the export's gate is refitted on them.
            None: the int8 export has no gate (the runtime says so).
        test_images: ``(images, labels)`` to score with Keras and the export; both AUCs are recorded
            under the manifest's ``test_check`` before the export replaces ``out_dir``.

    Returns:
        The export's manifest (also written as ``out_dir/manifest.json``).

    Raises:
        ValueError: for an unknown format or quantisation, a missing optional package, a fusion
            JSON cannot express, an ``out_dir`` that holds something else, missing calibration
            images, or an export further from Keras than ``FLOAT_TOLERANCE`` (float) or
            ``INT8_TOLERANCE`` (int8). Nothing is written then; ``out_dir`` is left as it was.
    """
    from ensemble.bundle import bundle_dir, load_ensemble

    export_format(fmt)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    for module in export_format(fmt).export_modules:
        require(module, f"--format {fmt}")  # before any work: the export checks itself with the runtime
    if quantize and (calibration is None or len(calibration) == 0):
        raise ValueError("int8 quantisation needs calibration images (the run's training images)")
    out = Path(out_dir).resolve()  # resolved: `--out .` must still have a name to build beside
    _check_out_dir(out)
    ens_dir = bundle_dir(Path(run))
    ens = load_ensemble(ens_dir)
    spec = fusion_spec(ens.fusion, ens.views)
    # Built beside the target and moved into place whole: a failed or interrupted export leaves the
    # previous one (or nothing), never a half-written directory.
    final, out = out, out.with_name(f".{out.name}.partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        manifest = _write(ens, ens_dir, run, out, fmt, quantize, calibration, spec)
        if quantize and ens.gate is not None:
            _refit_gate(ens, out, manifest, gate_images)
        manifest["parity"] = _parity(ens, out, probe, quantize)
        if test_images is not None:
            manifest["test_check"] = _test_check(ens, out, *test_images)
        write_json_atomic(out / MANIFEST_FILE, manifest)  # the parity record is a fact, not a signed file
        if final.exists():
            shutil.rmtree(final)  # checked above: an earlier export or an empty directory
        os.replace(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return manifest


def _refit_gate(ens, out: Path, manifest: dict[str, Any], gate_images) -> None:
    """Refit the run's OOD gate on the int8 graph's own embeddings, or leave it out without the images.

    int8 embeddings differ from the float ones (by up to 6.8 on the ISIC run), which moved
    ``in_distribution_score`` by 0.13 on average under the float gate; fitted on the export's
    embeddings of the same images at the same percentile, the gate means what the run's means.
    """
    if gate_images is None:
        logger.warning("the int8 export has no OOD gate: the run's gate was fitted on float embeddings and its "
                       "training and validation images were not given to refit it")
        return
    from ensemble.ood import OOD_FILE, fit_gate

    exp = ExportedEnsemble(out)

    def embed(imgs: np.ndarray) -> list[np.ndarray]:
        parts = [exp.member_outputs_batch(imgs[i : i + 256])[1] for i in range(0, len(imgs), 256)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(exp.views))]

    train, val = (embed(imgs) for imgs in gate_images)
    gate = fit_gate(train, val, ens.gate.percentile, ens.gate.layer)
    gate.save(out / OOD_FILE)
    manifest["files"][OOD_FILE] = sha256_file(out / OOD_FILE)
    manifest["ood"] = {**{k: v for k, v in gate.manifest_entry("").items() if k != "sha256"},
                       "fitted_on": "this export's int8 embeddings of the images the run's gate was fitted "
                                    "and thresholded on", "source_threshold": ens.gate.threshold}
    write_json_atomic(out / MANIFEST_FILE, manifest)
    logger.info("int8 OOD gate refitted on %d training and %d validation images: threshold %.3f (run's %.3f)",
                gate.n_fit, len(gate.val_scores), gate.threshold, ens.gate.threshold)


def _test_check(ens, out: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Both AUCs and the largest probability difference on labelled test images."""
    from ensemble.metrics import roc_auc_ci

    exp = ExportedEnsemble(out)
    p_ref = np.concatenate([ens.score_batch(images[i : i + 64])[1] for i in range(0, len(images), 64)])
    p_exp = np.concatenate([exp.score_details(images[i : i + 64]).fused for i in range(0, len(images), 64)])
    return {"images": len(labels), "melanoma": int(np.sum(labels)),
            "auc_keras": round(roc_auc_ci(labels, p_ref)[0], 4), "auc_export": round(roc_auc_ci(labels, p_exp)[0], 4),
            "max_abs_proba_diff": float(np.abs(p_ref - p_exp).max())}


def _write(ens, ens_dir: Path, run, out: Path, fmt: str, quantize: str | None, calibration, spec) -> dict[str, Any]:
    """Write the model, the JSON files, the gate and the manifest into ``out``; returns the manifest."""
    entry = export_format(fmt)
    model_file = entry.file
    names = entry.convert(ens, out / model_file, quantize, calibration)
    pre = {"image_size": ens.image_size, "load_size": ens.load_size, "resize": RESIZE_RECIPE,
           "resize_rule": "read as RGB uint8 (EXIF orientation applied, alpha dropped, 16-bit >> 8); resize to "
                          "load_size x load_size ignoring the aspect ratio, cv2.INTER_AREA when shrinking "
                          "(size < max(h, w)), else cv2.INTER_LINEAR",
           "windows": "with load_size > image_size: windows at offsets window_offsets(load_size, image_size, "
                      "crop_stride) on both axes, row-major, window-major batch; probabilities and embeddings "
                      "are averaged over the windows",
           "branches": [{"view": c.view, "channels": c.channels, "color_constancy": c.color_constancy,
                         "crop_stride": c.crop_stride, "view_rule": VIEWS[c.view].description}
                        for c in ens.configs],
           "lesion_margin": ens.preprocess.lesion_margin,
           "lesion_rule": "with lesion_margin not null: before the resize, crop the decoded image to its located lesion "
                          "(colorspaces.lesion.crop_to_lesion, recipe " + LESION_RECIPE + "); null: the whole image",
           "order": "colour constancy on the whole image, then windows, then the view"}
    write_json_atomic(out / FUSION_JSON, spec)
    write_json_atomic(out / PREPROCESS_JSON, pre)
    files = {name: sha256_file(out / name) for name in (model_file, FUSION_JSON, PREPROCESS_JSON)}
    ood = None
    src_ood = ens.manifest.get("ood")
    if ens.gate is not None and src_ood is not None and not quantize:  # int8: see _refit_gate
        shutil.copyfile(ens_dir / src_ood["file"], out / src_ood["file"])
        files[src_ood["file"]] = sha256_file(out / src_ood["file"])
        ood = {k: v for k, v in src_ood.items() if k != "sha256"}
    manifest = {
        "kind": EXPORT_KIND,
        "export_format": EXPORT_FORMAT,
        "format": fmt,
        "quantize": quantize,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "source": {"run": str(Path(run).resolve()), "manifest_sha256": sha256_file(ens_dir / MANIFEST_FILE),
                   "method": ens.manifest["method"], "dataset_fingerprint": ens.manifest.get("dataset_fingerprint")},
        "views": list(ens.views),
        "threshold": ens.threshold,
        "threshold_rule": ens.manifest.get("threshold_rule"),
        "label_map": LABEL_MAP,
        "metadata": list(ens.metadata_fields),
        "model": {"file": model_file, **names, "embedding_dims": ens.embedding_dims, "opset": entry.opset,
                  "calibration_images": 0 if calibration is None or not quantize else len(calibration)},
        "files": files,
        **({"ood": ood} if ood else {}),
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def _parity(ens, out: Path, probe: np.ndarray | None, quantize: str | None) -> dict[str, Any]:
    """Score ``probe`` with Keras and with the export; refuse a float export that differs."""
    images = probe_images(ens, 16) if probe is None else probe
    meta = [{}] * len(images) if ens.metadata_fields else None
    want_P, want_E = ens.member_outputs_batch(images)
    exp = ExportedEnsemble(out)
    got_P, got_E = exp.member_outputs_batch(images)
    fused_diff = float(np.abs(ens.fuse(want_P, meta) - exp.fuse(got_P, meta)).max())
    record = {"probe_images": len(images), "max_abs_member_proba": float(np.abs(want_P - got_P).max()),
              "max_abs_fused_proba": fused_diff,
              "max_abs_embedding": float(max(np.abs(a - b).max() for a, b in zip(want_E, got_E)))}
    if quantize is None and max(record["max_abs_member_proba"], fused_diff) > FLOAT_TOLERANCE:
        raise ValueError(f"the exported model differs from the Keras bundle by {fused_diff:.2g} (tolerance "
                         f"{FLOAT_TOLERANCE:g}); nothing was written. Report this with your versions.")
    if quantize and fused_diff > INT8_TOLERANCE:
        raise ValueError(f"the {quantize} export's fused probabilities differ from the Keras bundle's by up to "
                         f"{fused_diff:.3g} on {len(images)} probe images (bound {INT8_TOLERANCE:g}); nothing was "
                         "written. Calibrate on more images (--calibration-images) or export float32.")
    return record
