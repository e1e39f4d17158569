"""The accuracy options: colour constancy, affine and colour-jitter augmentation, optimiser and LR schedule.

Augmentation must act in training only; colour constancy is preprocessing, so it must act in
training and at inference alike.
"""

import json
import shutil

import cv2
import keras
import numpy as np
import pytest

import ensemble
from colorspaces import apply_constancy, apply_view, shades_of_gray
from models import BranchConfig, build_branch, predict_images_proba
from models.train import fit_branch, training_batches, view_batches
from models.train import augment_batch, class_weights, make_optimizer

from helpers import rehash_manifest, separable_images


def test_shades_of_gray_removes_a_colour_cast_and_keeps_grey(rng):
    scene = rng.integers(40, 200, (24, 24, 1)).repeat(3, axis=2).astype(np.float32)
    cast = np.clip(scene * np.array([1.25, 1.0, 0.75]), 0, 255).astype(np.uint8)
    fixed = shades_of_gray(cast)
    means = fixed.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() < 3, means
    grey = scene.astype(np.uint8)
    assert np.abs(shades_of_gray(grey).astype(int) - grey).max() <= 1
    np.testing.assert_array_equal(shades_of_gray(np.stack([cast, grey]))[0], fixed)
    np.testing.assert_array_equal(apply_constancy("none", cast), cast)
    with pytest.raises(KeyError, match="shades_of_gray"):
        apply_constancy("retinex", cast)


def test_new_config_fields_are_validated_and_round_trip():
    c = BranchConfig(rotate_degrees=15, scale_jitter=0.1, color_jitter=0.1, color_constancy="shades_of_gray",
                     optimizer="sgd", lr_schedule="cosine", weight_decay=0.05)
    assert BranchConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad, match in ({"optimizer": "rmsprop"}, "optimizer"), ({"lr_schedule": "step"}, "lr_schedule"), \
                      ({"color_jitter": 1.5}, "color_jitter"), ({"color_constancy": "x"}, "color_constancy"), \
                      ({"weight_decay": -0.1}, "weight_decay"):
        with pytest.raises(ValueError, match=match):
            BranchConfig(**bad)


def test_augmentation_without_extras_is_unchanged_and_extras_change_training_batches(rng):
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    plain = augment_batch(images, np.random.default_rng(1))
    np.testing.assert_array_equal(augment_batch(images, np.random.default_rng(1), BranchConfig()), plain)
    extra = augment_batch(images, np.random.default_rng(1), BranchConfig(rotate_degrees=20, color_jitter=0.2))
    assert extra.dtype == np.uint8 and extra.shape == images.shape and not np.array_equal(extra, plain)

    y = np.array([0, 1, 0, 1, 0, 1])
    w = class_weights(y, "balanced")
    base = BranchConfig(view="hsv", image_size=16, batch_size=6, epochs=1)
    jittered = BranchConfig(view="hsv", image_size=16, batch_size=6, epochs=1, color_jitter=0.3, scale_jitter=0.2)
    xb = next(iter(training_batches(images, y, base, w)[0].as_numpy_iterator()))[0]
    xj = next(iter(training_batches(images, y, jittered, w)[0].as_numpy_iterator()))[0]
    assert not np.allclose(xb, xj)
    assert 0.0 <= xj[..., 0].min() and xj[..., 0].max() < 1.0, "hue stays a valid OpenCV hue / 180"
    # validation / inference input takes no augmentation settings at all
    v = next(iter(view_batches(images, "hsv", 6).as_numpy_iterator()))
    np.testing.assert_allclose(v, apply_view("hsv", images), atol=1e-6)


def test_hue_jitter_turns_on_the_colour_circle():
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 220
    hues = []
    for seed in range(20):
        out = augment_batch(red, np.random.default_rng(seed), BranchConfig(color_jitter=0.3))
        h = int(cv2.cvtColor(out[0], cv2.COLOR_RGB2HSV)[4, 4, 0])
        hues.append(min(h, 180 - h))  # circular distance from red (hue 0)
    assert max(hues) <= 10, hues  # ± 30 · 0.3 = ± 9 units, never a wrap to the far side of the circle


def test_optimizer_and_cosine_schedule():
    sgd = make_optimizer(BranchConfig(optimizer="sgd", learning_rate=0.1), steps_per_epoch=10)
    assert type(sgd).__name__ == "SGD" and sgd.momentum == pytest.approx(0.9) and sgd.nesterov
    adam = make_optimizer(BranchConfig(lr_schedule="cosine", learning_rate=0.01, epochs=5), steps_per_epoch=10)
    schedule = adam._learning_rate
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(50)) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < float(schedule(25)) < 0.01
    constant = make_optimizer(BranchConfig(lr_schedule="none", learning_rate=0.01), steps_per_epoch=10)
    assert float(keras.ops.convert_to_numpy(constant.learning_rate)) == pytest.approx(0.01)
    assert BranchConfig().lr_schedule == "cosine"  # the measured default (experiments/RESULTS.md)


def test_a_config_saved_before_a_field_existed_matches_that_fields_default():
    saved = BranchConfig(view="fft", dropout=0.5).to_dict()
    del saved["weight_decay"]  # as written before weight decay was an option
    assert BranchConfig(view="fft", dropout=0.5).matches(saved)
    assert not BranchConfig(view="fft", dropout=0.5, weight_decay=0.1).matches(saved)
    assert not BranchConfig(view="fft").matches(saved)


def test_resume_refuses_another_config_but_takes_a_checkpoint_from_before_a_new_field(tmp_path):
    from models.train import _BestKeeper

    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=4, lr_schedule="none")
    model = build_branch(config)
    model.compile(optimizer=make_optimizer(config, 1), loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    keeper = _BestKeeper(config, tmp_path)
    keeper.set_model(model)
    keeper.on_epoch_end(0, {"val_auc": 0.7})

    with pytest.raises(ValueError, match="another config"):
        _BestKeeper(BranchConfig.from_dict({**config.to_dict(), "weight_decay": 0.1}), tmp_path).restore()
    state_file = tmp_path / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["weight_decay"]  # a checkpoint written before the option existed
    state_file.write_text(json.dumps(state))
    restored, start = _BestKeeper(config, tmp_path).restore()
    assert start == 1 and restored is not None


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_every_weight_in_training_and_survives_a_checkpoint(optimizer, tmp_path):
    def one_step_without_gradient(model):
        before = [np.array(v) for v in model.trainable_variables]
        # A zero gradient moves neither optimizer, so what changes is the decay alone.
        model.optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
        return [np.array(v) / np.where(b == 0, 1, b) for v, b in zip(model.trainable_variables, before)]

    config = BranchConfig(view="rgb", image_size=16, base_filters=4, optimizer=optimizer, lr_schedule="none",
                          learning_rate=0.1, weight_decay=0.5)
    for wd, factor in ((0.0, 1.0), (0.5, 1 - 0.5 * 0.1)):
        model = build_branch(config)
        model.compile(optimizer=make_optimizer(BranchConfig.from_dict({**config.to_dict(), "weight_decay": wd}), 1),
                      loss="binary_crossentropy")
        ratios = one_step_without_gradient(model)
        assert len(ratios) == len(model.trainable_variables) > 5  # conv, BatchNorm and dense weights alike
        for r, v in zip(ratios, model.trainable_variables):
            nonzero = np.array(v) != 0
            np.testing.assert_allclose(r[nonzero], factor, rtol=1e-5, err_msg=v.path)
    # A resumed run loads the compiled model from its checkpoint: the decay must come back with it.
    model.save(tmp_path / "last.keras")
    loaded = keras.saving.load_model(tmp_path / "last.keras", compile=True)
    for r, v in zip(one_step_without_gradient(loaded), loaded.trainable_variables):
        np.testing.assert_allclose(r[np.array(v) != 0], 1 - 0.5 * 0.1, rtol=1e-5, err_msg=v.path)


@pytest.mark.slow
def test_plateau_schedule_and_sgd_train(rng):
    x, y = separable_images(64, 16, rng, positive_every=2, dark=70, bright=180)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=6, patience=6, batch_size=16,
                          optimizer="sgd", lr_schedule="plateau", learning_rate=0.05, color_jitter=0.1, rotate_degrees=10)
    model, history = fit_branch(config, x, y, x, y)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, predict_images_proba(model, "rgb", x)) > 0.95
    assert history["per_epoch"]["val_auc"] and len(history["per_epoch"]["val_auc"]) <= 6


def test_plateau_halving_is_checkpointed_so_a_resumed_run_halves_on_the_same_epochs(tmp_path):
    from models.train import _BestKeeper

    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=8, patience=8,
                          lr_schedule="plateau", learning_rate=0.01)
    val_aucs = [0.6, 0.7, 0.7, 0.65, 0.8, 0.7, 0.7, 0.7]  # halvings due after epochs 4 and 7

    def keeper_with_model(directory):
        model = build_branch(config)
        model.compile(optimizer=make_optimizer(config, 1), loss="binary_crossentropy")
        model.optimizer.build(model.trainable_variables)  # as after a first step: its state is saved
        keeper = _BestKeeper(config, directory)
        keeper.set_model(model)
        return keeper, model

    def lr(model):
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    keeper, model = keeper_with_model(tmp_path / "straight")
    straight = []
    for epoch, auc in enumerate(val_aucs):
        keeper.on_epoch_end(epoch, {"val_auc": auc})
        straight.append(lr(model))
    assert straight == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025] * 2)

    # Interrupted with one epoch without improvement pending (after 3 and after 6 epochs;
    # the second also after a halving), then resumed from the checkpoint.
    for cut in (3, 6):
        keeper, model = keeper_with_model(tmp_path / f"resumed-{cut}")
        for epoch, auc in enumerate(val_aucs[:cut]):
            keeper.on_epoch_end(epoch, {"val_auc": auc})
        resumed_keeper = _BestKeeper(config, tmp_path / f"resumed-{cut}")
        resumed_model, start = resumed_keeper.restore()
        resumed_keeper.set_model(resumed_model)
        assert start == cut and lr(resumed_model) == pytest.approx(straight[cut - 1])
        resumed = []
        for epoch, auc in enumerate(val_aucs[cut:], start=cut):
            resumed_keeper.on_epoch_end(epoch, {"val_auc": auc})
            resumed.append(lr(resumed_model))
        assert resumed == pytest.approx(straight[cut:])


def _with_config(trained_run, tmp_path, **changes):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for view in ("rgb", "hsv", "fft"):
        cfg = run / "branches" / view / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
    rehash_manifest(run / "ensemble")
    return run


@pytest.mark.slow
def test_inference_ignores_augmentation_and_weight_decay_but_applies_colour_constancy(trained_run, synthetic_data, tmp_path):
    paths = sorted(str(p) for p in (synthetic_data / "images").glob("*.jpg"))[:6]
    ensemble.clear_cache()
    base = ensemble.predict_proba(paths, run=trained_run)
    augmented = _with_config(trained_run, tmp_path / "a", rotate_degrees=30.0, scale_jitter=0.2, color_jitter=0.3,
                             weight_decay=0.1)
    np.testing.assert_allclose(ensemble.predict_proba(paths, run=augmented), base, atol=1e-7)
    constant = _with_config(trained_run, tmp_path / "c", color_constancy="shades_of_gray")
    assert not np.allclose(ensemble.predict_proba(paths, run=constant), base, atol=1e-4)


@pytest.mark.slow
def test_baseline_trains_a_keras_application_on_the_runs_split(trained_run, tmp_path, capsys):
    from experiments.baseline import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # 6 steps: BatchNorm statistics need a fast momentum to settle in so few
    assert main(["--run", str(run), "--budget-seconds", "1", "--bn-momentum", "0.5"]) == 0
    metrics = json.loads((run / "baseline-mobilenetv3small" / "metrics.json").read_text())
    assert metrics["parameters"] > 100_000 and 0.0 <= metrics["test"]["auc"] <= 1.0
    assert metrics["training"]["epochs_run"] == 1  # the 1 s budget stops it after its first epoch
    branch = json.loads((run / "branches" / "rgb" / "config.json").read_text())
    # the run's schedule, over the run's epochs
    assert {k: metrics["config"][k] for k in ("epochs", "lr_schedule", "image_size", "sampling")} == \
        {k: branch[k] for k in ("epochs", "lr_schedule", "image_size", "sampling")}
    assert "mobilenetv3small" in capsys.readouterr().out
    assert metrics["bn_momentum"] == 0.5 and metrics["test_proba_std"] > 1e-4


@pytest.mark.slow
def test_baseline_batchnorm_momentum_decides_whether_inference_scores_images_apart():
    import keras

    from experiments.baseline import build_standard

    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0.5).astype("float32")
    spread = {}
    for momentum in (0.999, 0.5):
        keras.utils.set_random_seed(0)
        model = build_standard("mobilenetv3small", momentum)(BranchConfig(image_size=32))
        model.compile("adam", "binary_crossentropy")
        model.fit(x, y, batch_size=16, epochs=10, verbose=0)  # 40 steps
        assert float(np.std(model(x, training=True))) > 0.05  # in training mode both separate images
        spread[momentum] = float(np.std(model(x, training=False)))
    # The application default (0.999) leaves the moving statistics at their initial values after
    # 40 steps, and inference gives every image the same probability; 0.5 has settled.
    assert spread[0.999] < 1e-5 and spread[0.5] > 1e-2, spread


def test_sensitivity_at_specificity_matches_a_brute_force_threshold_sweep(rng):
    from ensemble.metrics import sensitivity_at_specificity
    from experiments.accuracy import CONFIG_DIR, load_config

    y = (rng.random(300) < 0.2).astype(int)
    p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1), 2)  # rounded: many ties
    for spec in (0.5, 0.85, 0.95):
        best = max(np.mean(p[y == 1] >= t) for t in np.append(np.unique(p), np.inf)
                   if np.mean(p[y == 0] < t) >= spec)
        assert sensitivity_at_specificity(y, p, spec) == pytest.approx(best)
    names = sorted(path.stem[len("acc-"):] for path in CONFIG_DIR.glob("acc-*.json"))
    assert len(names) >= 9 and "96px" in names
    for name in names:
        BranchConfig.from_dict(load_config(name))  # every shipped experiment config is valid
    with pytest.raises(FileNotFoundError, match="known"):
        load_config("no-such-experiment")


def test_every_branch_config_field_is_a_documented_train_flag():
    import dataclasses
    import re
    from pathlib import Path

    from skinfusion.cli.train import parser as train_parser

    readme = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    actions = {a.dest: a for a in train_parser()._actions}
    for field in dataclasses.fields(BranchConfig):
        if field.name == "view":
            continue
        assert field.name in actions, f"train has no flag for BranchConfig.{field.name}"
        flag = max(actions[field.name].option_strings, key=len)
        assert actions[field.name].help, flag
        # a row of the flag table, not a mention elsewhere in the command-line page
        assert re.search(rf"^\| `{re.escape(flag)}[ `]", readme, re.M), f"{flag} is missing from docs/cli.md's flag table"
