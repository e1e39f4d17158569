"""Saving and loading a branch as a self-describing directory: model.keras, config.json, metadata.json."""

from __future__ import annotations

import datetime as _dt
import os
import zipfile
from pathlib import Path
from typing import Any

import keras

from colorspaces.files import atomic_path, library_versions, read_json_object, write_json_atomic
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


# What keras.models.load_model raises on a damaged .keras archive: a truncated or garbage file
# (ValueError "File not found", although the file is there), a bad CRC (BadZipFile), a missing
# member (KeyError), broken weights (OSError from h5py), a broken or foreign config (ValueError,
# JSONDecodeError, TypeError).
_MODEL_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)
_RETRAIN = "retrain this branch"
# Run facts that fuse and load compare across branches: each is absent, null or of this type.
_META_TYPES = {"dataset_fingerprint": str, "split_sha256": str, "split_seed": int}


def _tail(hint: str) -> str:
    return f"; {hint or _RETRAIN}"


def read_branch_info(directory: str | os.PathLike, hint: str = "") -> tuple[BranchConfig, dict[str, Any]]:
    """Read a branch's config and metadata without loading its model.

    Args:
        directory: a directory written by ``save_branch``.
        hint: what to do about a damaged branch, ending every message (default "retrain this branch"),
            e.g. the ``skinfusion train`` command that rewrites it.

    Raises:
        FileNotFoundError: if the directory or one of its files is missing.
        ValueError: naming the file, if ``config.json`` or ``metadata.json`` is damaged (not a JSON
            object, an unknown key, a value of the wrong type) or the metadata has an unsupported
            format version, label map or view.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: branch directory lacks {name}{_tail(hint)}")
    config_file, meta_file = directory / CONFIG_FILE, directory / METADATA_FILE
    values = read_json_object(config_file, hint=hint or _RETRAIN)
    try:
        config = BranchConfig.from_saved(values)
    except (KeyError, ValueError, TypeError) as exc:  # unknown key, wrong type or value, missing field
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"{config_file}: damaged, not a valid branch config ({reason}){_tail(hint)}") from None
    meta = read_json_object(meta_file, hint=hint or _RETRAIN)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: branch format version {meta.get('format_version')!r} is not supported "
            f"(this skinfusion reads version {FORMAT_VERSION}){_tail(hint)}"
        )
    if meta.get("label_map") != LABEL_MAP:
        raise ValueError(f"{meta_file}: label map {meta.get('label_map')} differs from {LABEL_MAP}{_tail(hint)}")
    if meta.get("view") != config.view:
        raise ValueError(f"{meta_file}: metadata view {meta.get('view')!r} != config view {config.view!r}{_tail(hint)}")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"{meta_file}: damaged, {key!r} must be of type {kind.__name__}, got {value!r}{_tail(hint)}")
    return config, meta


def load_branch(directory: str | os.PathLike, hint: str = "") -> tuple[keras.Model, BranchConfig, dict[str, Any]]:
    """Load a saved branch.

    Args:
        directory: a directory written by ``save_branch``.
        hint: what to do about a damaged branch (see ``read_branch_info``).

    Returns:
        ``(model, config, metadata)``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: "cannot load FILE: REASON" if ``model.keras`` is truncated or damaged; if the
            config or metadata is damaged or incompatible (see ``read_branch_info``), or the model's
            input shape disagrees with its config.
    """
    config, meta = read_branch_info(directory, hint)
    path = Path(directory) / MODEL_FILE
    if not zipfile.is_zipfile(path):
        # Keras would say "File not found" about a file that is there.
        raise ValueError(f"cannot load {path}: not a Keras archive (the file is truncated or damaged){_tail(hint)}")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except _MODEL_LOAD_ERRORS as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"cannot load {path}: {type(exc).__name__}: {reason}{_tail(hint)}") from None
    expected = (config.image_size, config.image_size, config.channels)
    shape = getattr(model, "input_shape", None)  # a foreign model may have several inputs, or none built
    if not isinstance(shape, tuple) or tuple(shape[1:]) != expected:
        raise ValueError(f"cannot load {path}: model input {shape} != config input (None, *{expected}){_tail(hint)}")
    return model, config, meta
