"""Loading and running an exported bundle (``skinfusion export``) without TensorFlow.

An export directory holds ``manifest.json`` (the SHA-256 of every other file), the branches'
model file (``model.onnx`` or ``model.tflite``: every branch in one graph, inputs named by
view, outputs the member probabilities and each branch's embedding), ``fusion.json``,
``preprocess.json`` and, when the source bundle had one, the pickle-free ``ood.npz`` gate.
Nothing is pickled. ``ExportedEnsemble`` scores images with onnxruntime or the LiteRT
interpreter; the views stay in NumPy (``colorspaces``), computed exactly as in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces.crops import window_offsets
from colorspaces.files import read_json_object, sha256_file
from colorspaces.labels import LABEL_MAP
from colorspaces.pipeline import Preprocess
from colorspaces.views import VIEWS
from ensemble.backends import input_is_view, require
from ensemble.formats import EXPORT_FORMATS
from ensemble.fusion_json import JsonFusion, finite_number
from ensemble.ood import OODGate
from ensemble.rundir import MANIFEST_FILE
from ensemble.scoring import ScoringEngine

EXPORT_KIND = "skinfusion-export"
EXPORT_FORMAT = 1
FUSION_JSON, PREPROCESS_JSON = "fusion.json", "preprocess.json"
DEFAULT_THREADS = 2  # the project's reference machine has 2 cores


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export directory (not a run or a Keras bundle), damaged or not.

    An export manifest says so; so does an export's own file (``preprocess.json``, or a model
    file without a ``fusion.joblib``) when the manifest is missing or unreadable, so that a
    damaged export is reported by ``read_export_manifest`` rather than loaded as a run.
    """
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("kind") == EXPORT_KIND:
                return True
        except (OSError, ValueError, AttributeError):
            pass  # damaged: the files beside it decide
    if (path / PREPROCESS_JSON).is_file():
        return True
    return any((path / f.file).is_file() for f in EXPORT_FORMATS.values()) and not (path / "fusion.joblib").is_file()




def check_graph(backend, model: dict[str, Any], views: list[str], recipe: list[dict[str, Any]], image_size: int,
                where: Path, pre_where: Path) -> None:
    """Check the manifest's ``model`` (``where``) and ``preprocess.json``'s sizes against the graph itself."""
    def bad(what: str, file: Path = where) -> ValueError:
        return ValueError(f"{file}: damaged, {what}; re-export the run (skinfusion export)")

    ins, outs = backend.graph_inputs, backend.graph_outputs
    for name, view, b in zip(model["inputs"], views, recipe):
        if name not in ins:
            raise bad(f"'model.inputs' names {name!r}, which is not an input of {model['file']} (its inputs: "
                      f"{sorted(ins)})")
        if not input_is_view(name, view):
            raise bad(f"'model.inputs' must list the graph's inputs in view order {views}; {name!r} is not the "
                      f"{view!r} input")
        shape, want = ins[name], [image_size, image_size, b.get("channels", 3)]
        if len(shape) != 4 or shape[1:] != want:
            raise bad(f"the graph's {name!r} input is {shape[1:] if len(shape) == 4 else shape} (H, W, C), "
                      f"this file makes {want} (image_size, channels)", pre_where)
    for name in (model["proba"], *model["embeddings"]):
        if name not in outs:
            raise bad(f"'model' names the output {name!r}, which {model['file']} lacks (its outputs: {sorted(outs)})")
    if outs[model["proba"]][-1:] != [len(views)]:
        raise bad(f"the graph's {model['proba']!r} output is {outs[model['proba']]}, not one column per view")
    got = [outs[n][-1] for n in model["embeddings"]]
    if list(model["embedding_dims"]) != got:
        raise bad(f"'model.embedding_dims' is {model['embedding_dims']}, the graph's embedding outputs are {got} wide")


def read_export_manifest(path: Path) -> dict[str, Any]:
    """Read and check an export's ``manifest.json``; every error names the file and the key."""
    hint = "re-export the run (skinfusion export --run RUN --out DIR)"
    m = read_json_object(path, required=("kind", "export_format", "format", "files", "model", "threshold",
                                         "views", "label_map"), hint=hint)

    def damaged(what: str) -> ValueError:
        return ValueError(f"{path}: damaged, {what}; {hint}")

    if m["kind"] != EXPORT_KIND:
        raise damaged(f"'kind' must be {EXPORT_KIND!r}")
    if m["export_format"] != EXPORT_FORMAT:
        raise ValueError(f"{path}: export format {m['export_format']!r} is not supported (expected {EXPORT_FORMAT}); "
                         f"{hint}")
    if m["format"] not in EXPORT_FORMATS:
        raise damaged(f"'format' must be one of {sorted(EXPORT_FORMATS)}, got {m['format']!r}")
    if m["label_map"] != LABEL_MAP:
        raise damaged(f"label map {m['label_map']} differs from {LABEL_MAP}")
    files = m["files"]
    if not (isinstance(files, dict) and files and all(isinstance(k, str) and isinstance(v, str) and "/" not in k
                                                      and k not in ("", ".", "..") for k, v in files.items())):
        raise damaged("'files' must map each bundle file name to its SHA-256")
    for needed in (m["model"].get("file") if isinstance(m["model"], dict) else None, FUSION_JSON, PREPROCESS_JSON):
        if needed not in files:
            raise damaged(f"'files' lacks {needed!r}")
    views = m["views"]
    if not (isinstance(views, list) and views and all(isinstance(v, str) and v in VIEWS for v in views)):
        raise damaged(f"'views' must list known views, got {views!r}")
    model = m["model"]
    if not (isinstance(model.get("inputs"), list) and len(model["inputs"]) == len(views)
            and isinstance(model.get("proba"), str) and isinstance(model.get("embeddings"), list)
            and len(model["embeddings"]) == len(views)
            and all(isinstance(n, str) for n in model["inputs"] + model["embeddings"])):
        raise damaged("'model' must name one input and one embedding output per view, and the 'proba' output")
    dims = model.get("embedding_dims")
    if not (isinstance(dims, list) and len(dims) == len(views)
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise damaged(f"'model.embedding_dims' must be {len(views)} positive whole numbers (one per view), got {dims!r}")
    if not finite_number(m["threshold"]) or not 0.0 <= m["threshold"] <= 1.0:
        raise damaged(f"'threshold' must be a number in [0, 1], got {m['threshold']!r}")
    ood = m.get("ood")
    if ood is not None and not (isinstance(ood, dict) and ood.get("file") in files and finite_number(ood.get("threshold"))
                                and finite_number(ood.get("percentile"))):
        raise damaged("'ood' must name a listed file and hold a numeric 'threshold' and 'percentile'")
    return m


def _check_preprocess(pre: dict[str, Any], views: list[str], where: Path) -> list[dict[str, Any]]:
    """The per-branch recipe of ``preprocess.json``, checked against the manifest's views."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{where}: damaged, {what}; re-export the run (skinfusion export)")

    for key in ("image_size", "load_size"):
        if not isinstance(pre.get(key), int) or isinstance(pre.get(key), bool) or pre[key] < 16:
            raise bad(f"{key!r} must be a whole number >= 16, got {pre.get(key)!r}")
    if pre["load_size"] < pre["image_size"]:
        raise bad("'load_size' is below 'image_size'")
    branches = pre.get("branches")
    if not (isinstance(branches, list) and [b.get("view") if isinstance(b, dict) else None for b in branches] == views):
        raise bad(f"'branches' must describe the views {views} in order")
    from colorspaces.constancy import CONSTANCY

    for b in branches:
        if b.get("color_constancy") not in CONSTANCY or not isinstance(b.get("crop_stride"), int) or b["crop_stride"] < 0:
            raise bad(f"branch {b['view']!r} needs a known 'color_constancy' and a 'crop_stride' >= 0")
    if len({len(window_offsets(pre["load_size"], pre["image_size"], b["crop_stride"])) for b in branches}) != 1:
        raise bad("the branches cut different numbers of windows")
    return branches


class ExportedEnsemble(ScoringEngine):
    """An exported bundle loaded for inference: the shared ``ScoringEngine`` over the exported graph, without TensorFlow.

    Args:
        path: the export directory.
        threads: intra-op threads of onnxruntime / LiteRT.

    Raises:
        FileNotFoundError: if the directory, its manifest or a listed file is missing.
        ValueError: if a file's SHA-256 differs from the manifest (checked before anything is
            loaded), or a file is damaged or does not fit the others; every message names the file.
    """

    no_gate_note = ("this export has no out-of-distribution gate (its source bundle had none): in_distribution_score "
                    "is empty and only the image-level checks run")

    def __init__(self, path: str | os.PathLike, threads: int = DEFAULT_THREADS):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such export directory; check the path, or write one with "
                                    "`skinfusion export --run RUN --out DIR`")
        manifest_path = self.path / MANIFEST_FILE
        self.manifest = m = read_export_manifest(manifest_path)
        for name, digest in m["files"].items():  # every hash before any file is parsed
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}: export file listed in {manifest_path} is missing; re-export the run")
            if sha256_file(file) != digest:
                raise ValueError(f"{file}: SHA-256 differs from {manifest_path}; the export was modified, refusing "
                                 "to load it (re-export the run with `skinfusion export`)")
        self.format = m["format"]
        self.views = list(m["views"])
        self.threshold = float(m["threshold"])
        fusion_path, pre_path = self.path / FUSION_JSON, self.path / PREPROCESS_JSON
        self.fusion = JsonFusion(read_json_object(fusion_path), len(self.views), str(fusion_path))
        self.metadata_fields = self.fusion.fields
        pre = read_json_object(pre_path)
        self.recipe = _check_preprocess(pre, self.views, pre_path)
        self.preprocess = Preprocess.from_dict(pre)
        model_path = self.path / m["model"]["file"]
        fmt = EXPORT_FORMATS[self.format]
        lib = require(fmt.runtime_module, f"a {self.format} export")  # outside the try: a missing package is not a bad file
        try:
            self.backend = fmt.backend(lib, model_path, threads)
        except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for a bad model file
            raise ValueError(f"cannot load {model_path}: {type(exc).__name__}: {str(exc).strip()[:300]}; "
                             "re-export the run (skinfusion export)") from None
        check_graph(self.backend, m["model"], self.views, self.recipe, self.image_size, manifest_path, pre_path)
        self.backend.bind(m["model"])
        self.pipeline_rows = self.backend.pipeline_rows
        self.embedding_dims = [int(d) for d in m["model"]["embedding_dims"]]
        self.gate = None
        if m.get("ood") is not None:
            ood = m["ood"]
            self.gate = OODGate.load(self.path / ood["file"], ood, self.embedding_dims,
                                     "re-export the run (skinfusion export)")

    def forward(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``[P, embedding_1, ..., embedding_m]`` of the branches' view arrays, from the exported graph."""
        return self.backend(xs)
