"""Saving and loading a branch as a self-describing directory: model.keras, config.json, metadata.json."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import keras

from colorspaces.files import atomic_path, library_versions, write_json_atomic
from colorspaces.labels import LABEL_MAP
from models.branch import BranchConfig

FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE, METADATA_FILE = "model.keras", "config.json", "metadata.json"


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
