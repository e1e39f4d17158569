"""Artefact audit on generated images: disc stickers, ink strokes, rows and per-class summaries."""

import cv2
import numpy as np
import pytest

from colorspaces import ImageError
from skinfusion.data.audit import audit_images, detect_colour_disc, detect_ink, summarise_audit
from skinfusion.data.index import Record

from helpers import write_rgb

SKIN = (220, 176, 150)
BROWN = (140, 90, 60)
STICKERS = {
    "orange": (235, 140, 50),
    "yellow": (230, 215, 45),
    "green": (45, 170, 75),
    "teal": (122, 181, 182),
    "blue": (30, 140, 210),
}
VIOLET_INK = (110, 50, 150)


def _skin(height=192, width=256, seed=0, vignette=False):
    """Noisy skin with a brown lesion in the middle; optionally dark scope corners."""
    rng = np.random.default_rng(seed)
    img = np.ones((height, width, 3)) * SKIN + rng.normal(0, 4, (height, width, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    cv2.ellipse(img, (width // 2, height // 2), (width // 9, height // 7), 20, 0, 360, BROWN, -1)
    if vignette:
        yy, xx = np.mgrid[:height, :width]
        outside = np.hypot((xx - width / 2) / (width / 2), (yy - height / 2) / (height / 2)) > 1.15
        img[outside] = (10, 8, 8)
    return img


def _with_disc(colour, axes_ratio=1.0, vignette=False, seed=0):
    """A sticker centred just inside the right border, so that about a third of it is cut off."""
    img = _skin(seed=seed, vignette=vignette)
    h, w = img.shape[:2]
    r = h // 4
    cv2.ellipse(img, (w - r // 2, h // 3), (r, int(r * axes_ratio)), 0, 0, 360, colour, -1)
    return img


@pytest.mark.parametrize("colour", sorted(STICKERS))
def test_partly_cut_off_sticker_is_flagged(colour):
    flag, score = detect_colour_disc(_with_disc(STICKERS[colour]))
    assert flag
    assert score > 0.5


def test_squashed_sticker_and_vignette_are_handled():
    # ISIC 2017 copies were squashed to a square, so discs are upright ellipses of aspect ~1.33-1.5.
    assert detect_colour_disc(_with_disc(STICKERS["blue"], axes_ratio=1.4, vignette=True))[0]


def test_sticker_in_a_small_image_is_flagged():
    img = cv2.resize(_with_disc(STICKERS["orange"]), (64, 48), interpolation=cv2.INTER_AREA)
    assert detect_colour_disc(img)[0]


def test_plain_lesion_is_not_flagged():
    for seed in range(3):
        flag, score = detect_colour_disc(_skin(seed=seed, vignette=seed == 1))
        assert not flag
        assert score == 0.0


@pytest.mark.parametrize("brown", [(150, 95, 60), (120, 75, 50), (95, 60, 45)])
def test_round_brown_nevus_is_not_flagged(brown):
    # Nevi are often round; their colour, not their shape, must keep them out.
    img = _skin()
    cv2.circle(img, (128, 96), 45, brown, -1)
    assert not detect_colour_disc(img)[0]


def test_non_round_coloured_shapes_are_not_flagged():
    # A blue paper square cut by the border, and a ragged blue patch (a blue-grey veil, say).
    square = _skin()
    cv2.rectangle(square, (200, 20), (256, 100), STICKERS["blue"], -1)
    assert not detect_colour_disc(square)[0]

    ragged = _skin()
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = np.where(np.arange(24) % 2 == 0, 40, 15)
    pts = np.stack([128 + radii * np.cos(angles), 96 + radii * np.sin(angles)], axis=1).astype(np.int32)
    cv2.fillPoly(ragged, [pts], STICKERS["blue"])
    assert not detect_colour_disc(ragged)[0]


def test_violet_ink_strokes_are_flagged():
    img = _skin()
    for x0, y0 in ((30, 30), (200, 150), (40, 160)):
        cv2.line(img, (x0, y0), (x0 + 18, y0 + 14), VIOLET_INK, 3)
        cv2.line(img, (x0 + 18, y0), (x0, y0 + 14), VIOLET_INK, 3)
    flag, score = detect_ink(img)
    assert flag
    assert score >= 0.002


def test_no_ink_on_plain_lesion_or_sticker():
    assert detect_ink(_skin()) == (False, 0.0)
    assert not detect_ink(_with_disc(STICKERS["blue"]))[0]


def test_violet_patch_inside_a_dark_lesion_is_not_ink():
    # Blue-violet structures inside a melanoma share ink's colour; ink lies on skin.
    img = _skin()
    cv2.ellipse(img, (128, 96), (60, 45), 0, 0, 360, (70, 45, 35), -1)
    cv2.ellipse(img, (128, 96), (25, 18), 0, 0, 360, VIOLET_INK, -1)
    assert not detect_ink(img)[0]


def test_detectors_validate_the_image_contract():
    with pytest.raises(ImageError, match="uint8"):
        detect_colour_disc(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        detect_ink(np.zeros((8, 8), np.uint8))


def test_audit_images_rows_in_order_with_bad_files(tmp_path):
    disc_path = tmp_path / "disc.png"
    write_rgb(disc_path, _with_disc(STICKERS["orange"]))
    plain_path = tmp_path / "plain.png"
    write_rgb(plain_path, _skin(height=150, width=200))
    corrupt_path = tmp_path / "corrupt.jpg"
    corrupt_path.write_bytes(b"not a jpeg at all")
    items = [
        Record("disc_id", str(disc_path), 0, "g1", "A"),
        str(plain_path),
        corrupt_path,
        str(tmp_path / "missing.jpg"),
    ]
    rows = audit_images(items, workers=2)
    assert [r["image_id"] for r in rows] == ["disc_id", "plain", "corrupt", "missing"]
    assert [r["readable"] for r in rows] == [True, True, False, False]
    assert (rows[0]["width"], rows[0]["height"]) == (256, 192)
    assert (rows[1]["width"], rows[1]["height"]) == (200, 150)
    assert rows[0]["colour_disc"] and not rows[1]["colour_disc"]
    assert rows[2]["error"] and "missing.jpg" in rows[3]["error"]
    assert rows[3]["width"] is None and not rows[3]["colour_disc"]
    assert audit_images(items, workers=1) == rows


def test_audit_images_rejects_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        audit_images(["a.jpg"], workers=0)
    with pytest.raises(TypeError, match="image_id"):
        audit_images([42])


def _row(image_id, disc=False, ink=False, size=(200, 150), readable=True):
    return {"image_id": image_id, "path": f"{image_id}.jpg", "width": size[0] if readable else None,
            "height": size[1] if readable else None, "readable": readable,
            "error": "" if readable else "cannot decode", "colour_disc": disc,
            "colour_disc_score": float(disc), "ink": ink, "ink_score": 0.0}


def test_summarise_audit_per_class_rates_sizes_and_sources():
    rows = [
        _row("n1", disc=True), _row("n2", disc=True, size=(256, 256)), _row("n3"),
        _row("n4", ink=True), _row("n5", readable=False),
        _row("m1", ink=True), _row("m2"),
    ]
    labels = [0, 0, 0, 0, 0, 1, 1]
    sources = ["ISIC2017", "ISIC2017", "HAM", "HAM", "HAM", "HAM", "HAM"]
    summary = summarise_audit(rows, labels, sources)

    assert summary["n_images"] == 7
    assert summary["n_unreadable"] == 1
    assert summary["unreadable"] == [{"image_id": "n5", "path": "n5.jpg", "error": "cannot decode"}]
    nevus, melanoma = summary["per_class"]["nevus"], summary["per_class"]["melanoma"]
    assert (nevus["n"], nevus["n_readable"], nevus["n_unreadable"]) == (5, 4, 1)
    assert nevus["colour_disc"] == {"count": 2, "rate": 0.5}  # over the 4 readable nevi
    assert nevus["ink"] == {"count": 1, "rate": 0.25}
    assert melanoma["colour_disc"] == {"count": 0, "rate": 0.0}
    assert melanoma["ink"] == {"count": 1, "rate": 0.5}
    assert nevus["sizes"] == {"200x150": 3, "256x256": 1}
    assert nevus["sources"] == {"HAM": 3, "ISIC2017": 2}
    assert melanoma["sources"] == {"HAM": 2}


def test_summarise_audit_names_classes_and_checks_lengths():
    rows = [_row("a", readable=False), _row("b")]
    summary = summarise_audit(rows, ["seborrheic_keratosis", 1], ["x", "y"])
    assert summary["per_class"]["seborrheic_keratosis"]["colour_disc"] == {"count": 0, "rate": None}
    assert set(summary["per_class"]) == {"seborrheic_keratosis", "melanoma"}
    with pytest.raises(ValueError, match="equal lengths"):
        summarise_audit(rows, [0], ["x", "y"])
