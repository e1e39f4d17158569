"""Saving and loading a branch as a self-describing directory: model.keras, config.json, metadata.json."""

from __future__ import annotations

import datetime as _dt
import contextlib
import json
import os
import threading
import uuid
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any, Iterator

import keras

from models.branch import BranchConfig

FORMAT_VERSION = 1
LABEL_MAP = {"0": "nevus", "1": "melanoma"}
MODEL_FILE, CONFIG_FILE, METADATA_FILE = "model.keras", "config.json", "metadata.json"


def library_versions() -> dict[str, str]:
    """Installed versions of skinfusion and the libraries that shape its artifacts."""
    out = {}
    for dist in ("skinfusion", "keras", "tensorflow", "tensorflow-cpu", "numpy", "opencv-python-headless", "scikit-learn"):
        try:
            out[dist] = _importlib_metadata.version(dist)
        except _importlib_metadata.PackageNotFoundError:
            continue
    return out


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _tmp_beside(path: Path) -> Path:
    # Same directory (so the rename is atomic), unique per process and thread, normal permissions.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or kill mid-write leaves the old file (or none), never a torn one.
    """
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """``open(path, mode)`` that writes a temporary file and renames it into place on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves a torn file.

    NaN (an undefined metric) is written as ``null``, since NaN is not valid JSON.
    """
    with atomic_open(path) as fh:
        json.dump(_nan_to_none(payload), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")


def save_branch(directory: str | os.PathLike, model: keras.Model, config: BranchConfig, metadata: dict[str, Any]) -> Path:
    """Save a trained branch as ``model.keras``, ``config.json`` and ``metadata.json``.

    Args:
        directory: target directory (created if needed).
        model: the trained branch model.
        config: the config it was built and trained with.
        metadata: run facts to record (split seed, dataset fingerprint, validation metrics, ...);
            format version, creation time, library versions, view, input size and label map
            are added here.

    Returns:
        The directory path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        keras_tmp = tmp.with_suffix(".keras")  # Keras insists on the suffix
        try:
            model.save(keras_tmp)
            os.replace(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)
    write_json_atomic(directory / CONFIG_FILE, config.to_dict())
    meta = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "view": config.view,
        "input_size": [config.image_size, config.image_size, config.channels],
        "label_map": LABEL_MAP,
        "parameter_count": int(model.count_params()),
    }
    write_json_atomic(directory / METADATA_FILE, meta)
    return directory


def read_branch_info(directory: str | os.PathLike) -> tuple[BranchConfig, dict[str, Any]]:
    """Read a branch's config and metadata without loading its model.

    Raises:
        FileNotFoundError: if the directory or one of its files is missing.
        ValueError: if the metadata has an unsupported format version or label map.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: branch directory lacks {name}")
    config = BranchConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    meta = json.loads((directory / METADATA_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: branch format version {meta.get('format_version')!r} is not supported "
            f"(this skinfusion reads version {FORMAT_VERSION})"
        )
    if meta.get("label_map") != LABEL_MAP:
        raise ValueError(f"{directory}: label map {meta.get('label_map')} differs from {LABEL_MAP}")
    if meta.get("view") != config.view:
        raise ValueError(f"{directory}: metadata view {meta.get('view')!r} != config view {config.view!r}")
    return config, meta


def load_branch(directory: str | os.PathLike) -> tuple[keras.Model, BranchConfig, dict[str, Any]]:
    """Load a saved branch.

    Args:
        directory: a directory written by ``save_branch``.

    Returns:
        ``(model, config, metadata)``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if the metadata is incompatible or the model's input shape disagrees with its config.
    """
    config, meta = read_branch_info(directory)
    model = keras.models.load_model(Path(directory) / MODEL_FILE, compile=False, safe_mode=True)
    expected = (config.image_size, config.image_size, config.channels)
    if tuple(model.input_shape[1:]) != expected:
        raise ValueError(f"{directory}: model input {model.input_shape[1:]} != config input {expected}")
    return model, config, meta
