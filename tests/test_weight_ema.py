"""Weight averaging (BranchConfig.weight_ema): validated, kept and resumed on the averaged weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import separable_images

from colorspaces import apply_view
from models import BranchConfig
from models.checkpoint import averaged_weights
from models.train import fit_branch




def _bce(model, x, y) -> float:
    p = np.clip(model.predict_on_batch(x).reshape(-1), 1e-7, 1 - 1e-7)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


class _Recorder(keras.callbacks.Callback):
    """Each epoch: the training weights, the averaged ones, and the validation loss of each."""

    def __init__(self, xv, yv):
        super().__init__()
        self.xv, self.yv = xv, yv
        self.raw, self.averaged, self.loss_raw, self.loss_averaged, self.val_loss = [], [], [], [], []

    def on_epoch_end(self, epoch, logs=None):
        raw, averaged = self.model.get_weights(), averaged_weights(self.model)
        self.raw.append(raw)
        self.averaged.append(averaged)
        self.val_loss.append(logs["val_loss"])
        self.loss_raw.append(_bce(self.model, self.xv, self.yv))
        self.model.set_weights(averaged)
        self.loss_averaged.append(_bce(self.model, self.xv, self.yv))
        self.model.set_weights(raw)


def _same(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xt, yt = separable_images(64, 16, rng)
    xv, yv = separable_images(32, 16, rng)
    return xt, yt, xv, yv


def test_the_averaged_weights_are_validated_and_kept(data):
    xt, yt, xv, yv = data
    config = BranchConfig(image_size=16, base_filters=4, epochs=5, patience=5, batch_size=16,
                          weight_ema=0.9)
    recorder = _Recorder(apply_view("rgb", xv), yv.astype(np.float64))
    model, history = fit_branch(config, xt, yt, xv, yv, callbacks=[recorder])
    for epoch in range(config.epochs):
        assert not _same(recorder.raw[epoch], recorder.averaged[epoch]), "the average differs from the weights"
        # Keras' validation loss is the averaged weights' loss, not the training weights'.
        assert recorder.val_loss[epoch] == pytest.approx(recorder.loss_averaged[epoch], rel=1e-4)
        assert abs(recorder.loss_averaged[epoch] - recorder.loss_raw[epoch]) > 1e-4
    best = history["best_epoch"] - 1
    assert _same(model.get_weights(), recorder.averaged[best]), "the branch keeps the best epoch's averaged weights"
    from sklearn.metrics import roc_auc_score

    from models.branch import predict_branch_proba

    assert roc_auc_score(yv, predict_branch_proba(model, apply_view("rgb", xv))) > 0.9


def test_without_averaging_the_kept_weights_are_the_trained_ones(data):
    xt, yt, xv, yv = data
    config = BranchConfig(image_size=16, base_filters=4, epochs=2, patience=2, batch_size=16)
    recorder = _Recorder(apply_view("rgb", xv), yv.astype(np.float64))
    model, history = fit_branch(config, xt, yt, xv, yv, callbacks=[recorder])
    assert all(_same(r, a) for r, a in zip(recorder.raw, recorder.averaged))
    assert _same(model.get_weights(), recorder.raw[history["best_epoch"] - 1])


def test_a_resumed_averaged_run_ends_where_an_uninterrupted_one_does(data, tmp_path):
    """The averages are optimizer state: saved in the checkpoint and carried on after --resume."""
    xt, yt, xv, yv = data
    config = BranchConfig(image_size=16, base_filters=4, epochs=3, patience=3, batch_size=16,
                          weight_ema=0.9)
    whole, whole_history = fit_branch(config, xt, yt, xv, yv, checkpoint_dir=tmp_path / "whole")

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    fit_branch(config, xt, yt, xv, yv, checkpoint_dir=tmp_path / "cut", callbacks=[StopAfterTwo()])
    resumed, history = fit_branch(config, xt, yt, xv, yv, checkpoint_dir=tmp_path / "cut", resume=True)
    assert history["resumed_from_epoch"] == 2
    # Epoch 3's validation ran on averages carried over from epochs 1-2: lost averages would change it.
    np.testing.assert_allclose(history["per_epoch"]["val_loss"], whole_history["per_epoch"]["val_loss"], rtol=1e-4)
    for a, b in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [0.3, 1.0, -0.5])
def test_weight_ema_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match="weight_ema"):
        BranchConfig(weight_ema=value)


def test_batchnorm_statistics_are_re_estimated_as_the_average_of_the_batches():
    from models.ema import reestimate_batchnorm

    from models.checkpoint import seed_states

    inputs = keras.Input((4, 4, 2))
    bn = keras.layers.BatchNormalization(momentum=0.9)
    pooled = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(bn(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(1)(pooled))
    seeds = seed_states(model)
    rng = np.random.default_rng(1)
    batches = [(rng.normal([3.0, -1.0], [2.0, 0.5], size=(8, 4, 4, 2)).astype(np.float32),) for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 3
    values = np.stack([b[0] for b in batches])  # (batch, 8, 4, 4, 2)
    np.testing.assert_allclose(bn.moving_mean.numpy(), values.mean(axis=(0, 1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), values.var(axis=(1, 2, 3)).mean(axis=0), rtol=1e-4)
    assert bn.momentum == 0.9, "the layer's own momentum is put back"
    assert seed_states(model) == seeds, "dropout draws the masks training would have drawn"


def test_the_kept_averaged_weights_carry_batchnorm_statistics_of_their_own(data):
    """bn1 normalises conv1's output: its statistics must be those of the averaged conv1 on training images."""
    xt, yt, xv, yv = data
    config = BranchConfig(image_size=16, base_filters=4, epochs=3, patience=3, batch_size=16,
                          weight_ema=0.9)
    model, _ = fit_branch(config, xt, yt, xv, yv)
    probe = keras.Model(model.inputs[0], model.get_layer("bn1").input)
    from models.ema import batchnorm_sample

    picked = batchnorm_sample(yt, config.sampling, config.seed)  # one epoch's order under oversampling
    assert np.mean(yt[picked]) == pytest.approx(0.5), "the training's class mix, not the data's"
    x = apply_view("rgb", xt[picked])
    outs = [probe(x[k:k + 16], training=False).numpy() for k in range(0, len(x), 16)]
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), np.mean([o.mean(axis=(0, 1, 2)) for o in outs], axis=0),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), np.mean([o.var(axis=(0, 1, 2)) for o in outs], axis=0),
                               rtol=1e-3, atol=1e-5)
