"""Helpers shared by the test files: image writers, separable image sets and manifest re-signing.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``; ``tests`` is
never installed as a package). Fixtures live in ``conftest.py``; plain functions live here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np


def write_rgb(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image to ``path`` (OpenCV stores BGR, so the channels are swapped here).

    The format follows the suffix; missing folders are made. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(rgb)
    pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    assert cv2.imwrite(str(path), pixels), f"could not write {path}"
    return path


def write_random_images(folder: str | os.PathLike, n: int, rng: np.random.Generator,
                        size: tuple[int, int] = (30, 40), suffix: str = ".png") -> list[str]:
    """``n`` noise images ``img00.png``... of ``size`` (H, W) in ``folder``; returns their paths."""
    return [str(write_rgb(Path(folder) / f"img{i:02d}{suffix}", rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
            for i in range(n)]


def separable_images(n: int, size: int, rng: np.random.Generator, positive_every: int = 4,
                     dark: int = 60, bright: int = 190, noise: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """A problem any working branch learns: dark noisy squares are melanoma (1), bright ones nevus (0).

    Every ``positive_every``-th image is positive. Returns ``(images (n, size, size, 3) uint8, y)``.
    """
    y = (np.arange(n) % positive_every == 0).astype(int)
    base = np.where(y[:, None, None, None] == 1, dark, bright)
    images = np.clip(base + rng.integers(-noise, noise, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, y


def rehash_manifest(ens_dir: str | os.PathLike) -> dict:
    """Re-sign a bundle's manifest after its branch files were edited, as a deliberate swap would.

    Returns the rewritten manifest.
    """
    from ensemble.bundle import sha256_file

    ens_dir = Path(ens_dir)
    manifest = json.loads((ens_dir / "manifest.json").read_text())
    for b in manifest["branches"]:
        b["files"] = {name: sha256_file(ens_dir / b["path"] / name) for name in b["files"]}
    (ens_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def fixture_branches_on_split(data: str | os.PathLike, run: str | os.PathLike, fixture: str | os.PathLike,
                              views=("rgb", "hsv", "fft")) -> tuple[list, list[Path]]:
    """Split ``data`` into ``run`` and copy in the committed 16-px branches of ``fixture`` with hand-made,
    seeded validation scores (melanomas higher), ready to fuse without training.

    Returns:
        ``(validation records, branch directories)``.
    """
    import shutil

    from skinfusion.workflows.runsplit import prepare_split

    index, assign, _ = prepare_split(str(data), str(run))
    val = [r for r in index.records if assign[r.image_id] == "val"]
    rng = np.random.default_rng(0)
    dirs = []
    for view in views:
        bdir = Path(shutil.copytree(Path(fixture) / "branches" / view, Path(run) / "branches" / view))
        lines = "".join(f"{r.image_id},{r.label},{np.clip(0.3 + 0.4 * r.label + rng.normal(0, 0.2), 0.01, 0.99):.6f}\n"
                        for r in val)
        (bdir / "val_predictions.csv").write_text("image_id,label,melanoma_proba\n" + lines)
        dirs.append(bdir)
    return val, dirs
