"""``train --seeds N``: a deep ensemble of N separately trained CNNs kept as one branch (models.branch).

The unit tests assemble randomly initialised members (no training). The end-to-end test trains a
two-seed run on the tiny synthetic dataset and uses it as a user would: fuse, predict, explain, export.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from colorspaces import DEFAULT_VIEWS, read_image
from models import BranchConfig, build_branch
from models.branch import assemble_members, member_config, predict_branch_proba
from models.gradcam import gradcam

SIZE = 32


def _members(config: BranchConfig) -> list[keras.Model]:
    out = []
    for k in range(config.seeds):
        keras.utils.set_random_seed(100 + k)
        m = build_branch(member_config(config, k))
        # Random BatchNorm statistics and heads, so the members (and their maps) really differ.
        m.set_weights([w + np.random.default_rng(k).normal(0, 0.05, w.shape).astype(w.dtype) for w in m.get_weights()])
        out.append(m)
    return out


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3)).astype(np.float32)


def test_member_configs_take_consecutive_seeds_and_one_cnn():
    c = BranchConfig(view="hsv", seeds=3, seed=5)
    assert [member_config(c, k).seed for k in range(3)] == [5, 6, 7]
    assert all(member_config(c, k).seeds == 1 for k in range(3))
    with pytest.raises(ValueError, match="member 3"):
        member_config(c, 3)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        BranchConfig(seeds=0)


def test_an_assembled_branch_is_exactly_its_members_mean_and_survives_saving(tmp_path):
    config = BranchConfig(view="rgb", image_size=SIZE, base_filters=4, seeds=3)
    members = _members(config)
    model = assemble_members(config, members)
    x = _inputs(9)
    want = np.mean([predict_branch_proba(m, x) for m in members], axis=0)
    got = predict_branch_proba(model, x)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.ptp([predict_branch_proba(m, x) for m in members], axis=0).max() > 1e-3  # members do differ
    # The gate's embedding: one `gap` layer, the members' pooled features side by side.
    embed = keras.Model(model.input, model.get_layer("gap").output)(x, training=False)
    parts = [keras.Model(m.input, m.get_layer("gap").output)(x, training=False) for m in members]
    np.testing.assert_allclose(np.asarray(embed), np.concatenate([np.asarray(p) for p in parts], axis=1), atol=1e-6)
    # Saved and loaded as any branch is (models.store uses keras' own format).
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(predict_branch_proba(again, x), got, atol=1e-7)
    with pytest.raises(ValueError, match="needs 3 members, got 2"):
        assemble_members(config, members[:2])


def test_a_one_seed_branch_is_the_branch_it_always_was():
    # Old bundles were built by the one-CNN builder: its layer names and weight order must not move.
    old = build_branch(BranchConfig(image_size=SIZE, block_order="conv-bn-relu-pool"))
    assert [layer.name for layer in old.layers] == [
        "rgb", "conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "pool2", "conv3", "bn3",
        "relu3", "pool3", "conv4", "bn4", "relu4", "pool4", "gap", "dropout", "melanoma_proba"]
    # The default (pooling first) keeps the names; only each block's pool moves before its BatchNorm.
    assert [layer.name for layer in build_branch(BranchConfig(image_size=SIZE)).layers] == [
        "rgb", "conv1", "pool1", "bn1", "relu1", "conv2", "pool2", "bn2", "relu2", "conv3", "pool3", "bn3",
        "relu3", "conv4", "pool4", "bn4", "relu4", "gap", "dropout", "melanoma_proba"]


def _previous_release_builder(config: BranchConfig) -> keras.Model:
    """The one-CNN builder as it was before --seeds, layer for layer in its creation order."""
    inputs = keras.Input((config.image_size, config.image_size, config.channels), name=config.view)
    x = inputs
    for block in range(4):
        x = keras.layers.Conv2D(config.base_filters * 2**block, 3, padding="same", use_bias=False,
                                name=f"conv{block + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{block + 1}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{block + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="melanoma_proba")(x))


def test_a_one_seed_branch_starts_from_the_same_weights_as_before():
    # Layers draw their seeds from the global generator as they are created: building them in
    # another order changes every seeded training (and every number measured with it).
    # Pooling holds no weights, so the default block order starts from the same weights too.
    for order in ("conv-bn-relu-pool", "conv-pool-bn-relu"):
        config = BranchConfig(image_size=SIZE, block_order=order)
        keras.utils.set_random_seed(0)
        before = _previous_release_builder(config).get_weights()
        keras.utils.set_random_seed(0)
        now = build_branch(config).get_weights()
        assert len(now) == len(before) and all(np.array_equal(a, b) for a, b in zip(now, before)), order


def test_gradcam_of_a_seeds_branch_is_the_mean_of_its_members_maps():
    config = BranchConfig(view="rgb", image_size=SIZE, base_filters=4, seeds=2)
    members = _members(config)
    model = assemble_members(config, members)
    x = _inputs(4, seed=1)
    maps, logits = gradcam(model, x)
    member_maps = [gradcam(m, x)[0] for m in members]
    np.testing.assert_allclose(maps, np.mean(member_maps, axis=0), rtol=1e-4, atol=1e-7)
    # sigmoid(logit) is still the branch's probability.
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), predict_branch_proba(model, x), atol=1e-6)
    assert not np.allclose(member_maps[0], member_maps[1])


@pytest.mark.slow
def test_train_with_two_seeds_then_fuse_predict_explain_and_export(synthetic_data, tmp_path, capsys):
    from ensemble.bundle import load_ensemble
    from ensemble.export import export_bundle
    from ensemble.runtime import ExportedEnsemble
    from skinfusion.cli import explain_main, fuse_main, train_main

    run = tmp_path / "run"
    rc = train_main(["--view", "all", "--seeds", "2", "--data", str(synthetic_data), "--run", str(run),
                     "--image-size", str(SIZE), "--epochs", "5", "--patience", "5", "-q"])
    assert rc == 0
    for view in DEFAULT_VIEWS:
        meta = json.loads((run / "branches" / view / "metadata.json").read_text())
        members = meta["training"]["members"]
        assert [m["seed"] for m in members] == [0, 1]
        assert meta["training"]["epochs_run"] == sum(m["epochs_run"] for m in members)
        assert not (run / "branches" / view / ".checkpoint").exists()  # nothing left to resume
    assert json.loads((run / "branches" / "rgb" / "config.json").read_text())["seeds"] == 2
    assert fuse_main(["--run", str(run), "--method", "mean", "--ood-percentile", "95", "-q"]) == 0
    ens = load_ensemble(run)
    rgb = ens.models[ens.views.index("rgb")]
    w1, w2 = rgb.get_layer("m1_conv1").get_weights()[0], rgb.get_layer("m2_conv1").get_weights()[0]
    assert not np.allclose(w1, w2), "the two members are copies: their seeds were not used"
    # It learned: the synthetic melanomas are separable, and the validation AUC of every branch says so.
    for view in ens.views:
        auc = json.loads((run / "branches" / view / "metadata.json").read_text())["validation_metrics"]["auc"]
        assert auc > 0.75, (view, auc)
    assert ens.gate is not None and ens.embedding_dims == [2 * 8 * 16] * len(DEFAULT_VIEWS)  # two members' 128-wide gap each

    images = sorted(Path(synthetic_data, "images").glob("*.jpg"))[:6]
    rgbs = [read_image(p) for p in images]
    want = ens.predict_proba(rgbs)
    assert np.all((want > 0) & (want < 1))
    out = tmp_path / "explained"
    assert explain_main(["--run", str(run), "--out", str(out), "-q", str(images[0])]) == 0
    assert any(out.glob("*.png"))
    export_bundle(run, tmp_path / "onnx", "onnx")
    np.testing.assert_allclose(ExportedEnsemble(tmp_path / "onnx").predict_proba(rgbs), want, atol=1e-5)


def test_a_resumed_seeds_training_keeps_the_finished_member(synthetic_data, tmp_path, monkeypatch):
    from models import seeds as training
    from skinfusion.workflows.training import TrainRequest, train_branch_run

    real, calls = training.fit_branch, []

    def second_member_dies(config, *args, **kwargs):
        calls.append(config.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, *args, **kwargs)

    monkeypatch.setattr(training, "fit_branch", second_member_dies)
    config = BranchConfig(view="rgb", image_size=SIZE, base_filters=4, epochs=2, patience=2, seeds=2, seed=3)
    request = TrainRequest(str(synthetic_data), str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        train_branch_run(request, config)
    assert (tmp_path / "run" / "branches" / "rgb" / ".checkpoint" / "member1" / "done.weights.h5").is_file()
    monkeypatch.setattr(training, "fit_branch", real)
    calls.clear()
    monkeypatch.setattr(training, "fit_branch", lambda c, *a, **k: (calls.append(c.seed), real(c, *a, **k))[1])
    summary = train_branch_run(TrainRequest(str(synthetic_data), str(tmp_path / "run"), resume=True), config)
    assert calls == [4], "the finished member (seed 3) was trained again, or member 2 was not"
    meta = json.loads((Path(summary["branch_dir"]) / "metadata.json").read_text())
    assert [m["seed"] for m in meta["training"]["members"]] == [3, 4]
    assert meta["training"]["mixed_precision"] == "off"  # the branch's compute type, not only its members'


@pytest.mark.parametrize("recorded, resumed, kept", [
    ("off", "", True), ("bfloat16", "bfloat16", True), (True, "float16", True),  # True: a release before bfloat16
    (None, "", True),  # no record at all: a release before the field
    ("off", "bfloat16", False), ("float16", "", False), ("bfloat16", "float16", False),
])
def test_a_finished_member_of_another_compute_type_is_refused(tmp_path, recorded, resumed, kept):
    """One branch, one compute type: --resume neither mixes members nor silently retrains one."""
    from models.seeds import _finished_member

    config = member_config(BranchConfig(view="rgb", image_size=SIZE, base_filters=4, seeds=2), 0)
    member = tmp_path / "member1"
    member.mkdir()
    build_branch(config).save_weights(member / "done.weights.h5")
    history = {"epochs_run": 1} if recorded is None else {"epochs_run": 1, "mixed_precision": recorded}
    (member / "done.json").write_text(json.dumps({"config": config.to_dict(), "history": history}))
    if kept:
        weights, got = _finished_member(member, config, resumed)
        assert got == history and len(weights) == len(build_branch(config).get_weights())
    else:
        with pytest.raises(ValueError, match=r"member1: this member was trained (with|without) --mixed-precision"):
            _finished_member(member, config, resumed)
