"""Mixup augmentation (BranchConfig.mixup): blended images, soft labels and weights, training only."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import separable_images

from colorspaces import apply_view
from models import BranchConfig
from models.augment import mixup
from models.branch import predict_branch_proba
from models.train import fit_branch, training_batches


def test_mixup_blends_images_labels_and_weights_with_one_weight_per_image(rng):
    x = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    y = np.array([0.0, 1.0] * 16)
    w = np.linspace(1.0, 2.0, 32)
    images, labels, weights = mixup(x, y, w, np.random.default_rng(3), 0.4)
    assert images.shape == x.shape and images.dtype == np.uint8
    assert labels.dtype == np.float32 and weights.dtype == np.float32
    # Replay the draws: each output is l * own + (1 - l) * partner, for images, labels and weights.
    r = np.random.default_rng(3)
    lam, partner = r.beta(0.4, 0.4, 32).astype(np.float32), r.permutation(32)
    total = lam * w + (1 - lam) * w[partner]
    np.testing.assert_allclose(weights, total, rtol=1e-6)
    np.testing.assert_allclose(labels, (lam * w * y + (1 - lam) * w[partner] * y[partner]) / total, atol=1e-6)
    ones = mixup(x, y, np.ones(32), np.random.default_rng(3), 0.4)[1]
    np.testing.assert_allclose(ones, lam * y + (1 - lam) * y[partner], atol=1e-6)  # equal weights: the plain blend
    expected = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner].astype(np.float32)
    assert np.abs(images.astype(np.float32) - expected).max() <= 0.5 + 1e-3  # rounding only
    assert ((labels > 0.01) & (labels < 0.99)).sum() >= 4  # some melanoma-nevus pairs really blend
    again = mixup(x, y, w, np.random.default_rng(3), 0.4)
    np.testing.assert_array_equal(again[0], images)


def test_with_class_weights_a_blended_pair_keeps_the_weighted_loss():
    """l w_i BCE(y_i) + (1 - l) w_j BCE(y_j) == W BCE(t) for every prediction: the soft label carries the weights."""
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y, w = np.array([1.0, 0.0]), np.array([5.0, 0.55])  # balanced class weights at about 9% melanoma
    images, labels, weights = mixup(x, y, w, np.random.default_rng(5), 1.0)  # seed 5: the two swap, l0 = 0.64
    r = np.random.default_rng(5)
    lam, partner = r.beta(1.0, 1.0, 2).astype(np.float32), r.permutation(2)
    for i in range(2):
        for p in (0.1, 0.5, 0.9):
            bce = lambda t: -(t * np.log(p) + (1 - t) * np.log(1 - p))  # noqa: E731
            blended = lam[i] * w[i] * bce(y[i]) + (1 - lam[i]) * w[partner[i]] * bce(y[partner[i]])
            assert weights[i] * bce(labels[i]) == pytest.approx(blended, rel=1e-5)
    assert list(partner) == [1, 0]
    # A melanoma-nevus blend: the target leans to melanoma beyond the blend weight (0.94 against 0.64).
    assert labels[0] > lam[0] + 0.2


def test_weightless_images_blend_without_dividing_by_zero():
    x = np.zeros((4, 4, 4, 3), np.uint8)
    _, labels, weights = mixup(x, np.array([0.0, 1.0, 0.0, 1.0]), np.zeros(4), np.random.default_rng(0), 0.4)
    assert np.all(np.isfinite(labels)) and np.all(weights == 0)


def test_training_batches_carry_soft_labels_only_with_mixup(rng):
    x = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    y = np.array([0] * 48 + [1] * 16)

    def labels(**kw):
        config = BranchConfig(image_size=16, batch_size=16, epochs=1, **kw)
        ds, _ = training_batches(x, y, config, {0: 1.0, 1: 1.0})
        return np.concatenate([b[1] for b in ds.as_numpy_iterator()])

    plain = labels()
    assert set(np.unique(plain)) == {0.0, 1.0}
    mixed = labels(mixup=0.4)
    assert ((mixed > 0.01) & (mixed < 0.99)).any()
    assert mixed.min() >= 0.0 and mixed.max() <= 1.0
    # The sampled (oversampled) order is the same: mixup only blends within each batch.
    assert abs(mixed.mean() - plain.mean()) < 0.1


def test_the_training_auc_counts_each_blend_as_its_larger_share():
    from models.train import DominantLabelAUC

    y = np.array([0.02, 0.0, 1.0, 0.98, 0.3, 0.6], np.float32)
    p = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.5], np.float32)
    metric = DominantLabelAUC(num_thresholds=1000)
    metric.update_state(y, p)
    from sklearn.metrics import roc_auc_score

    assert float(metric.result()) == pytest.approx(roc_auc_score(y >= 0.5, p), abs=0.01)  # 0.667, not 1.0


def test_a_mixup_run_resumes_from_its_checkpoint(rng, tmp_path):
    """The checkpoint holds the training AUC metric; --resume must load it."""
    import keras

    xt, yt = separable_images(32, 16, rng)
    config = BranchConfig(image_size=16, base_filters=4, epochs=2, patience=2, batch_size=16, mixup=0.4)

    class StopAfterOne(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    fit_branch(config, xt, yt, xt, yt, checkpoint_dir=tmp_path, callbacks=[StopAfterOne()])
    _, history = fit_branch(config, xt, yt, xt, yt, checkpoint_dir=tmp_path, resume=True)
    assert history["resumed_from_epoch"] == 1 and len(history["per_epoch"]["auc"]) == 2


@pytest.mark.parametrize("value", [-0.1, 11.0])
def test_mixup_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match="mixup"):
        BranchConfig(mixup=value)


def test_mixup_is_a_train_flag_with_its_help():
    from skinfusion.cli import train

    text = train.parser().format_help()
    assert "--mixup M" in text and "Beta(M, M)" in " ".join(text.split())
    assert train.parser().parse_args(["--view", "rgb", "--data", "d", "--run", "r", "--mixup", "0.4"]).mixup == 0.4


@pytest.mark.slow
def test_a_branch_trained_with_mixup_still_learns(rng):
    from sklearn.metrics import roc_auc_score

    xt, yt = separable_images(64, 16, rng)
    xv, yv = separable_images(32, 16, rng)
    config = BranchConfig(image_size=16, base_filters=4, epochs=6, patience=6, batch_size=16, mixup=0.4)
    model, _ = fit_branch(config, xt, yt, xv, yv)
    assert roc_auc_score(yv, predict_branch_proba(model, apply_view("rgb", xv))) > 0.95
