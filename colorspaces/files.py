"""Generic file helpers every layer shares: atomic writes, JSON with NaN as null, library versions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_json_object(path: str | os.PathLike, required: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """Read a JSON file that must hold an object, naming the file in every error.

    Args:
        path: the file.
        required: keys the object must have.
        hint: what to do about a damaged file (appended to the message), e.g. "re-run `skinfusion fuse`".

    Returns:
        The object.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not UTF-8 JSON, not an object, or lacks a required key.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing{tail}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged, not valid JSON ({exc}){tail}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: damaged, holds a JSON {type(value).__name__} where an object is expected{tail}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"{path}: damaged, lacks {', '.join(map(repr, missing))}{tail}")
    return value


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """Refuse an output file path that cannot be written, before any work starts.

    Returns:
        The path.

    Raises:
        ValueError: if it names a directory.
        FileNotFoundError: if its folder does not exist.
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{flag} {out}: folder {out.parent} does not exist; create it or choose another")
    return out
