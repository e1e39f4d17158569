"""A realistic far-OOD image set, generated with a seed: what a user might upload by mistake instead of dermoscopy.

    python -m experiments.farood --out DIR [--part tuning|heldout] [--per-kind N]

Kinds (``KINDS``): rendered text pages and source code (light and dark themes), charts and
diagrams (matplotlib), UI-like screenshots (bars, buttons, fields, cards, text; some with an
image on the page), photo-like scenes and object photographs from procedural textures,
clinical-photo-like skin (a larger field than dermoscopy, no circular vignette, uneven light,
background at the edges, small moles), dermoscopy-like images on a large white or grey page
(a figure in a paper or a slide), and plots of this project's own kind (ROC curves,
reliability diagrams, confusion matrices, training curves). Screenshot-sized images are common
(600-1600 px); about half are JPEG round-tripped at quality 60-95, as uploads often are.

Two parts drawn with different seeds: ``tuning`` (to look at while choosing checks and limits)
and ``heldout`` (only for the final report; never looked at while tuning). Nothing here is
downloaded and no image is committed; ``--out`` writes PNG files and ``kinds.csv`` for inspection.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from experiments.common import run_experiment
from skinfusion.data.synthetic import _lesion

PARTS = {"tuning": 1_000, "heldout": 2_000}  # seed bases: the two parts share no random stream
_WORDS = ("the model image lesion data gate score train fusion branch value result table figure page user "
          "report install error return import class def self none true false config path file read write "
          "melanoma nevus patient clinic test split run export server request response total invoice order "
          "account settings profile search upload cancel submit save open close help about version update").split()
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
          cv2.FONT_HERSHEY_PLAIN)


def _c(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _line(rng: np.random.Generator, words: int) -> str:
    return " ".join(str(w) for w in rng.choice(_WORDS, words))


def _page(rng: np.random.Generator, lo: int = 480, hi: int = 1400) -> np.ndarray:
    h = int(rng.integers(lo, hi))
    w = int(h * rng.choice([0.75, 1.0, 1.33, 1.6, 1.78]))
    bg = rng.choice([255, 250, 245, 238, 230])
    tint = rng.integers(-6, 7, 3) * (rng.random() < 0.3)
    return np.full((h, w, 3), np.clip(bg + tint, 0, 255), np.uint8)


def text_page(rng: np.random.Generator) -> np.ndarray:
    """A document page: a heading and paragraphs of dark text on white, cream or light grey."""
    img = _page(rng)
    h, w = img.shape[:2]
    font, scale = int(rng.choice(_FONTS)), float(rng.uniform(0.4, 0.8)) * max(1.0, w / 900)
    step = int(28 * scale) + 6
    y = int(rng.integers(30, 80))
    cv2.putText(img, _line(rng, 4).title(), (30, y), font, scale * 1.6, _c(rng, 0, 60), 2, cv2.LINE_AA)
    y += 2 * step
    while y < h - 20:
        if rng.random() < 0.12:  # paragraph break
            y += step
            continue
        cv2.putText(img, _line(rng, int(rng.integers(5, 14))), (30, y), font, scale, _c(rng, 0, 70), 1, cv2.LINE_AA)
        y += step
    return img


def code(rng: np.random.Generator) -> np.ndarray:
    """Source code with line numbers and syntax colours, on a light or a dark editor theme."""
    dark = rng.random() < 0.4
    img = _page(rng, 400, 1100)
    if dark:
        img[:] = _c(rng, 20, 45)
    h, w = img.shape[:2]
    palette = [(86, 156, 214), (206, 145, 120), (78, 201, 176), (197, 134, 192), (220, 220, 170)] if dark else \
              [(0, 0, 255), (163, 21, 21), (0, 128, 0), (121, 94, 38), (40, 40, 40)]
    scale, y, n = float(rng.uniform(0.4, 0.6)), 24, 1
    gutter = (60, 60, 60) if dark else (235, 235, 235)
    cv2.rectangle(img, (0, 0), (40, h), gutter, -1)
    while y < h - 8:
        cv2.putText(img, str(n), (4, y), cv2.FONT_HERSHEY_PLAIN, 1.0, (130, 130, 130), 1)
        x = 50 + 16 * int(rng.integers(0, 4))
        for _ in range(int(rng.integers(1, 6))):
            tok = str(rng.choice(_WORDS)) + str(rng.choice(["(", ")", ":", " =", ".", ",", ""]))
            colour = palette[int(rng.integers(len(palette)))]
            cv2.putText(img, tok, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
            x += int(len(tok) * 19 * scale) + 8
        y, n = y + int(22 * scale / 0.5), n + 1
    return img


def _figure(rng: np.random.Generator, draw: Callable) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(float(rng.uniform(4, 9)), float(rng.uniform(3, 6))), dpi=int(rng.choice([72, 100, 120])))
    FigureCanvasAgg(fig)
    if rng.random() < 0.2:
        fig.patch.set_facecolor(np.r_[rng.uniform(0.85, 1.0, 3)])
    draw(fig, rng)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def _chart(fig, rng: np.random.Generator) -> None:
    ax = fig.add_subplot()
    kind = rng.choice(["line", "bar", "scatter", "hist", "pie", "heatmap", "area"])
    x = np.arange(int(rng.integers(8, 60)))
    for k in range(int(rng.integers(1, 4))):
        y = np.cumsum(rng.normal(0, 1, len(x))) + 5 * k
        if kind == "line":
            ax.plot(x, y, label=f"series {k}", marker=rng.choice(["", "o", "s"]))
        elif kind == "bar":
            ax.bar(x[:12] + 0.25 * k, np.abs(y[:12]) + 1, width=0.25, label=f"group {k}")
        elif kind == "scatter":
            ax.scatter(rng.normal(size=80), rng.normal(size=80) + k, s=12, label=f"class {k}")
        elif kind == "hist":
            ax.hist(rng.normal(k, 1, 500), bins=30, alpha=0.6, label=f"set {k}")
        elif kind == "area":
            ax.fill_between(x, y, alpha=0.4)
    if kind == "pie":
        n = int(rng.integers(3, 7))
        ax.pie(rng.uniform(1, 5, n), labels=[str(w) for w in rng.choice(_WORDS, n)])
    if kind == "heatmap":
        im = ax.imshow(rng.normal(size=(8, 12)), cmap=str(rng.choice(["viridis", "coolwarm", "magma", "Blues"])))
        fig.colorbar(im)
    ax.set_title(_line(rng, 3).title())
    ax.set_xlabel(str(rng.choice(_WORDS)))
    ax.set_ylabel(str(rng.choice(_WORDS)))
    if rng.random() < 0.5:
        ax.grid(True, alpha=0.4)
    if kind in ("line", "bar", "scatter", "hist"):
        ax.legend()


def _diagram(fig, rng: np.random.Generator) -> None:
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    boxes = [(float(rng.uniform(0.05, 0.75)), float(rng.uniform(0.05, 0.8))) for _ in range(int(rng.integers(3, 8)))]
    for i, (x, y) in enumerate(boxes):
        colour = rng.choice(["#dae8fc", "#d5e8d4", "#fff2cc", "#f8cecc", "#e1d5e7", "white"])
        ax.add_patch(FancyBboxPatch((x, y), 0.2, 0.1, boxstyle="round,pad=0.01", fc=colour, ec="#333333"))
        ax.text(x + 0.1, y + 0.05, str(rng.choice(_WORDS)), ha="center", va="center", fontsize=9)
        if i:
            px, py = boxes[i - 1]
            ax.add_patch(FancyArrowPatch((px + 0.1, py), (x + 0.1, y + 0.1), arrowstyle="->", mutation_scale=12))


def _project_plot(fig, rng: np.random.Generator) -> None:
    ax = fig.add_subplot()
    kind = rng.choice(["roc", "reliability", "confusion", "curves"])
    if kind == "roc":
        for view in ("rgb", "hsv", "fft", "fused"):
            fpr = np.sort(rng.uniform(0, 1, 50)) ** float(rng.uniform(0.3, 0.8))
            ax.plot(np.r_[0, np.sort(rng.uniform(0, 1, 49)), 1], np.r_[0, np.sort(fpr)[1:], 1],
                    label=f"{view} AUC {rng.uniform(0.7, 0.9):.3f}")
        ax.plot([0, 1], [0, 1], "k--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    elif kind == "reliability":
        p = np.linspace(0.05, 0.95, 10)
        ax.plot(p, np.clip(p + rng.normal(0, 0.06, 10), 0, 1), "o-", label="fused")
        ax.plot([0, 1], [0, 1], ":", label="perfect")
        ax.set_xlabel("predicted melanoma probability")
    elif kind == "confusion":
        m = rng.integers(10, 900, (2, 2))
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks([0, 1], ["nevus", "melanoma"])
        ax.set_yticks([0, 1], ["nevus", "melanoma"])
    else:
        e = np.arange(1, int(rng.integers(10, 40)))
        ax.plot(e, 0.7 * np.exp(-e / 8) + 0.2 + rng.normal(0, 0.01, len(e)), label="train loss")
        ax.plot(e, 0.7 * np.exp(-e / 10) + 0.28 + rng.normal(0, 0.02, len(e)), label="val loss")
        ax.set_xlabel("epoch")
    ax.set_title(f"{rng.choice(['ISIC', 'HAM10000', 'test split', 'held-out source'])} {kind}")
    ax.legend() if kind in ("roc", "reliability", "curves") else None


def screenshot(rng: np.random.Generator) -> np.ndarray:
    """An application window: title bar, side bar, buttons, input fields, cards; sometimes an image on it."""
    img = _page(rng, 500, 1100)
    h, w = img.shape[:2]
    accent = _c(rng, 20, 220)
    cv2.rectangle(img, (0, 0), (w, int(rng.integers(30, 60))), accent if rng.random() < 0.6 else (40, 40, 48), -1)
    cv2.putText(img, _line(rng, 2).title(), (12, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    side = int(rng.integers(0, 2)) * int(w * rng.uniform(0.15, 0.25))
    if side:
        cv2.rectangle(img, (0, 60), (side, h), _c(rng, 225, 250), -1)
        for k in range(8):
            cv2.putText(img, str(rng.choice(_WORDS)), (12, 95 + 34 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (60, 60, 60), 1,
                        cv2.LINE_AA)
    x0, y = side + 24, 90
    while y < h - 60:
        what = rng.choice(["text", "field", "buttons", "card", "image"])
        if what == "text":
            cv2.putText(img, _line(rng, 8), (x0, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (40, 40, 40), 1, cv2.LINE_AA)
            y += 28
        elif what == "field":
            cv2.rectangle(img, (x0, y), (min(w - 20, x0 + 300), y + 30), (180, 180, 180), 1)
            cv2.putText(img, str(rng.choice(_WORDS)), (x0 + 6, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (150, 150, 150), 1)
            y += 46
        elif what == "buttons":
            for k in range(int(rng.integers(1, 4))):
                bx = x0 + 130 * k
                cv2.rectangle(img, (bx, y), (bx + 110, y + 32), accent if k == 0 else (225, 225, 225), -1)
                cv2.putText(img, str(rng.choice(_WORDS)).title(), (bx + 14, y + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                            (255, 255, 255) if k == 0 else (30, 30, 30), 1, cv2.LINE_AA)
            y += 50
        elif what == "card":
            ch = int(rng.integers(60, 160))
            cv2.rectangle(img, (x0, y), (w - 24, y + ch), (250, 250, 250), -1)
            cv2.rectangle(img, (x0, y), (w - 24, y + ch), (210, 210, 210), 1)
            for k in range(ch // 26):
                cv2.putText(img, _line(rng, 6), (x0 + 10, y + 22 + 24 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (70, 70, 70),
                            1, cv2.LINE_AA)
            y += ch + 16
        else:  # an uploaded image shown on the page: a lesion preview or a photo thumbnail
            s = int(min(h - y - 20, rng.integers(80, 220)))
            if s > 40 and x0 + s < w:
                thumb = _lesion(rng, s, bool(rng.random() < 0.5), 0.0) if rng.random() < 0.5 else scene(rng, (s, s))
                img[y : y + s, x0 : x0 + s] = thumb
            y += s + 16
    return img


def _noise(rng: np.random.Generator, shape: tuple[int, int], octaves: int = 5) -> np.ndarray:
    """Fractal value noise in [0, 1]: the sum of upscaled random grids (a procedural texture)."""
    h, w = shape
    out = np.zeros((h, w))
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells, cells))
        out += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) / 2**o
    out -= out.min()
    return out / max(out.max(), 1e-9)


def scene(rng: np.random.Generator, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A photo-like landscape: a sky gradient, textured hills or sea, trees or buildings, camera noise."""
    h, w = shape or (int(rng.integers(300, 900)), 0)
    w = w or int(h * rng.choice([1.33, 1.5, 1.78]))
    sky_top, sky_low = np.array(_c(rng, 40, 140)) * [0.6, 0.8, 1.6], np.array(_c(rng, 170, 250))
    t = np.linspace(0, 1, h)[:, None, None]
    img = np.clip(sky_top * (1 - t) + sky_low * t, 0, 255) * np.ones((1, w, 1))
    horizon = (h * (0.35 + 0.3 * rng.random() + 0.08 * _noise(rng, (1, w), 3)[0])).astype(int)
    ground = np.array(rng.choice([[70, 110, 50], [120, 100, 70], [40, 80, 120], [150, 140, 120], [90, 90, 95]]))
    tex = _noise(rng, (h, w))[..., None]
    rows = np.arange(h)[:, None]
    below = (rows >= horizon[None, :])[..., None]
    img = np.where(below, ground * (0.6 + 0.8 * tex), img)
    for _ in range(int(rng.integers(0, 8))):  # trees, rocks, buildings
        cx, cy = int(rng.integers(0, w)), int(horizon[min(w - 1, int(rng.integers(0, w)))])
        if rng.random() < 0.5:
            cv2.ellipse(img, (cx, cy), (int(rng.integers(8, 60)), int(rng.integers(15, 90))), 0, 0, 360,
                        tuple(float(v) for v in rng.uniform(20, 90, 3)), -1)
        else:
            bw, bh = int(rng.integers(20, 90)), int(rng.integers(30, 200))
            cv2.rectangle(img, (cx, cy - bh), (cx + bw, cy), tuple(float(v) for v in rng.uniform(80, 220, 3)), -1)
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.5)))
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def object_photo(rng: np.random.Generator) -> np.ndarray:
    """An object photographed on a table: a background gradient, a shaded object, its shadow, sensor noise."""
    h = int(rng.integers(300, 900))
    w = int(h * rng.choice([1.0, 1.33, 1.5]))
    wall, table = np.array(_c(rng, 120, 240)), np.array(_c(rng, 60, 200))
    t = np.linspace(0, 1, h)[:, None, None]
    edge = rng.uniform(0.4, 0.7)
    img = np.where(t < edge, wall * (0.8 + 0.2 * t), table * (0.7 + 0.3 * _noise(rng, (h, w), 4)[..., None]))
    img = img * np.ones((1, w, 1))
    cx, cy, rx, ry = w // 2 + int(rng.integers(-w // 6, w // 6)), int(h * edge), int(w * rng.uniform(0.1, 0.25)), \
        int(h * rng.uniform(0.15, 0.35))
    cv2.ellipse(img, (cx + 15, cy + 8), (rx, ry // 5), 0, 0, 360, tuple(float(v) for v in table * 0.5), -1)  # shadow
    colour = np.array(_c(rng, 20, 255), float)
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((xx - cx) / rx) ** 2 + ((yy - (cy - ry)) / ry) ** 2 < 1
    shade = np.clip(1.2 - 0.8 * (xx - cx + rx) / (2 * rx), 0.3, 1.2)[..., None]
    img = np.where(body[..., None], colour * shade, img)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def clinical(rng: np.random.Generator) -> np.ndarray:
    """Skin photographed without a dermatoscope: a larger field, uneven light, background at an edge, small moles."""
    h = int(rng.integers(300, 1000))
    w = int(h * rng.choice([1.0, 1.33, 1.5]))
    tone = rng.uniform(0, 1)  # pale to dark skin, with a small per-channel jitter
    skin = np.array([235 - 110 * tone, 195 - 110 * tone, 170 - 105 * tone]) + rng.normal(0, 6, 3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = rng.uniform(0.55, 0.9) + rng.uniform(0.1, 0.5) * (np.cos(rng.uniform(0, 6.3)) * xx +
                                                              np.sin(rng.uniform(0, 6.3)) * yy)
    img = skin * np.clip(light, 0.3, 1.3)[..., None] * (0.93 + 0.1 * _noise(rng, (h, w), 6)[..., None])
    # The body's outline against a wall, a sheet or clothing on one side.
    side = rng.integers(0, 4)
    cut = (0.15 + 0.3 * rng.random() + 0.05 * np.sin(np.linspace(0, 3, max(h, w)) + rng.random()))
    coord = {0: xx, 1: 1 - xx, 2: yy, 3: 1 - yy}[int(side)]
    along = (yy if side < 2 else xx) * max(h, w)
    edge = cut[np.clip(along.astype(int), 0, max(h, w) - 1)] * (w if side < 2 else h) / max(h, w)
    back = np.array(_c(rng, 30, 240)) * (0.8 + 0.3 * _noise(rng, (h, w), 3)[..., None])
    img = np.where((coord < edge)[..., None], back, img)
    for _ in range(int(rng.integers(1, 7))):  # small pigmented moles, a few pixels across
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(max(2, rng.uniform(0.005, 0.03) * w))
        cv2.circle(img, (cx, cy), r, tuple(float(v) for v in skin * rng.uniform(0.3, 0.6)), -1)
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.6, 1.5)))
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def white_border(rng: np.random.Generator) -> np.ndarray:
    """A dermoscopy-like image on a large white or light grey page (a figure in a paper, a slide), maybe captioned."""
    img = _page(rng, 400, 1000)
    h, w = img.shape[:2]
    s = int(min(h, w) * rng.uniform(0.3, 0.6))
    for k in range(int(rng.integers(1, 4))):  # one to three panels side by side
        x, y = int(w * 0.08) + k * (s + 20), int(h * rng.uniform(0.08, 0.3))
        if x + s > w:
            break
        img[y : y + s, x : x + s] = _lesion(rng, s, bool(rng.random() < 0.5), 0.0)
        if rng.random() < 0.7:
            cv2.putText(img, f"({'abc'[k]}) {rng.choice(_WORDS)}", (x, y + s + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (30, 30, 30), 1, cv2.LINE_AA)
    return img


KINDS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "text_page": text_page, "code": code, "chart": lambda rng: _figure(rng, _chart),
    "diagram": lambda rng: _figure(rng, _diagram), "project_plot": lambda rng: _figure(rng, _project_plot),
    "screenshot": screenshot, "scene": scene, "object_photo": object_photo, "clinical": clinical,
    "white_border": white_border,
}


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def realistic_far_ood(part: str = "tuning", per_kind: int = 20,
                      kinds: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(kind, RGB uint8 image)``: ``per_kind`` images of each kind of ``KINDS``, seeded by ``part``.

    Each image has its own seed (part base + kind index * 10,000 + index), so an image does not
    depend on how many others are drawn. About half are JPEG round-tripped (quality 60-95).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    for k, kind in enumerate(KINDS):
        if kinds is not None and kind not in kinds:
            continue
        for i in range(per_kind):
            rng = np.random.default_rng(PARTS[part] + 10_000 * k + i)
            img = KINDS[kind](rng)
            if rng.random() < 0.5:
                img = _jpeg(img, int(rng.integers(60, 96)))
            yield kind, np.ascontiguousarray(img)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a part of the set as PNG files and ``kinds.csv`` into ``--out``."""
    p = argparse.ArgumentParser(prog="python -m experiments.farood", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files and kinds.csv")
    p.add_argument("--part", choices=sorted(PARTS), default="tuning")
    p.add_argument("--per-kind", type=int, default=20, metavar="N", help="images of each kind (default 20)")
    args = p.parse_args(argv)
    if args.per_kind < 1:
        p.error(f"argument --per-kind: must be at least 1, got {args.per_kind}")
    return run_experiment(_run, args, p, tensorflow=False)


def _run(args: argparse.Namespace) -> int:
    """Write the part's images and ``kinds.csv`` into ``--out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (kind, img) in enumerate(realistic_far_ood(args.part, args.per_kind)):
        name = f"{args.part}_{n:04d}_{kind}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append((name, kind))
    with open(out / "kinds.csv", "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([("file", "kind"), *rows])
    print(f"wrote {len(rows)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
