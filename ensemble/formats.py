"""The one table of export formats: for each, its model file, converter, runtime backend and packages.

``skinfusion export --format``, ``predict --backend``, the export runtime (``ensemble.runtime``) and
the export benchmark all read ``EXPORT_FORMATS``; a new format is one entry here, a converter in
``ensemble.converters`` and a backend in ``ensemble.backends``. No TensorFlow is imported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ensemble.backends import EXTRA_HINT, OnnxBackend, TfliteBackend
from ensemble.converters import OPSET, to_onnx, to_tflite


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: the ``--format`` / ``--backend`` value, recorded in the export's manifest.
        file: the model file's name in the export directory.
        runtime: what scores it, for help texts.
        runtime_module: the package the runtime backend imports.
        backend: the ``ensemble.backends`` class that loads and runs the file.
        convert: the ``ensemble.converters`` function that writes the file from a Keras ensemble.
        export_modules: the packages writing (and checking) an export needs.
        distributions: the package distributions whose versions the manifest records.
        opset: the graph's operator-set version, recorded in the manifest (None: not versioned so).
        bench_quantize: the quantisations ``bench_export`` measures besides float32.
    """

    name: str
    file: str
    runtime: str
    runtime_module: str
    backend: type
    convert: Callable[..., dict[str, Any]]
    export_modules: tuple[str, ...]
    distributions: tuple[str, ...]
    opset: int | None = None
    bench_quantize: tuple[str, ...] = ()


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", "model.onnx", "onnxruntime", "onnxruntime", OnnxBackend, to_onnx,
                 ("tf2onnx", "onnxruntime"), ("onnx", "tf2onnx", "onnxruntime"), OPSET, ("int8",)),
    ExportFormat("tflite", "model.tflite", "LiteRT", "ai_edge_litert.interpreter", TfliteBackend, to_tflite,
                 ("ai_edge_litert.interpreter",), ("ai-edge-litert",)),
)}
DEFAULT_FORMAT = next(iter(EXPORT_FORMATS))


def export_format(name: str, flag: str = "--format") -> ExportFormat:
    """The table entry of a format.

    Raises:
        ValueError: naming ``flag`` and the choices, if ``name`` is not one of ``EXPORT_FORMATS``.
    """
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ValueError(f"{flag} must be one of {sorted(EXPORT_FORMATS)}, got {name!r}") from None


def formats_help() -> str:
    """``onnx (onnxruntime) or tflite (LiteRT)``: the formats and their runtimes, for help texts."""
    return " or ".join(f"{f.name} ({f.runtime})" for f in EXPORT_FORMATS.values())


__all__ = ["DEFAULT_FORMAT", "EXPORT_FORMATS", "EXTRA_HINT", "ExportFormat", "export_format", "formats_help"]
