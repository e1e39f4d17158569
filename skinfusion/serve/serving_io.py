"""What the HTTP service reads and writes: uploaded images, metadata form fields, and the JSON it answers with.

Nothing here knows about HTTP status codes: bad input raises ``ImageError`` (an upload that is
not a readable image) or ``ValueError`` (bad metadata), and ``skinfusion.serve.serving``
turns them into 422 answers.
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from colorspaces import ImageError, read_image
from colorspaces.files import sha256_file
from colorspaces.pipeline import Preprocess, prepare_image
from colorspaces.quality import REASONS
from ensemble.api import Explanation
from ensemble.details import PredictionDetails
from ensemble.rundir import model_id  # noqa: F401  (re-exported: serve's model id)
from ensemble.scoring import ScoringEngine
from ensemble.metadata import FIELD_FORMATS, METADATA_FIELDS, SEXES, clean_age, clean_text
from skinfusion.workflows.explaining import (
    HEAT_ALPHA,
    NOT_A_DEVICE,
    heat_base,
    heatmap_is_empty,
    view_caption,
    view_picture,
)

CALIBRATION_CAVEAT = (
    "The probabilities were fitted and the threshold chosen on this run's validation images (retrospective "
    "public ISIC data with its own melanoma prevalence). They are not calibrated for another population, "
    "camera or clinic, and an image flagged out of distribution should not be scored at all.")
MODEL_NOTICE = NOT_A_DEVICE


def decode_upload(data: bytes, filename: str) -> np.ndarray:
    """An uploaded file's bytes as RGB uint8, through ``colorspaces.read_image`` (the one image reader).

    The bytes go through a private temporary file so that the reader's checks (empty file,
    decompression-bomb limit, truncated or non-image data) apply unchanged; its messages name
    the uploaded file, never the temporary path.

    Raises:
        ImageError: the reader's message, naming ``filename``.
    """
    name = display_name(filename)
    fd, tmp = tempfile.mkstemp(prefix="skinfusion-upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return read_image(tmp)
        except ImageError as exc:
            raise ImageError(str(exc).replace(tmp, name)) from None
    finally:
        os.unlink(tmp)


def display_name(filename: str | None) -> str:
    """The base name a client gave its upload (no folders), or ``upload`` when it gave none."""
    base = os.path.basename((filename or "").replace("\\", "/")).strip()
    return base[:200] or "upload"


def prepare_upload(image: np.ndarray, recipe: Preprocess) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(image at load_size, image-level OOD reasons)``: ``colorspaces.pipeline.prepare_image`` of a decoded upload."""
    return prepare_image(image, recipe)


# ---------------------------------------------------------------- metadata
def _shown(value: Any) -> str:
    """A client's value for an error message: quoted, and cut short (a 5,000-digit age is not echoed back)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return "(a number of over 30 digits)"
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _check_field(field: str, value: Any) -> Any:
    """A field's cleaned value (None = unknown); raises ValueError for a value given but unreadable."""
    if isinstance(value, (dict, list)):
        raise ValueError(f"metadata {field}: must be a single value, not a JSON {type(value).__name__}")
    if field == "age":
        age = None if isinstance(value, bool) else clean_age(value)
        if age is None and clean_text(value) != "":
            raise ValueError(f"metadata age {_shown(value)}: age must be 0–120 ({FIELD_FORMATS['age']}), "
                             "or empty for unknown")
        return age
    text = clean_text(value)
    if field == "sex" and text and text not in SEXES:
        raise ValueError(f"metadata sex {_shown(value)}: must be {FIELD_FORMATS['sex']} (or empty for unknown)")
    return text or None


def _big_int(digits: str) -> int | str:
    # JSON integers longer than any age are kept as text: int() of 5,000 digits would fail with a
    # message about sys.set_int_max_str_digits(), which says nothing to the client.
    return int(digits) if len(digits) <= 30 else digits


def _one(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be a JSON object like {{\"age\": 60, \"sex\": \"female\", \"site\": \"back\"}}")
    unknown = sorted(set(entry) - set(METADATA_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; choose from {list(METADATA_FIELDS)}")
    return {k: _check_field(k, v) for k, v in entry.items()}


def parse_metadata(n_files: int, fields: Mapping[str, str | None], metadata_json: str | None) -> list[dict[str, Any]]:
    """One metadata dict per uploaded file, from the form.

    Either the form fields ``age``, ``sex``, ``site`` (applied to every file of the request),
    or one form field ``metadata`` holding JSON: an object (applied to every file) or a list of
    objects, one per file in upload order. Not both. Empty values mean unknown.

    Raises:
        ValueError: naming the field and what it must look like.
    """
    given = {k: v for k, v in fields.items() if v is not None and v != ""}
    if metadata_json not in (None, "") and given:
        raise ValueError(f"give metadata either as the form fields {list(METADATA_FIELDS)} or as one JSON "
                         f"'metadata' field, not both (got {sorted(given)} and 'metadata')")
    if metadata_json in (None, ""):
        one = _one(given, "metadata form fields")
        return [dict(one) for _ in range(n_files)]
    try:
        parsed = json.loads(metadata_json, parse_int=_big_int)
    except json.JSONDecodeError as exc:
        raise ValueError(f"form field 'metadata' is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise ValueError("form field 'metadata' is nested too deeply: give one JSON object, or a list of "
                         "objects, with plain values") from None
    if isinstance(parsed, list):
        if len(parsed) != n_files:
            raise ValueError(f"form field 'metadata' lists {len(parsed)} objects for {n_files} uploaded files; "
                             "give one per file, in upload order, or one object for all")
        return [_one(e, f"metadata[{i}]") for i, e in enumerate(parsed)]
    one = _one(parsed, "form field 'metadata'")
    return [dict(one) for _ in range(n_files)]


def metadata_warnings(ens: ScoringEngine, metadata: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable notes on metadata the ensemble ignores (no metadata fusion, a field it does not use, an unseen site)."""
    given = sorted({k for m in metadata for k, v in m.items() if v is not None})
    if not given:
        return []
    if not ens.metadata_fields:
        return [f"this model was fused from images only; the metadata {given} is ignored"]
    notes = []
    unused = [k for k in given if k not in ens.metadata_fields]
    if unused:
        notes.append(f"this model does not use {unused}; it uses {list(ens.metadata_fields)}")
    sites = ens.known_sites
    if "site" in ens.metadata_fields and sites is not None:
        unseen = sorted({m["site"] for m in metadata if m.get("site") and m["site"] not in sites})
        if unseen:
            notes.append(f"site(s) {unseen} were not seen in fitting and count as unknown; known: {sorted(sites)}")
    return notes


def fusion_metadata(ens: ScoringEngine, metadata: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """What ``Ensemble.fuse`` takes: the fields it uses, per image; None for an images-only ensemble."""
    if not ens.metadata_fields:
        return None
    return [{k: m.get(k) for k in ens.metadata_fields} for m in metadata]


# ---------------------------------------------------------------- answers
def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def withheld_reason(d: PredictionDetails) -> str | None:
    """Why no decision is given for an image (the OOD gate or an image check flagged it), or None."""
    if not d.out_of_distribution:
        return None
    texts = [REASONS.get(r, "unlike the training images' features") for r in d.ood_reasons]
    return ("out of distribution: the image looks unlike the training images"
            + (f" ({'; '.join(texts)})" if texts else "") + "; the model's output is not a probability to trust")


def details_json(d: PredictionDetails, name: str, threshold: float, mid: str,
                 timing: Mapping[str, float]) -> dict[str, Any]:
    """One image's JSON: probabilities, decision, OOD verdict, model id and timing in ms.

    For an image flagged out of distribution the refusal is the answer: ``decision`` and
    ``melanoma_probability`` are null and ``withheld_reason`` says why; the model's number stays
    readable as ``raw_melanoma_probability`` (always given), for audits, not for decisions.
    """
    why = withheld_reason(d)
    p = _finite(d.melanoma_probability)
    return {
        "filename": name,
        "melanoma_probability": None if why else p,
        "decision": None if why else d.decision,
        "withheld_reason": why,
        "raw_melanoma_probability": p,
        "branch_probabilities": {v: _finite(q) for v, q in d.branch_probabilities.items()},
        "threshold": threshold,
        "in_distribution_score": _finite(d.in_distribution_score),
        "out_of_distribution": d.out_of_distribution,
        "ood_reasons": list(d.ood_reasons),
        "ood_reason_text": [REASONS.get(r, "unlike the training images' features") for r in d.ood_reasons],
        "ood_distance": _finite(d.ood_distance),
        "model_id": mid,
        "timing_ms": {k: round(v, 2) for k, v in timing.items()},
    }


def png_base64(rgb: np.ndarray) -> str:
    """An RGB uint8 image as a base64 PNG (no data: prefix)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def overlay(base: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """A heat map in [0, 1] drawn in the jet colour map over an RGB picture (the map is resized to it)."""
    h, w = base.shape[:2]
    heat = cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return np.clip(np.rint(base * (1.0 - alpha) + colour * alpha), 0, 255).astype(np.uint8)


def explanation_json(expl: Explanation, thresholds: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """The pictures of an ``Explanation`` as base64 PNGs: the image, what each branch receives, each heat map overlay.

    ``thresholds``: each branch's own validation threshold by view (``explaining.branch_thresholds``).
    """
    views, heatmaps = {}, {}
    for view, heat in expl.heatmaps.items():
        freq = view in expl.frequency_views
        array = expl.views[view]
        views[view] = {"png": png_base64(view_picture(view, array)), "caption": view_caption(view, array.shape[-1])}
        heatmaps[view] = {"png": png_base64(overlay(heat_base(expl, view), heat)), "over": "spectrum" if freq else "image",
                          "empty": heatmap_is_empty(heat), "threshold": (thresholds or {}).get(view)}
    return {"image_png": png_base64(expl.image), "views": views, "heatmaps": heatmaps,
            "heatmap_method": "Grad-CAM of each branch's melanoma logit at its last convolution (1 = strongest)"}


def model_summary(ens: ScoringEngine, mid: str) -> dict[str, Any]:
    """``GET /v1/model``: what the loaded bundle is, how it was validated, and its OOD gate."""
    m = ens.manifest
    ood = m.get("ood")
    gate = ({"present": True, **{k: ood.get(k) for k in ("threshold", "percentile", "n_fit", "n_val", "layer", "score",
                                                          "in_distribution_score")}}
            if ood and ens.gate is not None else {"present": False, "note": ens.ood_note})
    return {
        "model_id": mid,
        "views": list(ens.views),
        "method": m.get("method") or (m.get("source") or {}).get("method"),  # an export names its run's
        "threshold": ens.threshold,
        "threshold_rule": m.get("threshold_rule"),
        "metadata_fields": list(ens.metadata_fields),
        "known_sites": ens.known_sites,
        "image_size": ens.image_size,
        "load_size": ens.load_size,
        "dataset_fingerprint": m.get("dataset_fingerprint"),
        "split_seed": m.get("split_seed"),
        "n_validation": m.get("n_validation"),
        "created": m.get("created"),
        "versions": m.get("versions", {}),
        "validation_metrics": m.get("validation_metrics"),
        "fusion_weights": m.get("fusion_weights"),
        "ood_gate": gate,
        "calibration_caveat": CALIBRATION_CAVEAT,
        "notice": MODEL_NOTICE,
    }


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``time.perf_counter()`` read ``t0``."""
    return (time.perf_counter() - t0) * 1000.0
