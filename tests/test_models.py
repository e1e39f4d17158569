import dataclasses

import keras
import numpy as np
import pytest

from colorspaces import VIEWS, apply_view
from models import BranchConfig, build_branch, load_branch, predict_branch_proba, save_branch
from models.augment import augment_batch
from models.train import class_weights, fit_branch

from helpers import separable_images


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_branch_has_five_weight_layers_and_a_probability_output(view, rng):
    config = BranchConfig(view=view, image_size=16, base_filters=4)
    model = build_branch(config)
    weight_layers = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(weight_layers) == 5
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    x = apply_view(view, rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    p = predict_branch_proba(model, x)
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))


def test_config_round_trip_and_validation():
    config = BranchConfig(view="hsv", image_size=48, epochs=3)
    assert BranchConfig.from_dict(config.to_dict()) == config
    with pytest.raises(KeyError, match="unknown branch config keys"):
        BranchConfig.from_dict({"view": "rgb", "imagesize": 32})
    with pytest.raises(KeyError, match="choose one of"):
        BranchConfig(view="xyz")
    with pytest.raises(ValueError, match="class_weight"):
        BranchConfig(class_weight="oversample")


def test_balanced_class_weights_equalise_total_weight():
    y = np.array([0] * 8 + [1] * 2)
    w = class_weights(y, "balanced")
    assert w[0] * 8 == pytest.approx(w[1] * 2)
    assert class_weights(y, "none") == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="both classes"):
        class_weights(np.zeros(5), "balanced")


def test_augmentation_only_rotates_and_flips(rng):
    imgs = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    out = augment_batch(imgs, np.random.default_rng(1))
    for a, b in zip(imgs, out):
        variants = [np.rot90(a, k) for k in range(4)]
        variants += [v[:, ::-1] for v in variants]
        assert any(np.array_equal(b, v) for v in variants)


@pytest.mark.slow
def test_fit_branch_learns_a_separable_problem(rng):
    xt, yt = separable_images(64, 16, rng)
    xv, yv = separable_images(32, 16, rng)
    # 3e-3: at 1e-3 this 4-filter branch is still near chance after its 24 steps (loss 0.62); its AUC
    # passed only while BatchNorm's lagging moving statistics happened to separate the classes.
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=6, patience=6, batch_size=16,
                          class_weight="balanced", sampling="none", learning_rate=3e-3)
    model, history = fit_branch(config, xt, yt, xv, yv)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(yv, predict_branch_proba(model, apply_view("rgb", xv)))
    assert auc > 0.95
    assert history["best_val_auc"] == pytest.approx(max(history["per_epoch"]["val_auc"]))
    assert history["class_weights"]["1"] > history["class_weights"]["0"]


def test_fit_branch_rejects_wrong_image_size(rng):
    xt, yt = separable_images(16, 16, rng)
    with pytest.raises(ValueError, match="must be uint8 of shape"):
        fit_branch(BranchConfig(image_size=32), xt, yt, xt, yt)


def _trained_tiny(rng):
    xt, yt = separable_images(32, 16, rng)
    # dropout 0, so that any train/inference difference below comes from BatchNorm alone
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=2, batch_size=8, dropout=0.0)
    model, _ = fit_branch(config, xt, yt, xt, yt)
    return model, config


def test_prediction_does_not_depend_on_the_rest_of_the_batch(rng):
    model, _ = _trained_tiny(rng)
    x = apply_view("rgb", rng.integers(0, 256, (33, 16, 16, 3), dtype=np.uint8))
    alone = predict_branch_proba(model, x[:1])
    in_batch = predict_branch_proba(model, x, batch_size=64)[:1]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5, rtol=0)
    # The property is not vacuous: BatchNorm in training mode (no dropout here) would break it.
    train_mode_alone = np.asarray(model(x[:1], training=True)).ravel()
    train_mode_batch = np.asarray(model(x, training=True)).ravel()[:1]
    assert abs(train_mode_alone[0] - train_mode_batch[0]) > 1e-4


def test_save_load_round_trip_gives_same_output(tmp_path, rng):
    model, config = _trained_tiny(rng)
    save_branch(tmp_path / "b", model, config, {"split_seed": 0, "dataset_fingerprint": "abc"})
    loaded, config2, meta = load_branch(tmp_path / "b")
    assert config2 == config
    assert meta["view"] == "rgb" and meta["input_size"] == [16, 16, 3]
    assert meta["label_map"] == {"0": "nevus", "1": "melanoma"}
    assert "keras" in meta["versions"] and meta["dataset_fingerprint"] == "abc"
    x = apply_view("rgb", rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    np.testing.assert_allclose(predict_branch_proba(model, x), predict_branch_proba(loaded, x), atol=1e-6)


def test_resume_restores_the_best_weights_with_the_builder_it_was_given(tmp_path, rng):
    xt, yt = separable_images(16, 16, rng)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=1, batch_size=8)
    built = []

    def narrow(c):
        # Another architecture than build_branch(c): its checkpointed weights fit no other builder.
        built.append(c)
        return build_branch(dataclasses.replace(c, base_filters=2))

    model, _ = fit_branch(config, xt, yt, xt, yt, checkpoint_dir=tmp_path / "ckpt", build=narrow)
    built.clear()
    resumed, history = fit_branch(config, xt, yt, xt, yt, checkpoint_dir=tmp_path / "ckpt", resume=True, build=narrow)
    assert built == [config] and history["resumed_from_epoch"] == 1  # restore built the best model with it
    x = apply_view("rgb", xt)
    np.testing.assert_allclose(predict_branch_proba(resumed, x), predict_branch_proba(model, x), atol=1e-6)


def test_load_branch_names_the_missing_file(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="model.keras"):
        load_branch(tmp_path / "b")


def test_epoch_order_sampling_balances_classes():
    from models.train import epoch_order

    y = np.array([1] * 10 + [0] * 90)
    rng = np.random.default_rng(0)
    none = epoch_order(y, "none", rng)
    assert sorted(none) == list(range(100))
    under = epoch_order(y, "undersample", rng)
    assert len(under) == 20 and y[under].sum() == 10 and len(set(under)) == 20
    over = epoch_order(y, "oversample", rng)
    assert len(over) == 180 and y[over].sum() == 90 and set(over[y[over] == 0]) == set(range(10, 100))
    with pytest.raises(ValueError, match="sampling"):
        epoch_order(y, "smote", rng)
    with pytest.raises(ValueError, match="sampling must be one of"):
        BranchConfig(sampling="smote")
