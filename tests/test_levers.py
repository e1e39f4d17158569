"""Domain-generalisation levers: source-balanced sampling, acquisition augmentation, greedy ensemble selection."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import separable_images

from colorspaces import apply_view
from ensemble.selection import greedy_selection
from models import BranchConfig
from models.augment import acquisition_shift, augment_batch
from models.branch import predict_branch_proba
from models.sampling import describe_source_balance
from models.train import epoch_order, fit_branch, training_batches
from skinfusion.data.index import source_family


def _cells(idx, y, src):
    return {(s, c): int(np.sum((src[idx] == s) & (y[idx] == c))) for s in np.unique(src) for c in (0, 1)}


@pytest.fixture
def two_sources():
    # A big source (400 nevi, 80 melanomas) and a small one (40 nevi, 10 melanomas).
    y = np.array([0] * 400 + [1] * 80 + [0] * 40 + [1] * 10)
    src = np.array(["big"] * 480 + ["small"] * 50)
    return y, src


def test_full_source_balance_gives_every_source_an_equal_share_of_each_class(two_sources):
    y, src = two_sources
    plain = epoch_order(y, "oversample", np.random.default_rng(0))
    idx = epoch_order(y, "oversample", np.random.default_rng(0), src, 1.0)
    assert len(idx) == len(plain)  # an epoch keeps its number of steps
    cells = _cells(idx, y, src)
    assert cells[("big", 0)] == cells[("small", 0)] == 220
    assert cells[("big", 1)] == cells[("small", 1)] == 220


def test_no_source_balance_keeps_the_natural_shares(two_sources):
    y, src = two_sources
    a = epoch_order(y, "oversample", np.random.default_rng(3))
    b = epoch_order(y, "oversample", np.random.default_rng(3), src, 0.0)
    np.testing.assert_array_equal(a, b)
    cells = _cells(b, y, src)
    assert cells[("big", 0)] == 400 and cells[("small", 0)] == 40


def test_partial_source_balance_lies_between(two_sources):
    y, src = two_sources
    cells = _cells(epoch_order(y, "oversample", np.random.default_rng(0), src, 0.5), y, src)
    # nevi: weights sqrt(400) : sqrt(40), so the small source gets 440 / (1 + sqrt(10)) = 106
    assert 40 < cells[("small", 0)] < 220
    assert cells[("small", 0)] == round(440 / (1 + np.sqrt(10)))


def test_one_source_is_left_alone(two_sources):
    y, _ = two_sources
    a = epoch_order(y, "oversample", np.random.default_rng(1))
    b = epoch_order(y, "oversample", np.random.default_rng(1), np.array(["x"] * len(y)), 1.0)
    np.testing.assert_array_equal(a, b)


def test_training_batches_carry_the_source_balance(two_sources):
    y, src = two_sources
    # Each image's pixel value names its source, so the batches can be counted.
    images = np.where((src == "small")[:, None, None, None], 200, 10).astype(np.uint8) * np.ones((1, 16, 16, 3),
                                                                                                np.uint8)
    config = BranchConfig(image_size=16, batch_size=64, augment=False, source_balance=1.0, epochs=1)
    ds, steps = training_batches(images, y, config, {0: 1.0, 1: 1.0}, sources=src)
    small = sum(int(np.sum(x.numpy()[:, 0, 0, 0] > 0.5)) for x, _, _ in ds)
    assert small == 440  # half of the 880 draws of the epoch


def test_fit_branch_needs_the_sources_for_source_balance(rng):
    x, y = separable_images(32, 16, rng)
    with pytest.raises(ValueError, match="train_sources"):
        fit_branch(BranchConfig(image_size=16, epochs=1, source_balance=1.0), x, y, x, y)


@pytest.mark.slow
def test_a_source_balanced_branch_still_learns(rng):
    xt, yt = separable_images(64, 16, rng)
    xv, yv = separable_images(32, 16, rng)
    sources = np.array(["a"] * 48 + ["b"] * 16)
    config = BranchConfig(image_size=16, base_filters=4, epochs=6, patience=6, batch_size=16,
                          source_balance=1.0, acquisition=0.5)
    model, _ = fit_branch(config, xt, yt, xv, yv, train_sources=sources)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(yv, predict_branch_proba(model, apply_view("rgb", xv))) > 0.95


def test_acquisition_shift_changes_images_reproducibly(rng):
    x = rng.integers(0, 256, (16, 48, 48, 3), dtype=np.uint8)
    a = acquisition_shift(x, np.random.default_rng(5), 1.0)
    b = acquisition_shift(x, np.random.default_rng(5), 1.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.uint8
    changed = np.array([np.abs(a[i].astype(int) - x[i]).mean() > 1 for i in range(len(x))])
    assert changed.mean() > 0.7  # each change fires with probability 1/2: most images get one
    weak = acquisition_shift(x, np.random.default_rng(5), 0.1)
    assert np.abs(weak.astype(int) - x).mean() < np.abs(a.astype(int) - x).mean()


def test_acquisition_changes_white_balance_of_a_grey_image():
    grey = np.full((64, 32, 32, 3), 128, np.uint8)
    out = acquisition_shift(grey, np.random.default_rng(0), 1.0).astype(int)
    # White balance and temperature make some grey images tinted (red and blue apart).
    assert np.abs(out[..., 0] - out[..., 2]).max() > 5


def test_acquisition_zero_leaves_augmentation_as_before(rng):
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    before = augment_batch(x, np.random.default_rng(1), BranchConfig(image_size=32))
    with_zero = augment_batch(x, np.random.default_rng(1), BranchConfig(image_size=32, acquisition=0.0))
    with_one = augment_batch(x, np.random.default_rng(1), BranchConfig(image_size=32, acquisition=1.0))
    np.testing.assert_array_equal(before, with_zero)
    assert not np.array_equal(before, with_one)


@pytest.mark.parametrize("field", ["source_balance", "acquisition"])
def test_lever_values_outside_zero_one_are_refused(field):
    with pytest.raises(ValueError, match=field):
        BranchConfig(**{field: 1.5})


def test_greedy_selection_keeps_informative_members_and_drops_noise(rng):
    y = rng.integers(0, 2, 600)
    good, good2, noise = y + rng.normal(0, 1, 600), y + rng.normal(0, 1, 600), rng.normal(0, 1, 600)
    w = greedy_selection(np.c_[good, noise, good2], y)
    assert w[1] == 0 and w[0] > 0 and w[2] > 0
    assert w.sum() == pytest.approx(1.0)


def test_greedy_selection_of_one_strong_member_alone():
    y = np.array([0, 0, 1, 1] * 50)
    perfect = y.astype(float)
    w = greedy_selection(np.c_[perfect, 1 - perfect], y)
    np.testing.assert_array_equal(w, [1.0, 0.0])


def test_greedy_selection_refuses_one_class():
    with pytest.raises(ValueError, match="both classes"):
        greedy_selection(np.ones((4, 2)), np.zeros(4))


@pytest.mark.parametrize("source, family", [("ISIC2017_train", "ISIC2017"), ("ISIC2017_val", "ISIC2017"),
                                            ("HAM10000", "HAM10000"), ("clinic-test", "clinic"),
                                            ("ISIC_archive", "ISIC_archive"), ("train", "train")])
def test_source_family_merges_split_suffixes(source, family):
    assert source_family(source) == family


def test_select_fusion_weights_the_members_that_earn_their_place(rng):
    from ensemble.fusion import FUSION_METHODS, make_fusion

    y = rng.integers(0, 2, 400)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    P = np.c_[sig(2 * y - 1 + rng.normal(0, 1, 400)), sig(rng.normal(0, 1, 400)), sig(2 * y - 1 + rng.normal(0, 1, 400))]
    fusion = make_fusion("select").fit(P, y)
    assert "select" in FUSION_METHODS and fusion.supports_folds
    assert fusion.weights_[1] == 0 and fusion.weights_[0] > 0 and fusion.weights_[2] > 0
    np.testing.assert_allclose(fusion.predict_proba(P)[:, 1], P @ fusion.weights_)
    # The threshold's probabilities are cross-fitted, not the in-sample fused ones.
    assert fusion.held_out_proba_.shape == (400,)
    assert not np.allclose(fusion.held_out_proba_, P @ fusion.weights_)
    assert fusion.describe(["rgb", "noise", "hsv"])["noise"] == 0


def test_the_source_balance_summary_counts_what_an_epoch_draws(two_sources):
    y, src = two_sources
    line = describe_source_balance(y, src, "oversample", 1.0)
    # oversampling makes 440 draws of each class; full balance gives each source half
    assert line == ("nevi big 220/400 (x0.6), small 220/40 (x5.5); "
                    "melanomas big 220/80 (x2.8), small 220/10 (x22.0)")
    idx = epoch_order(y, "oversample", np.random.default_rng(0), src, 0.5)
    cells = _cells(idx, y, src)
    half = describe_source_balance(y, src, "oversample", 0.5)
    assert f"small {cells[('small', 0)]}/40" in half and f"big {cells[('big', 1)]}/80" in half
    assert describe_source_balance(y, src, "none", 0.0).startswith("nevi big 400/400 (x1.0), small 40/40 (x1.0)")


@pytest.mark.parametrize("sampling", ["none", "undersample", "oversample"])
@pytest.mark.parametrize("melanoma_majority", [False, True])
def test_the_source_balance_summary_and_the_epoch_draw_the_same_numbers(two_sources, sampling, melanoma_majority):
    # One rule (class_draws) for both: the summary once said undersampling kept as many
    # melanomas as nevi when melanomas were the majority, while the epoch kept every melanoma.
    y, src = two_sources
    if melanoma_majority:
        y = 1 - y
    idx = epoch_order(y, sampling, np.random.default_rng(0), src, 0.5)
    cells = _cells(idx, y, src)
    line = describe_source_balance(y, src, sampling, 0.5)
    for s, c in cells:
        label = "nevi" if c == 0 else "melanomas"
        part = line.split("; ")[c]
        assert part.startswith(label) and f"{s} {cells[(s, c)]}/{int(np.sum((y == c) & (src == s)))}" in part
