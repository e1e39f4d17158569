"""An on-disk cache of decoded, resized images, so branches and runs decode each JPEG once.

A cache holds the RGB uint8 images of one list of files at one size, in a flat binary file
that is read a batch at a time (``os.pread``), so memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from colorspaces.image import RESIZE_RECIPE
from colorspaces.lesion import LESION_RECIPE
from skinfusion.data.index import load_images

logger = logging.getLogger(__name__)

CACHE_ENV = "SKINFUSION_CACHE"
CACHE_FORMAT = 1
_CHUNK = 256  # images decoded per chunk while building: bounds the build's memory


def default_cache_dir() -> Path:
    """``$SKINFUSION_CACHE``, else ``~/.cache/skinfusion``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "skinfusion"


class ImageCache:
    """Read-only array-like view of a cache file: ``cache[idx]`` returns RGB uint8 (n, S, S, 3).

    Rows are read with ``os.pread`` on demand rather than memory-mapped, so the pages a
    training run touches are not charged to its resident memory.
    """

    def __init__(self, path: str | os.PathLike, n: int, size: int):
        self.path, self.n, self.size = Path(path), int(n), int(size)
        self._row = self.size * self.size * 3
        expected = self.n * self._row
        actual = self.path.stat().st_size
        if actual != expected:
            raise ValueError(f"{self.path}: cache file has {actual} bytes, expected {expected} for {n} images at {size}px")
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.size, self.size, 3)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(self.n)[index]
        scalar = np.ndim(index) == 0
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"index out of range for a cache of {self.n} images")
        idx = np.where(idx < 0, idx + self.n, idx)
        out = np.empty((len(idx), self.size, self.size, 3), np.uint8)
        # Read in file order (sequential I/O), then place each row where it was asked for.
        for pos in np.argsort(idx, kind="stable"):
            buf = os.pread(self._fd, self._row, int(idx[pos]) * self._row)
            out[pos] = np.frombuffer(buf, np.uint8).reshape(self.size, self.size, 3)
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        arr = self[np.arange(self.n)]
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        """Close the file descriptor (also done when the object is garbage-collected)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def __getstate__(self):
        # Picklable for worker processes: reopen the file on the other side.
        return {"path": str(self.path), "n": self.n, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["path"], state["n"], state["size"])


def cache_key(paths: Sequence[str], size: int, lesion_margin: float | None = None) -> str:
    """Key of a cache: the resize recipe (with the lesion crop, if any), the size, and each file's path, byte size and mtime."""
    recipe = RESIZE_RECIPE if lesion_margin is None else f"{LESION_RECIPE}:{lesion_margin!r}|{RESIZE_RECIPE}"
    h = hashlib.sha256(f"{CACHE_FORMAT}|{recipe}|{size}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(p)}|missing\n".encode())
    return h.hexdigest()[:24]


def cached_images(paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int = 2, desc: str = "images",
                  lesion_margin: float | None = None) -> tuple[ImageCache, np.ndarray, list[tuple[str, str]]]:
    """Decode and resize ``paths`` into a disk cache (or reuse one), skipping unreadable files.

    The cache is keyed by :func:`cache_key`, so every branch of a run, and every later run on
    the same files at the same size, reuses it. It is built in chunks and renamed into place
    when complete, so an interrupted build leaves no partial cache behind.

    Args:
        paths: image files.
        size: square side in pixels.
        cache_dir: where caches live (default :func:`default_cache_dir`).
        workers: decoding threads.
        desc: what to call the images in progress messages.
        lesion_margin: if given, each image is cropped to its lesion before the resize
            (``colorspaces.lesion.crop_to_lesion``; a cache of its own).

    Returns:
        ``(cache, ok, failures)``: the images that loaded, their indices into ``paths``, and
        ``(path, reason)`` for the rest (same contract as ``skinfusion.data.index.load_images``).
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size, lesion_margin)
    data_file, meta_file = root / f"{key}-{size}px.u8", root / f"{key}-{size}px.json"
    if data_file.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        try:
            cache = ImageCache(data_file, len(meta["ok"]), size)
        except ValueError as exc:
            logger.warning("rebuilding a damaged cache: %s", exc)
        else:
            logger.info("%s: reusing decoded-image cache %s (%d images, %d px)", desc, data_file, cache.n, size)
            return cache, np.asarray(meta["ok"], dtype=int), [tuple(f) for f in meta["failures"]]

    t0 = time.perf_counter()
    ok, failures = [], []
    tmp = data_file.with_name(f".{data_file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for start in range(0, len(paths), _CHUNK):
                chunk = list(paths[start : start + _CHUNK])
                imgs, ok_chunk, fails = load_images(chunk, size, workers=workers, desc=desc, log_progress=False,
                                                      lesion_margin=lesion_margin)
                fh.write(np.ascontiguousarray(imgs).tobytes())
                ok.extend(int(i) + start for i in ok_chunk)
                failures.extend(fails)
                done = min(start + _CHUNK, len(paths))
                if done == len(paths) or (start // _CHUNK) % 8 == 7:
                    logger.info("decoded %d/%d %s into the cache (%.0fs)", done, len(paths), desc, time.perf_counter() - t0)
        os.replace(tmp, data_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta_tmp = meta_file.with_name(f".{meta_file.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps({"format": CACHE_FORMAT, "size": size, "n_paths": len(paths),
                                    "ok": ok, "failures": failures}))
    os.replace(meta_tmp, meta_file)
    logger.info("%s: cached %d images at %d px in %s (%.1f MB, %.0fs)", desc, len(ok), size, data_file,
                data_file.stat().st_size / 1e6, time.perf_counter() - t0)
    return ImageCache(data_file, len(ok), size), np.asarray(ok, dtype=int), failures
