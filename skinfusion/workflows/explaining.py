"""Grad-CAM pictures for people: an overlay PNG per branch and one panel PNG per image (``skinfusion explain``).

Per image ``NAME`` (``output_names``) the folder gets ``NAME.VIEW.png`` for every branch, the
branch's heat map over the photo (spatial views) or over its spectrum (fft, whose axes are
frequencies), and ``NAME.panel.png``: the image, each view rendered as a picture, the heat maps
and the per-branch and fused probabilities with the threshold.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from colorspaces import VIEWS, ImageError
from colorspaces.files import atomic_path
from ensemble.api import Explanation, explain_with
from ensemble.scoring import ScoringEngine

logger = logging.getLogger(__name__)

NOT_A_DEVICE = "Research software, not a medical device: not for diagnosis or treatment decisions."
FREQUENCY_CAPTION = "frequency space: centre = low frequencies"
HEAT_ALPHA = 0.45  # enough heat to read, enough photo to see what it lies on

# A view's float channels back to 8-bit RGB, for the views OpenCV converts (scale per channel, code).
_TO_RGB = {
    "hsv": ((180.0, 255.0, 255.0), cv2.COLOR_HSV2RGB),
    "lab": ((255.0, 255.0, 255.0), cv2.COLOR_LAB2RGB),
    "ycrcb": ((255.0, 255.0, 255.0), cv2.COLOR_YCrCb2RGB),
}


def output_names(paths: Sequence[str]) -> list[str]:
    """A distinct file-name stem per image: its stem, lengthened only where two images would collide.

    ``a/x.png`` and ``b/x.png`` become ``a_x`` and ``b_x``; ``x.png`` and ``x.jpg`` become
    ``x_png`` and ``x_jpg``; the same path given twice gets ``-2``.
    """
    parts = [Path(os.path.abspath(p)) for p in paths]
    unique = list(dict.fromkeys(parts))  # the same file twice is not a collision to lengthen names for

    def name(p: Path, level: int) -> str:
        # level 0: the stem; 1: the file name; 2+: that many - 1 folders above it as well.
        if level == 0:
            return p.stem
        folders = list(p.parent.parts[1:])[len(p.parent.parts[1:]) - (level - 1):] if level > 1 else []
        return "_".join([*folders, p.name.replace(".", "_")])

    levels = dict.fromkeys(unique, 0)
    for _ in range(max((len(p.parts) for p in unique), default=0) + 1):
        counts = Counter(name(p, lv) for p, lv in levels.items())
        clashes = [p for p, lv in levels.items() if counts[name(p, lv)] > 1]
        if not clashes:
            break
        for p in clashes:
            levels[p] += 1
    names, seen = [], Counter()
    for p in parts:
        base = name(p, levels[p])
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def render_view(view: str, array: np.ndarray, frequency: bool = False) -> np.ndarray:
    """A view array (H × W × C floats) as an RGB uint8 picture.

    RGB is shown as it is; HSV, LAB and YCrCb are converted back to RGB from their channels; a
    frequency view (fft) is its log-magnitude averaged over channels, in grey; any other view
    shows its first three channels, each stretched to 0-255.
    """
    a = np.asarray(array, np.float32)
    if frequency:
        grey = a.mean(axis=-1)
        return np.repeat(_stretch(grey)[..., None], 3, axis=-1)
    if view == "rgb":
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if view in _TO_RGB:
        scale, code = _TO_RGB[view]
        top = np.array([179.0 if view == "hsv" else 255.0, 255.0, 255.0], np.float32)
        eight = np.clip(np.rint(a * np.array(scale, np.float32)), 0, top).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(eight), code)
    return np.stack([_stretch(a[..., min(c, a.shape[-1] - 1)]) for c in range(3)], axis=-1)


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape, np.uint8) if hi <= lo else np.rint((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _caption(expl: Explanation, view: str) -> str:
    p = expl.branch_probabilities[view]
    where = FREQUENCY_CAPTION.replace(": ", ":\n") if view in expl.frequency_views else "over the image"
    empty = "\n(no region raises the logit)" if not expl.heatmaps[view].any() else ""
    return f"{view} branch: p = {p:.3f}\nGrad-CAM, melanoma logit,\n{where}{empty}"


def _base(expl: Explanation, view: str) -> np.ndarray:
    """What a branch's heat map lies over: the spectrum for a frequency view, else the photo."""
    if view in expl.frequency_views:
        return render_view(view, expl.views[view], frequency=True)
    return expl.image


def _draw_overlay(ax, expl: Explanation, view: str) -> None:
    ax.imshow(_base(expl, view), interpolation="nearest")
    ax.imshow(expl.heatmaps[view], cmap="jet", alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_title(_caption(expl, view), fontsize=8)
    ax.axis("off")


def _verdict(expl: Explanation) -> str:
    d = expl.details
    ood = {True: "; looks UNLIKE the training images, do not trust it", False: "", None: ""}[d.out_of_distribution]
    return (f"fused melanoma probability {d.melanoma_probability:.3f} (threshold {expl.threshold:.3f}) -> "
            f"{d.decision}{ood}")


def _pyplot():
    # Imported here, as in report.py: matplotlib is slow to import, and Agg must be chosen
    # before pyplot is first imported (no display on servers and CI).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def write_overlay(expl: Explanation, view: str, path: str | os.PathLike) -> Path:
    """One branch's heat map over the photo (or, for fft, its spectrum), captioned, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 4.2), dpi=110)
    _draw_overlay(ax, expl, view)
    fig.text(0.5, 0.02, NOT_A_DEVICE, ha="center", fontsize=5, wrap=True)
    _save(fig, Path(path))
    return Path(path)


def write_panel(expl: Explanation, path: str | os.PathLike, title: str = "") -> Path:
    """The image, its views, every branch's heat map and the probabilities, in one PNG."""
    plt = _pyplot()
    views = list(expl.heatmaps)
    cols = 1 + len(views)
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols, 6.8), dpi=110, squeeze=False)
    axes[0, 0].imshow(expl.image, interpolation="nearest")
    axes[0, 0].set_title("image (as the branches see it)", fontsize=8)
    for j, view in enumerate(views, start=1):
        freq = view in expl.frequency_views
        axes[0, j].imshow(render_view(view, expl.views[view], frequency=freq), interpolation="nearest")
        what = FREQUENCY_CAPTION if freq else (VIEWS[view].description if view in VIEWS else view)
        axes[0, j].set_title(f"{view} view\n" + textwrap.fill(what, 30), fontsize=7)
        _draw_overlay(axes[1, j], expl, view)
    lines = [f"{v}: {expl.branch_probabilities[v]:.3f}" for v in views]
    axes[1, 0].text(0.0, 0.95, "branch melanoma\nprobabilities\n\n" + "\n".join(lines), va="top", fontsize=9,
                    family="monospace")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.06, _verdict(expl), ha="center", fontsize=9, weight="bold")
    fig.text(0.5, 0.02, NOT_A_DEVICE, ha="center", fontsize=8)
    fig.subplots_adjust(bottom=0.14, top=0.86, hspace=0.45)
    _save(fig, Path(path))
    return Path(path)


def write_explanation(expl: Explanation, out_dir: str | os.PathLike, name: str, title: str = "") -> list[Path]:
    """Write ``NAME.VIEW.png`` for every branch and ``NAME.panel.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    written = [write_overlay(expl, view, out / f"{name}.{view}.png") for view in expl.heatmaps]
    return [*written, write_panel(expl, out / f"{name}.panel.png", title)]


def explain_files(ens: ScoringEngine, paths: Sequence[str], out_dir: str | os.PathLike,
                  metadata: dict[str, dict] | None = None,
                  on_image: Callable[[str, list[Path]], None] | None = None,
                  ) -> tuple[list[tuple[str, list[Path]]], list[tuple[str, str]]]:
    """Explain image files one at a time and write their PNGs; unreadable files are skipped, not raised.

    Args:
        ens: the loaded ensemble.
        paths: image files.
        out_dir: the output folder (made if missing).
        metadata: path → metadata dict, for an ensemble fused with metadata.
        on_image: called with each image's path and the files written for it.

    Returns:
        ``(written, skipped)``: ``(path, files)`` per explained image and ``(path, reason)`` per
        unreadable one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path, name in zip(paths, output_names(paths)):
        # An image the metadata CSV does not list is explained with every field unknown, as predict scores it.
        meta = ((metadata or {}).get(path) or {}) if ens.metadata_fields else None
        try:
            expl = explain_with(ens, path, meta)
        except ImageError as exc:
            logger.warning("skipped %s", exc)
            skipped.append((path, str(exc)))
            continue
        files = write_explanation(expl, out, name, title=str(path))
        written.append((path, files))
        if on_image is not None:
            on_image(path, files)
    return written, skipped
