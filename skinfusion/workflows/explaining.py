"""Grad-CAM pictures for people: an overlay PNG per branch and one panel PNG per image (``skinfusion explain``).

Per image ``NAME`` (``output_names``) the folder gets ``NAME.VIEW.png`` for every branch, the
branch's heat map over the photo (spatial views) or over its spectrum (fft, whose axes are
frequencies), and ``NAME.panel.png``: the image, what each branch receives (its view's channels
side by side, as greyscale tiles), the heat maps, each branch's probability beside its own
validation threshold, and the fused probability with the threshold; for an image the OOD gate
flags, the headline is that no decision is given. What a view looks like comes from its
``colorspaces.VIEWS`` entry (``channel_names``, ``display_range``, ``frequency``).
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from colorspaces import VIEWS, ImageError
from colorspaces.files import atomic_path
from ensemble.api import Explanation, explain_with
from ensemble.scoring import ScoringEngine

logger = logging.getLogger(__name__)

NOT_A_DEVICE = "Research software, not a medical device: not for diagnosis or treatment decisions."
FREQUENCY_CAPTION = "frequency space: centre = low frequencies"
HEAT_ALPHA = 0.45  # enough heat to read, enough photo to see what it lies on
EMPTY_SHARE = 0.005  # a heat map with evidence on fewer pixels than this is reported as empty


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


def view_picture(view: str, array: np.ndarray) -> np.ndarray:
    """What a branch receives, as an RGB uint8 picture: each channel of its view array a greyscale tile, side by side.

    A channel of a view with a ``display_range`` (``colorspaces.ViewSpec``) is drawn on that fixed
    scale, black to white, so that its tiles compare (a grey hue tile is hue 0.5, not a
    stretched contrast); a view without one (fft, z-scored) has each channel stretched.
    Converting HSV back to RGB would show the photo again, not what the branch gets.
    """
    a = np.asarray(array, np.float32)
    spec = VIEWS.get(view)
    span = spec.display_range if spec is not None else None
    tiles = []
    for k in range(a.shape[-1]):
        if span is None:
            tiles.append(_stretch(a[..., k]))
        else:
            lo, hi = span
            tiles.append(np.clip(np.rint((a[..., k] - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8))
    gap = np.full((a.shape[0], max(1, a.shape[1] // 16)), 255, np.uint8)
    row = np.concatenate([part for t in tiles for part in (gap, t)][1:], axis=1)
    return np.repeat(row[..., None], 3, axis=-1)


def view_caption(view: str, channels: int) -> str:
    """The caption of ``view_picture``: the channels left to right and how they are drawn."""
    spec = VIEWS.get(view)
    names = " | ".join(spec.channel_name(k) if spec else f"c{k}" for k in range(channels))
    if spec is None or spec.display_range is None:
        scale = "each stretched black to white"
    else:
        scale = f"grey {spec.display_range[0]:g} = black, {spec.display_range[1]:g} = white"
    where = f"; {FREQUENCY_CAPTION}" if spec is not None and spec.frequency else ""
    return f"what the branch receives: {names} ({scale}){where}"


def spectrum_picture(array: np.ndarray) -> np.ndarray:
    """A frequency view's channels averaged into one grey spectrum (what its heat map is drawn over)."""
    grey = _stretch(np.asarray(array, np.float32).mean(axis=-1))
    return np.repeat(grey[..., None], 3, axis=-1)


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape, np.uint8) if hi <= lo else np.rint((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def heatmap_is_empty(heat: np.ndarray) -> bool:
    """Whether a normalised Grad-CAM map is (nearly) empty: under 0.5% of its pixels reach 5% of its peak.

    Grad-CAM keeps only evidence *for* melanoma (a ReLU of the weighted maps); when the last
    convolution's maps all weigh against it, nothing is left. That is a limit of the method on
    that image, not proof the branch looked at nothing.
    """
    heat = np.asarray(heat)
    return heat.size == 0 or float(np.mean(heat > 0.05)) < EMPTY_SHARE


def branch_thresholds(ens) -> dict[str, float | None]:
    """Each branch's own validation threshold (the manifest's ``validation_metrics``), by view."""
    val = ens.manifest.get("validation_metrics") or {}
    return {v: (val.get(v) or {}).get("threshold") if isinstance(val.get(v), dict) else None for v in ens.views}


def _branch_line(expl: Explanation, view: str, thresholds: dict[str, float | None]) -> str:
    t = thresholds.get(view)
    return f"p = {expl.branch_probabilities[view]:.3f}" + ("" if t is None else f" (its threshold {t:.3f})")


def _caption(expl: Explanation, view: str, thresholds: dict[str, float | None]) -> str:
    where = FREQUENCY_CAPTION.replace(": ", ":\n") if view in expl.frequency_views else "over the image"
    empty = "\nEMPTY: no region raises the logit" if heatmap_is_empty(expl.heatmaps[view]) else ""
    return f"{view} branch: {_branch_line(expl, view, thresholds)}\nGrad-CAM, melanoma logit,\n{where}{empty}"


def heat_base(expl: Explanation, view: str) -> np.ndarray:
    """What a branch's heat map lies over: the spectrum for a frequency view, else the photo."""
    if view in expl.frequency_views:
        return spectrum_picture(expl.views[view])
    return expl.image


def _draw_overlay(ax, expl: Explanation, view: str, thresholds: dict[str, float | None]) -> None:
    ax.imshow(heat_base(expl, view), interpolation="nearest")
    ax.imshow(expl.heatmaps[view], cmap="jet", alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_title(_caption(expl, view, thresholds), fontsize=8)
    ax.axis("off")


def _verdict(expl: Explanation) -> str:
    d = expl.details
    if d.out_of_distribution:
        # The refusal is the headline: no decision for an image unlike the training images.
        return (f"NO DECISION: the image looks unlike the training images ({', '.join(d.ood_reasons)}); "
                f"the model's output {d.melanoma_probability:.3f} is not a probability to trust")
    return (f"fused melanoma probability {d.melanoma_probability:.3f} (threshold {expl.threshold:.3f}) -> "
            f"{d.decision}")


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


def write_overlay(expl: Explanation, view: str, path: str | os.PathLike,
                  thresholds: dict[str, float | None] | None = None) -> Path:
    """One branch's heat map over the photo (or, for fft, its spectrum), captioned, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 4.2), dpi=110)
    _draw_overlay(ax, expl, view, thresholds or {})
    fig.text(0.5, 0.02, NOT_A_DEVICE, ha="center", fontsize=5, wrap=True)
    _save(fig, Path(path))
    return Path(path)


def write_panel(expl: Explanation, path: str | os.PathLike, title: str = "",
                thresholds: dict[str, float | None] | None = None) -> Path:
    """The image, what each branch receives, every branch's heat map and the probabilities, in one PNG.

    ``thresholds``: each branch's own validation threshold by view (``branch_thresholds``), shown
    beside its probability.
    """
    plt = _pyplot()
    thresholds = thresholds or {}
    views = list(expl.heatmaps)
    cols = 1 + len(views)
    fig, axes = plt.subplots(2, cols, figsize=(3.4 * cols, 7.0), dpi=110, squeeze=False)
    axes[0, 0].imshow(expl.image, interpolation="nearest")
    axes[0, 0].set_title("image (as the branches see it)", fontsize=8)
    for j, view in enumerate(views, start=1):
        array = expl.views[view]
        axes[0, j].imshow(view_picture(view, array), interpolation="nearest")
        axes[0, j].set_title(f"{view} view\n" + textwrap.fill(view_caption(view, array.shape[-1]), 38), fontsize=7)
        _draw_overlay(axes[1, j], expl, view, thresholds)
    lines = [f"{v}: {_branch_line(expl, v, thresholds)}" for v in views]
    axes[1, 0].text(0.0, 0.95, "branch melanoma\nprobabilities\n\n" + "\n".join(lines), va="top", fontsize=7,
                    family="monospace")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.06, textwrap.fill(_verdict(expl), 110), ha="center", fontsize=9, weight="bold")
    fig.text(0.5, 0.02, NOT_A_DEVICE, ha="center", fontsize=8)
    fig.subplots_adjust(bottom=0.14, top=0.86, hspace=0.45)
    _save(fig, Path(path))
    return Path(path)


def write_explanation(expl: Explanation, out_dir: str | os.PathLike, name: str, title: str = "",
                      thresholds: dict[str, float | None] | None = None) -> list[Path]:
    """Write ``NAME.VIEW.png`` for every branch and ``NAME.panel.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    written = [write_overlay(expl, view, out / f"{name}.{view}.png", thresholds) for view in expl.heatmaps]
    return [*written, write_panel(expl, out / f"{name}.panel.png", title, thresholds)]


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
    thresholds = branch_thresholds(ens)
    for path, name in zip(paths, output_names(paths)):
        # An image the metadata CSV does not list is explained with every field unknown, as predict scores it.
        meta = ((metadata or {}).get(path) or {}) if ens.metadata_fields else None
        try:
            expl = explain_with(ens, path, meta)
        except ImageError as exc:
            logger.warning("skipped %s", exc)
            skipped.append((path, str(exc)))
            continue
        files = write_explanation(expl, out, name, title=str(path), thresholds=thresholds)
        written.append((path, files))
        if on_image is not None:
            on_image(path, files)
    return written, skipped
