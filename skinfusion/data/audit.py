"""Artefact audit of dermoscopy images: coloured disc stickers, purple ink, size, source and readability.

Pure NumPy/OpenCV heuristics; the ``skinfusion audit`` command and the measurement script build on them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import cv2
import numpy as np

from colorspaces import ImageError, read_image, validate_image
from colorspaces.labels import LABEL_NAMES

logger = logging.getLogger(__name__)

# Every detector works on a copy whose long side is this many pixels, so that the thresholds
# below (in pixels and in fractions of the image) mean the same thing at 200x150 and at 4000x3000.
WORK_SIDE = 128
ARTEFACTS = ("colour_disc", "ink")  # the flag columns of an audit row

# --- colour-disc detector -------------------------------------------------------------------
# Hue ranges in degrees (OpenCV's 0-255 "FULL" hue scaled to 0-360). Skin and lesions sit at
# 0-18 deg (reds and browns) with moderate saturation; the sticker colours do not.
_DISC_FAMILIES = {
    # Orange overlaps skin hue, so only vivid, bright orange counts.
    "orange": dict(hue=(18, 45), min_sat=150, min_val=150),
    "yellow_green": dict(hue=(45, 165), min_sat=60, min_val=100),
    "cyan_blue": dict(hue=(165, 260), min_sat=60, min_val=100),
}
# A disc pixel must also differ in chroma from the image's typical colour (its median a*, b*);
# this removes whole-image colour casts, such as the blue-tinted early ISIC archive photographs.
_DISC_MIN_CHROMA_DIST = 22.0
_DISC_MIN_AREA = 0.01  # a component must cover at least 1% of the image
# 90th percentile of |r_i / r - 1| along the visible rim. Reviewed discs reach 0.036; the first
# non-disc (a blue paper marker) is at 0.055.
_DISC_MAX_RESIDUAL = 0.045
_DISC_MIN_FILL = 0.90  # share of the fitted ellipse (inside the image) covered by the component
_DISC_MAX_SPILL = 0.20  # share of the component lying outside the fitted ellipse
_DISC_MIN_RIM_POINTS = 12
_DISC_MAX_RADIUS = 0.75  # of the long side; the reviewed discs reach about 0.46
# ISIC 2017 copies were squashed to 256x256 from 4:3 and 3:2 originals, so their round discs are
# axis-aligned ellipses. A circle is fitted after scaling x by each factor; the best fit wins.
# (A free 4-parameter ellipse fit is unstable on the short arcs of discs cut off by the border.)
_DISC_X_SCALES = (1.0, 3 / 4, 2 / 3, 4 / 3, 3 / 2)
# Contour points this close to the image border, or to the dark vignette, are cut edges, not rim.
_BORDER_PX = 3
_DARK_VALUE = 80
_CLOSE_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_RESIDUAL_QUANTILE = 0.9

# --- ink detector ---------------------------------------------------------------------------
# Surgical marker is violet: redder (a*) and bluer (b*) than the skin around it, and darker.
# Relative thresholds, against the image median, keep working on pinkish or yellowish skin.
_INK_MIN_A_RISE = 12
_INK_MIN_B_DROP = 20
_INK_MAX_B = -8  # and blue in absolute terms (skin and brown lesions have b* > 0)
_INK_MIN_L_DROP = 15  # on OpenCV's 0-255 L scale
# Magenta (paper tape, ruler prints) has a hue angle atan2(-b*, a*) below ~15 deg; ink sits at 20-50.
_INK_MIN_ANGLE = 18.0
# Blue-violet parts of a lesion (often melanomas) have the same colour as ink. Ink lies on skin:
# keep a component only if the pixels just around it are about as light as the skin. The upper
# quartile, not the median, of the ring is compared, since the pale fringe of a dense scribble is
# itself faintly inked.
_INK_RING_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
_INK_MAX_RING_L_DROP = 20
_INK_RING_QUANTILE = 0.75
_INK_MIN_COMPONENT_PX = 4
_INK_MIN_AREA = 0.002  # total area of on-skin ink, as a fraction of the image


def _to_work_size(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    scale = WORK_SIDE / max(h, w)
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _colour_planes(image: np.ndarray) -> dict[str, np.ndarray]:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.int32)
    return {
        "hue": hsv[..., 0] * 360 // 256,
        "sat": hsv[..., 1],
        "val": hsv[..., 2],
        "L": lab[..., 0],
        "a": lab[..., 1] - 128,
        "b": lab[..., 2] - 128,
    }


def _typical(plane: np.ndarray, valid: np.ndarray) -> float:
    # Median over the lit field of view; black vignette corners would drag it towards grey.
    return float(np.median(plane[valid])) if valid.any() else float(np.median(plane))


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic (Kasa) least-squares circle: centre x, centre y, radius."""
    design = np.column_stack([2 * x, 2 * y, np.ones_like(x)])
    (cx, cy, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    r2 = c + cx * cx + cy * cy
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(np.sqrt(r2))


def _fit_rim(x: np.ndarray, y: np.ndarray,
             max_radius: float) -> tuple[float, float, float, float, float] | None:
    """Best axis-aligned ellipse over the x-scales, radii <= max_radius: (cx, cy, rx, ry, residual)."""
    best = None
    for s in _DISC_X_SCALES:
        xs = x * s
        fit = _fit_circle(xs, y)
        if fit is None:
            continue
        err = np.abs(np.hypot(xs - fit[0], y - fit[1]) / fit[2] - 1)
        # Refit on the best 80% so a notch, a hair or a straight cut edge does not pull the circle.
        keep = err <= np.quantile(err, 0.8)
        if keep.sum() >= 3:
            fit = _fit_circle(xs[keep], y[keep]) or fit
        cx, cy, r = fit
        err = np.abs(np.hypot(xs - cx, y - cy) / r - 1)
        residual = float(np.quantile(err, _RESIDUAL_QUANTILE))
        if max(r, r / s) > max_radius:
            continue  # a nearly straight edge (paper, ruler, tape) fits only a huge circle
        if best is None or residual < best[4]:
            best = (cx / s, cy, r / s, r, residual)
    return best


def _vignette(dark: np.ndarray) -> np.ndarray:
    """The dark pixels connected to the image border (the scope's vignette, not a dark lesion)."""
    _, labels = cv2.connectedComponents(dark.astype(np.uint8), connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def _rim_points(contours: Sequence[np.ndarray]) -> np.ndarray:
    """Integer points every pixel along the convex hull of the contours."""
    # Stickers are convex: the hull bridges notches cut by glints or hairs at the rim.
    hull = cv2.convexHull(np.vstack(contours))[:, 0].astype(float)
    ends = np.roll(hull, -1, axis=0)
    steps = np.maximum(np.ceil(np.abs(ends - hull).max(axis=1)), 1).astype(int)
    pts = np.vstack([np.linspace(a, b, n, endpoint=False) for a, b, n in zip(hull, ends, steps)])
    return np.rint(pts).astype(int)


def _disc_candidates(image: np.ndarray) -> list[dict[str, float]]:
    """Shape measurements of every large, sticker-coloured component of a work-size image."""
    p = _colour_planes(image)
    height, width = p["hue"].shape
    lit = p["val"] >= _DARK_VALUE
    chroma_dist = np.hypot(p["a"] - _typical(p["a"], lit), p["b"] - _typical(p["b"], lit))
    far = chroma_dist >= _DISC_MIN_CHROMA_DIST
    family_masks = []
    for spec in _DISC_FAMILIES.values():
        lo, hi = spec["hue"]
        family_masks.append((p["hue"] >= lo) & (p["hue"] < hi) & (p["sat"] >= spec["min_sat"])
                            & (p["val"] >= spec["min_val"]) & far)
    # Each colour on its own (the green centre of a lavender disc) and all together (an orange
    # ring around a yellow centre is one disc).
    masks = family_masks + [np.logical_or.reduce(family_masks)]

    dark = cv2.dilate(_vignette(~lit).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    yy, xx = np.mgrid[:height, :width]
    kernel = np.ones((3, 3), np.uint8)
    candidates = []
    for mask in masks:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for k in range(1, n):
            area = stats[k, cv2.CC_STAT_AREA]
            if area < _DISC_MIN_AREA * height * width:
                continue
            comp = (labels == k).astype(np.uint8)
            # Specular glints and hairs cut notches and holes into the sticker; close and fill them
            # so that the rim is the sticker's outline.
            comp = cv2.morphologyEx(comp, cv2.MORPH_CLOSE, _CLOSE_KERNEL)
            contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            comp = cv2.drawContours(np.zeros_like(comp), contours, -1, 1, thickness=cv2.FILLED).astype(bool)
            area = int(comp.sum())
            pts = _rim_points(contours)
            on_rim = ((pts[:, 0] >= _BORDER_PX) & (pts[:, 0] < width - _BORDER_PX)
                      & (pts[:, 1] >= _BORDER_PX) & (pts[:, 1] < height - _BORDER_PX)
                      & ~dark[pts[:, 1], pts[:, 0]])
            if on_rim.sum() < _DISC_MIN_RIM_POINTS:
                continue
            fit = _fit_rim(pts[on_rim, 0].astype(float), pts[on_rim, 1].astype(float),
                           max_radius=_DISC_MAX_RADIUS * max(height, width))
            if fit is None:
                continue
            cx, cy, rx, ry, residual = fit
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            visible = inside & ~dark
            candidates.append({
                "area": area / (height * width),
                "residual": residual,
                "fill": float((comp & visible).sum() / max(visible.sum(), 1)),
                "spill": float((comp & ~inside).sum() / area),
            })
    return candidates


def _disc_score(c: dict[str, float]) -> float:
    # 1 for a perfectly filled, perfectly round component; 0 from twice the residual limit.
    roundness = max(0.0, 1.0 - c["residual"] / (2 * _DISC_MAX_RESIDUAL))
    return float(c["fill"] * (1.0 - c["spill"]) * roundness)


def detect_colour_disc(image_rgb: np.ndarray) -> tuple[bool, float]:
    """Detect a coloured circular sticker (orange, yellow, green, teal or blue disc).

    The image is shrunk to a 128-px long side. Pixels whose hue is a sticker colour, whose
    saturation and brightness are high and whose chroma differs from the image's median are
    grouped into connected components, per colour family and all together. A component is a disc
    when it covers at least 1% of the image and its rim, excluding the image border and the dark
    vignette, fits a circle (or an axis-aligned ellipse of aspect up to 3:2, for squashed copies)
    closely, with the component filling the fitted shape.

    Args:
        image_rgb: RGB ``uint8`` array of shape (H, W, 3).

    Returns:
        ``(flag, score)``: whether a disc was found, and the best component's score in [0, 1]
        (fill x (1 - spill) x roundness); 0.0 when no component is large enough.

    Raises:
        ImageError: if the array breaks the RGB uint8 H×W×3 contract.
    """
    image = _to_work_size(validate_image(image_rgb))
    flag, score = False, 0.0
    for c in _disc_candidates(image):
        score = max(score, _disc_score(c))
        flag = flag or (c["residual"] <= _DISC_MAX_RESIDUAL and c["fill"] >= _DISC_MIN_FILL
                        and c["spill"] <= _DISC_MAX_SPILL)
    return flag, score


def detect_ink(image_rgb: np.ndarray) -> tuple[bool, float]:
    """Detect violet surgical-marker ink on the skin.

    The image is shrunk to a 128-px long side. Ink pixels are violet relative to the image's
    median colour in OpenCV's 8-bit Lab (a* at least 12 higher, b* at least 20 lower and
    negative, hue angle not magenta, L at least 15 of 255 darker). Connected groups of them count
    only if the ring of pixels around them is about as light as the median skin (upper quartile
    at most 20 darker), which rejects blue-violet lesion regions. Ink inside a dark lesion, and
    blue (rather than violet) ink, are therefore missed.

    Args:
        image_rgb: RGB ``uint8`` array of shape (H, W, 3).

    Returns:
        ``(flag, score)``: whether at least 0.2% of the image is on-skin ink, and that fraction.

    Raises:
        ImageError: if the array breaks the RGB uint8 H×W×3 contract.
    """
    image = _to_work_size(validate_image(image_rgb))
    p = _colour_planes(image)
    lit = p["val"] >= _DARK_VALUE
    if not lit.any():
        return False, 0.0
    skin_l, skin_a, skin_b = (_typical(p[c], lit) for c in ("L", "a", "b"))
    angle = np.degrees(np.arctan2(-p["b"], p["a"]))
    ink = ((p["a"] - skin_a >= _INK_MIN_A_RISE) & (skin_b - p["b"] >= _INK_MIN_B_DROP)
           & (p["b"] <= _INK_MAX_B) & (skin_l - p["L"] >= _INK_MIN_L_DROP) & (angle >= _INK_MIN_ANGLE))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    on_skin = 0
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < _INK_MIN_COMPONENT_PX:
            continue
        comp = labels == k
        ring = cv2.dilate(comp.astype(np.uint8), _INK_RING_KERNEL).astype(bool) & ~ink & lit
        if ring.any() and skin_l - np.quantile(p["L"][ring], _INK_RING_QUANTILE) <= _INK_MAX_RING_L_DROP:
            on_skin += int(stats[k, cv2.CC_STAT_AREA])
    score = on_skin / ink.size
    return bool(score >= _INK_MIN_AREA), float(score)


def _item_path_and_id(item: Any) -> tuple[str, str]:
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        return os.path.splitext(os.path.basename(path))[0], path
    if hasattr(item, "path") and hasattr(item, "image_id"):
        return str(item.image_id), os.fspath(item.path)
    raise TypeError(f"expected a path or a record with .image_id and .path, got {type(item).__name__}")


def audit_image(item: Any) -> dict[str, Any]:
    """Audit one image: size, readability and artefact flags.

    Args:
        item: a path (``str`` or ``os.PathLike``; the id is the file stem) or any record with
            ``image_id`` and ``path`` attributes, such as ``skinfusion.data.index.Record``.

    Returns:
        A row dict with ``image_id``, ``path``, ``width``, ``height`` (as stored; ``None`` when
        unreadable), ``readable``, ``error`` (``""`` when readable), ``colour_disc``,
        ``colour_disc_score``, ``ink`` and ``ink_score``.

    Raises:
        TypeError: if ``item`` is neither a path nor a record.
    """
    image_id, path = _item_path_and_id(item)
    row: dict[str, Any] = {"image_id": image_id, "path": path, "width": None, "height": None,
                           "readable": False, "error": "", "colour_disc": False,
                           "colour_disc_score": 0.0, "ink": False, "ink_score": 0.0}
    try:
        image = read_image(path)
    except (ImageError, OSError) as exc:
        # A corrupt or missing file is a finding of the audit, not a reason to stop it.
        row["error"] = str(exc)
        return row
    row.update(width=int(image.shape[1]), height=int(image.shape[0]), readable=True)
    row["colour_disc"], row["colour_disc_score"] = detect_colour_disc(image)
    row["ink"], row["ink_score"] = detect_ink(image)
    return row


def audit_images(records_or_paths: Sequence[Any], workers: int = 2) -> list[dict[str, Any]]:
    """Audit many images in a thread pool (OpenCV releases the GIL), in input order.

    Args:
        records_or_paths: paths or records with ``image_id`` and ``path`` (see ``audit_image``).
        workers: number of threads; 1 runs in the calling thread.

    Returns:
        One row per input, in input order, as described in ``audit_image``.

    Raises:
        ValueError: if ``workers`` is below 1.
        TypeError: if an item is neither a path nor a record.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    items = list(records_or_paths)
    for item in items:
        _item_path_and_id(item)  # fail before any work is done
    rows: list[dict[str, Any]] = []
    step = max(1, len(items) // 10)

    def _progress(row: dict[str, Any]) -> None:
        rows.append(row)
        if len(rows) % step == 0 or len(rows) == len(items):
            logger.info("audited %d/%d images", len(rows), len(items))

    if workers == 1:
        for item in items:
            _progress(audit_image(item))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(audit_image, items):
                _progress(row)
    n_bad = sum(not r["readable"] for r in rows)
    if n_bad:
        logger.warning("%d of %d images could not be read", n_bad, len(rows))
    return rows


def _class_name(label: Any, label_names: dict[Any, str]) -> str:
    return label_names.get(label, str(label))


def summarise_audit(rows: Sequence[dict[str, Any]], labels: Sequence[Any], sources: Sequence[str],
                    label_names: dict[Any, str] | None = None) -> dict[str, Any]:
    """Summarise audit rows per class: artefact rates, image-size mix, source mix, unreadable files.

    A model can learn the camera or the sticker instead of the lesion; differences between the
    classes in any of these numbers are shortcuts it could take.

    Args:
        rows: rows from ``audit_images``.
        labels: one label per row (e.g. ``Record.label``: 1 = melanoma, 0 = nevus).
        sources: one source name per row (e.g. ``Record.source``).
        label_names: how to name each label in the summary; defaults to ``LABEL_NAMES``
            (0 = nevus, 1 = melanoma); other labels are named ``str(label)``.

    Returns:
        A dict with ``n_images``, ``n_unreadable``, ``unreadable`` (list of ``image_id``,
        ``path``, ``error``) and ``per_class``, which maps each class name to ``n``,
        ``n_readable``, ``n_unreadable``, for each artefact a ``{"count", "rate"}`` dict (rate over
        readable images; ``None`` when there are none), ``sizes`` (``"WxH"`` -> count, readable
        images) and ``sources`` (source -> count, all images).

    Raises:
        ValueError: if ``rows``, ``labels`` and ``sources`` differ in length.
    """
    if not len(rows) == len(labels) == len(sources):
        raise ValueError(f"rows, labels and sources must have equal lengths, got "
                         f"{len(rows)}, {len(labels)} and {len(sources)}")
    names = LABEL_NAMES if label_names is None else label_names
    grouped: dict[str, list[tuple[dict[str, Any], str]]] = defaultdict(list)
    for row, label, source in zip(rows, labels, sources):
        grouped[_class_name(label, names)].append((row, source))

    per_class: dict[str, Any] = {}
    for name in sorted(grouped):
        members = grouped[name]
        readable = [r for r, _ in members if r["readable"]]
        entry: dict[str, Any] = {"n": len(members), "n_readable": len(readable),
                                 "n_unreadable": len(members) - len(readable)}
        for artefact in ARTEFACTS:
            count = sum(bool(r[artefact]) for r in readable)
            entry[artefact] = {"count": count, "rate": count / len(readable) if readable else None}
        entry["sizes"] = dict(Counter(f"{r['width']}x{r['height']}" for r in readable).most_common())
        entry["sources"] = dict(Counter(s for _, s in members).most_common())
        per_class[name] = entry

    unreadable = [{"image_id": r["image_id"], "path": r["path"], "error": r["error"]}
                  for r in rows if not r["readable"]]
    return {"n_images": len(rows), "n_unreadable": len(unreadable), "unreadable": unreadable,
            "per_class": per_class}
