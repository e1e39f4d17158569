"""BranchConfig.block_order: pooling before BatchNorm and ReLU (the faster order) and the default order."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models import BranchConfig, build_branch
from experiments.bn_warmup import toy_task
from models.branch import predict_branch_proba

POOL_FIRST, BN_FIRST = "conv-pool-bn-relu", "conv-bn-relu-pool"


def _kinds(model, block: int) -> list[str]:
    names = [layer.name for layer in model.layers]
    return [n.rstrip("0123456789") for n in names if n.endswith(str(block)) and not n.startswith("m")]


def test_each_block_pools_before_batchnorm_by_default_with_the_same_weights_as_the_old_order():
    assert BranchConfig().block_order == POOL_FIRST
    default = build_branch(BranchConfig(view="rgb", image_size=32, block_order=BN_FIRST))
    pooled = build_branch(BranchConfig(view="rgb", image_size=32))
    for block in range(1, 5):
        assert _kinds(default, block) == ["conv", "bn", "relu", "pool"]
        assert _kinds(pooled, block) == ["conv", "pool", "bn", "relu"]
    assert [w.shape for w in default.weights] == [w.shape for w in pooled.weights]
    assert pooled.get_layer("bn1").output.shape[1:] == (16, 16, 16)  # BatchNorm on the pooled maps


def _randomised(model, rng: np.random.Generator, negative_gamma: bool):
    """Random BatchNorm weights and statistics (the convolutions keep their random initialisation); every
    BatchNorm scale positive unless ``negative_gamma`` (then bn2's are all negative)."""
    for layer in model.layers:
        if layer.name.startswith("bn"):
            gamma, beta, mean, var = (w.numpy() for w in layer.weights)
            gamma = rng.uniform(0.5, 2.0, gamma.shape).astype("float32")
            if negative_gamma and layer.name == "bn2":
                gamma = -gamma
            layer.set_weights([gamma, rng.normal(0, 0.3, beta.shape).astype("float32"),
                               rng.normal(0, 0.3, mean.shape).astype("float32"),
                               rng.uniform(0.5, 2.0, var.shape).astype("float32")])
    return model


@pytest.mark.parametrize("negative_gamma", [False, True])
def test_the_orders_compute_the_same_function_when_every_batchnorm_scale_is_positive(negative_gamma):
    # Max pooling commutes with ReLU and with an increasing affine map (inference-mode BatchNorm
    # with a positive scale), so the same weights give the same probabilities in both orders;
    # negative scales break it, which shows the comparison can fail.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    default = _randomised(build_branch(BranchConfig(view="rgb", image_size=32, block_order=BN_FIRST)), rng,
                          negative_gamma)
    pooled = build_branch(BranchConfig(view="rgb", image_size=32, block_order=POOL_FIRST))
    pooled.set_weights(default.get_weights())
    x = rng.uniform(0, 1, (16, 32, 32, 3)).astype("float32")
    a, b = predict_branch_proba(default, x), predict_branch_proba(pooled, x)
    assert np.std(a) > 1e-3  # not saturated: the probabilities tell the images apart
    if negative_gamma:
        assert np.max(np.abs(a - b)) > 1e-4
    else:
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_configs_saved_before_the_field_existed_read_as_the_order_they_were_trained_in():
    # Whatever the default is, a config.json without the key was trained in the only order there was.
    saved = BranchConfig(view="hsv").to_dict()
    del saved["block_order"]
    assert BranchConfig.from_saved(saved).block_order == BN_FIRST
    assert BranchConfig(view="hsv", block_order=BN_FIRST).matches(saved)
    assert not BranchConfig(view="hsv").matches(saved)
    assert BranchConfig.from_dict(saved).block_order == POOL_FIRST  # a --config file: today's default
    with pytest.raises(ValueError, match="block_order must be one of"):
        BranchConfig(view="rgb", block_order="pool-conv")


def test_train_flag_refuses_an_unknown_order_in_one_line(tmp_path, capsys):
    from skinfusion.cli import train_main

    with pytest.raises(SystemExit) as exc:
        train_main(["--view", "rgb", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--block-order", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--block-order" in err and "Traceback" not in err


@pytest.mark.parametrize("seed", [0, 1])
def test_a_few_steps_of_the_default_order_validate_on_statistics_of_the_current_weights(seed):
    from models.train import fit_branch

    # 12 steps: BatchNorm's moving statistics (mean 0, variance 1 at the start, momentum 0.9) still
    # lag the pooled maps; validated on them, these seeds scored AUC 0.00 and 0.12 on a separable task.
    x, y = toy_task(seed)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, batch_size=8, epochs=2, patience=2, seed=seed)
    _, history = fit_branch(config, x, y, x, y)
    assert min(history["per_epoch"]["val_auc"]) > 0.9


def test_batchnorm_is_reestimated_before_validation_only_during_the_first_steps():
    from models.ema import BN_WARMUP_STEPS, BatchNormWarmup

    x, _ = toy_task(0, n=16)
    model = build_branch(BranchConfig(view="rgb", image_size=16, base_filters=4))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    warmup = BatchNormWarmup(lambda: [x.astype("float32") / 255.0])
    warmup.set_model(model)
    bn = model.get_layer("bn1")
    for steps, changes in ((BN_WARMUP_STEPS - 1, True), (BN_WARMUP_STEPS, False)):
        model.optimizer.iterations.assign(steps)
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
        warmup.on_test_begin()
        assert bool(np.any(bn.moving_mean.numpy() != 0)) == changes
