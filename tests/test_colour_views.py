"""The optional LAB and YCrCb views (known colours, RGB order, one VIEWS entry each), and the default
Shades-of-Gray twins of the colour views."""

import numpy as np
import pytest

from colorspaces import DEFAULT_VIEWS, DESIGN_VIEWS, VIEWS, apply_constancy, apply_view, to_lab, to_ycrcb


def solid(rgb, shape=(4, 5)):
    return np.full((*shape, 3), rgb, dtype=np.uint8)


# Expected 8-bit values (before / 255) from the definitions: CIE L*a*b* of sRGB with L* x 255/100 and
# a*, b* + 128 (red: L* 53.24, a* 80.09, b* 67.20); YCrCb BT.601: Y = .299 R + .587 G + .114 B,
# Cr = (R - Y) .713 + 128, Cb = (B - Y) .564 + 128.
@pytest.mark.parametrize("rgb, lab, ycrcb", [
    ((255, 255, 255), (255, 128, 128), (255, 128, 128)),
    ((0, 0, 0), (0, 128, 128), (0, 128, 128)),
    ((255, 0, 0), (136, 208, 195), (76, 255, 85)),
    ((0, 0, 255), (82, 207, 20), (29, 107, 255)),
])
def test_known_colours(rgb, lab, ycrcb):
    np.testing.assert_allclose(to_lab(solid(rgb)) * 255, np.broadcast_to(lab, (4, 5, 3)), atol=1.01)
    np.testing.assert_allclose(to_ycrcb(solid(rgb)) * 255, np.broadcast_to(ycrcb, (4, 5, 3)), atol=1.01)


def test_grey_has_no_chroma_in_either_view():
    grey = solid((90, 90, 90))
    for view in (to_lab(grey), to_ycrcb(grey)):
        np.testing.assert_allclose(view[..., 1:], 128 / 255, atol=1e-6)


@pytest.mark.parametrize("view", ["lab", "ycrcb"])
def test_batch_equals_single_images_and_values_are_in_0_1(view, rng):
    batch = rng.integers(0, 256, (3, 7, 9, 3), dtype=np.uint8)
    out = apply_view(view, batch)
    assert out.dtype == np.float32 and out.shape == (3, 7, 9, 3) and out.min() >= 0 and out.max() <= 1
    for i in range(3):
        np.testing.assert_array_equal(out[i], apply_view(view, batch[i]))


def test_they_are_options_trainable_by_name_but_not_defaults():
    from skinfusion.cli.train import parser

    assert {"lab", "ycrcb"} <= set(VIEWS) and not {"lab", "ycrcb"} & set(DEFAULT_VIEWS)
    for view in ("lab", "ycrcb"):
        args = parser().parse_args(["--view", view, "--data", "d", "--run", "r"])
        assert args.view == view


def test_the_default_keeps_the_design_views_first_and_adds_the_colour_normalised_twins():
    assert DESIGN_VIEWS == ("rgb", "hsv", "fft") and DEFAULT_VIEWS == DESIGN_VIEWS + ("rgb_sog", "hsv_sog")


@pytest.mark.parametrize("view, base", [("rgb_sog", "rgb"), ("hsv_sog", "hsv")])
def test_sog_views_are_the_base_view_of_the_colour_normalised_image(view, base, rng):
    img = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    # Exactly what a branch of the base view trained with --color-constancy shades_of_gray receives.
    np.testing.assert_array_equal(apply_view(view, img), apply_view(base, apply_constancy("shades_of_gray", img)))
    for i in range(3):
        np.testing.assert_array_equal(apply_view(view, img)[i], apply_view(view, img[i]))


def test_sog_views_undo_an_illuminant_cast_that_the_plain_views_keep(rng):
    # A lesion photographed under a warm light: the same scene with red up and blue down.
    scene = rng.integers(40, 180, (1, 32, 32, 3), dtype=np.uint8)
    cast = np.clip(scene.astype(np.float32) * np.array([1.3, 1.0, 0.75]), 0, 255).round().astype(np.uint8)
    for view, base in (("rgb_sog", "rgb"), ("hsv_sog", "hsv")):
        plain = np.abs(apply_view(base, cast) - apply_view(base, scene)).mean()
        normalised = np.abs(apply_view(view, cast) - apply_view(view, scene)).mean()
        assert normalised < plain / 4, (view, normalised, plain)


@pytest.mark.parametrize("view", [v for v, spec in VIEWS.items() if spec.base is not None])
def test_a_view_built_on_another_is_exactly_that_view_of_the_corrected_image(view, rng):
    # branch_inputs relies on the declaration to share the correction: a wrong one would score
    # a branch on arrays it never saw in training.
    spec = VIEWS[view]
    img = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(spec.transform(img), apply_view(spec.base, apply_constancy(spec.constancy, img)))


def test_branch_inputs_equal_each_branch_alone_and_correct_each_batch_once(rng, monkeypatch):
    import colorspaces.constancy as constancy
    from colorspaces.pipeline import BranchRecipe, Preprocess, view_inputs

    branches = tuple(BranchRecipe(v) for v in DEFAULT_VIEWS) + (
        BranchRecipe("rgb", "shades_of_gray"), BranchRecipe("hsv_sog", "shades_of_gray"), BranchRecipe("hsv", "none", 3))
    recipe = Preprocess(16, 20, branches)
    batch = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    alone = [view_inputs(batch, b.view, 16, b.color_constancy, b.crop_stride) for b in branches]

    calls = []
    real = constancy.shades_of_gray
    monkeypatch.setitem(constancy.CONSTANCY, "shades_of_gray", lambda x: calls.append(x.shape) or real(x))
    shared = recipe.branch_inputs(batch)
    assert len(shared) == len(alone)
    for (x, k), (y, j), b in zip(shared, alone, branches):
        assert k == j and x.dtype == np.float32, b
        np.testing.assert_array_equal(x, y, err_msg=str(b))
    # Three corrections: rgb_sog and hsv_sog share one (of the 9 windows); the branch trained with
    # constancy corrects the whole images once; hsv_sog on those corrects its windows once more.
    assert calls == [(27, 16, 16, 3), (3, 20, 20, 3), (27, 16, 16, 3)]
