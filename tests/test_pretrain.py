"""skinfusion pretrain (SimSiam on a run's training images) and train --init-from."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from skinfusion.cli import pretrain_main, train_main
from skinfusion.data.splits import load_split

pytestmark = pytest.mark.slow
# Pooling before BatchNorm (the default block order) learns this synthetic task's embedding more
# slowly than the old order: its k-NN probe passes 0.85 from epoch 4-5 on (0.98 at 6), the old
# order's from epoch 1. Epochs after the first take about 0.5 s here.
EPOCHS = 6


@pytest.fixture(scope="module")
def pretrained(synthetic_data, tmp_path_factory):
    """An rgb encoder pre-trained for 6 epochs at 32 px, with an extra folder that holds two forbidden files."""
    run = tmp_path_factory.mktemp("pre-run")
    # The split pretrain will reuse, made first so that the test knows the val/test images.
    from skinfusion.workflows.runsplit import prepare_split

    _, assign, _ = prepare_split(str(synthetic_data), str(run))
    extra = tmp_path_factory.mktemp("extra")
    images = Path(synthetic_data) / "images"
    test_id = next(i for i, s in sorted(assign.items()) if s == "test")
    val_id = next(i for i, s in sorted(assign.items()) if s == "val")
    train_ids = sorted(i for i, s in assign.items() if s == "train")
    shutil.copy(images / f"{test_id}.jpg", extra / "renamed_copy_of_a_test_image.jpg")  # same bytes
    shutil.copy(images / f"{train_ids[0]}.jpg", extra / f"{val_id}.jpg")  # a validation image's name
    for k, i in enumerate(train_ids[:5]):  # new, allowed images (bytes of training images, other names)
        shutil.copy(images / f"{i}.jpg", extra / f"unlabelled_{k}.jpg")
    out = run / "pretrain" / "rgb"
    rc = pretrain_main(["--view", "rgb", "--data", str(synthetic_data), "--run", str(run), "--images", str(extra),
                        "--image-size", "32", "--epochs", str(EPOCHS), "--batch-size", "32", "-q"])
    assert rc == 0
    return {"run": run, "out": out, "assign": assign, "extra": extra}


def test_only_training_images_and_allowed_extras_enter_pre_training(pretrained):
    assign = pretrained["assign"]
    used = (pretrained["out"] / "images.txt").read_text().split()
    ids = [u for u in used if u in assign]
    extras = [u for u in used if u not in assign]
    assert sorted(ids) == sorted(i for i, s in assign.items() if s == "train")
    assert not [u for u in ids if assign[u] in ("val", "test")], "a validation or test image entered pre-training"
    assert sorted(Path(e).name for e in extras) == [f"unlabelled_{k}.jpg" for k in range(5)]
    info = json.loads((pretrained["out"] / "pretrain.json").read_text())
    assert info["extra_refused"] == 2 and info["n_extra_images"] == 5
    assert info["n_images"] == len(used)
    assert not (pretrained["out"] / ".checkpoint").exists(), "the finished pre-training left its checkpoint"


def test_pre_training_learns_a_useful_embedding_without_collapsing(pretrained):
    info = json.loads((pretrained["out"] / "pretrain.json").read_text())
    hist = info["history"]
    assert [h["epoch"] for h in hist] == list(range(EPOCHS + 1))
    assert all(0.5 < h["collapse_indicator"] <= 1.5 for h in hist[1:])
    assert hist[-1]["loss"] < hist[1]["loss"]
    # Synthetic melanomas look different: the k-NN probe on the pre-trained embedding finds it.
    assert hist[-1]["knn_auc"] >= 0.85


def test_init_from_copies_the_encoder_and_fine_tunes(pretrained, synthetic_data, tmp_path):
    from models.branch import build_branch
    from models.config import BranchConfig
    from models.pretrain import ENCODER_FILE, init_from_encoder
    from models.store import load_branch

    config = BranchConfig(view="rgb", image_size=32, seed=5)
    model = build_branch(config)
    with np.load(pretrained["out"] / ENCODER_FILE, allow_pickle=False) as z:
        saved = {k: z[k] for k in z.files}
    assert not np.allclose(model.get_layer("conv1").get_weights()[0], saved["conv1/kernel"])
    init_from_encoder(model, config, pretrained["out"])
    np.testing.assert_array_equal(model.get_layer("conv3").get_weights()[0], saved["conv3/kernel"])
    np.testing.assert_array_equal(model.get_layer("bn2").get_weights()[2], saved["bn2/moving_mean"])

    # Fine-tuning at a vanishing learning rate leaves the kernels where --init-from put them.
    run = tmp_path / "ft"
    assert train_main(["--view", "rgb", "--data", str(synthetic_data), "--run", str(run), "--image-size", "32",
                       "--epochs", "1", "--learning-rate", "1e-9", "--init-from", str(pretrained["out"]), "-q"]) == 0
    branch, cfg, meta = load_branch(run / "branches" / "rgb")
    assert cfg.init_from == str(pretrained["out"])
    # The branch records which encoder, by the hash of the file it was initialised from.
    assert meta["init_from"]["encoder_sha256"] == hashlib.sha256(
        (pretrained["out"] / ENCODER_FILE).read_bytes()).hexdigest()
    for name in ("conv1", "conv4"):
        np.testing.assert_allclose(branch.get_layer(name).get_weights()[0], saved[f"{name}/kernel"], atol=1e-6)


def test_a_damaged_or_mismatched_encoder_is_refused_by_name(pretrained, synthetic_data, tmp_path, capsys):
    bad = tmp_path / "enc"
    shutil.copytree(pretrained["out"], bad)
    args = ["--data", str(synthetic_data), "--run", str(tmp_path / "r"), "--image-size", "32", "--epochs", "1"]
    assert train_main(["--view", "hsv", *args, "--init-from", str(bad)]) == 2
    assert "pre-trained for view 'rgb'" in capsys.readouterr().err
    assert train_main(["--view", "rgb", *args, "--base-filters", "8", "--init-from", str(bad)]) == 2
    assert "--base-filters 16" in capsys.readouterr().err
    assert json.loads((bad / "pretrain.json").read_text())["block_order"] == "conv-pool-bn-relu"
    assert train_main(["--view", "rgb", *args, "--block-order", "conv-bn-relu-pool", "--init-from", str(bad)]) == 2
    assert "pre-trained with --block-order conv-pool-bn-relu" in capsys.readouterr().err
    info = json.loads((bad / "pretrain.json").read_text())
    del info["block_order"]  # an encoder written before the field existed: the old order
    (bad / "pretrain.json").write_text(json.dumps(info))
    assert train_main(["--view", "rgb", *args, "--init-from", str(bad)]) == 2
    assert "pre-trained with --block-order conv-bn-relu-pool" in capsys.readouterr().err
    with open(bad / "encoder.npz", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    assert train_main(["--view", "rgb", *args, "--init-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "encoder.npz: SHA-256 differs" in err and "Traceback" not in err
    assert train_main(["--view", "rgb", *args, "--init-from", str(tmp_path / "none")]) == 2
    assert "--init-from:" in capsys.readouterr().err
    assert not (tmp_path / "r" / "branches").exists()


def test_pretrain_flags_are_checked_before_any_work(synthetic_data, tmp_path, capsys):
    base = ["--view", "rgb", "--data", str(synthetic_data), "--run", str(tmp_path / "r")]
    assert pretrain_main([*base, "--images", str(tmp_path / "missing")]) == 2
    assert "--images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal
        pretrain_main([*base, "--learning-rate", "2"])
    assert exc.value.code == 2
    assert "--learning-rate" in capsys.readouterr().err
    assert pretrain_main([*base, "--image-size", "8"]) == 2
    assert "--image-size must be at least 16" in capsys.readouterr().err
    assert pretrain_main([*base, "--jobs", "2"]) == 2
    assert "--jobs 2 pre-trains several views at once; it needs --view all" in capsys.readouterr().err
    assert not (tmp_path / "r" / "splits.csv").exists()


def test_pretrain_all_views_in_parallel_processes(synthetic_data, tmp_path, capsys):
    """--view all --jobs 2: one lock, one split, every default view's encoder in OUT/<view>, each learned."""
    from colorspaces import DEFAULT_VIEWS
    from skinfusion.workflows.runlock import HELD_ENV, LOCK_FILE

    run, out = tmp_path / "r", tmp_path / "enc"
    argv = ["--view", "all", "--jobs", "2", "--data", str(synthetic_data), "--run", str(run),
            "--out", str(out), "--image-size", "32", "--epochs", str(EPOCHS), "--batch-size", "32"]
    assert pretrain_main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"pre-training {len(DEFAULT_VIEWS)} views in 2 processes" in captured.err
    assign, _ = load_split(run)
    train_ids = sorted(i for i, s in assign.items() if s == "train")
    for view in DEFAULT_VIEWS:
        enc = out / view
        info = json.loads((enc / "pretrain.json").read_text())
        assert info["view"] == view
        assert sorted((enc / "images.txt").read_text().split()) == train_ids
        hist = info["history"]
        assert [h["epoch"] for h in hist] == list(range(EPOCHS + 1))
        assert all(0.5 < h["collapse_indicator"] <= 1.5 for h in hist[1:]), f"{view} collapsed"
        assert f"--init-from {enc}" in printed
    # What it learned: as in the one-view test, the rgb probe finds the synthetic melanomas.
    assert json.loads((out / "rgb" / "pretrain.json").read_text())["history"][-1]["knn_auc"] >= 0.85
    # The parent's lock was released: a new descriptor of the lock file can take it (the same
    # process is refused while another descriptor holds it), and no worker hand-over is left set.
    assert HELD_ENV not in os.environ
    fd = os.open(run / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)

    # --resume after one view was lost: that view is pre-trained again, the others are kept as they are.
    digests = {v: hashlib.sha256((out / v / "encoder.npz").read_bytes()).hexdigest() for v in DEFAULT_VIEWS}
    shutil.rmtree(out / "fft")
    assert pretrain_main([*argv, "--resume", "-q"]) == 0
    printed = capsys.readouterr().out
    for view in DEFAULT_VIEWS:
        kept = f"{view}: encoder kept (already pre-trained with these settings)" in printed
        assert kept == (view != "fft"), printed
        if view != "fft":
            assert hashlib.sha256((out / view / "encoder.npz").read_bytes()).hexdigest() == digests[view]
    assert (out / "fft" / "encoder.npz").is_file()


def test_resume_keeps_only_an_encoder_finished_with_the_same_settings(pretrained, caplog):
    from models import BranchConfig
    from skinfusion.workflows.pretraining import _finished_encoder

    out = pretrained["out"]
    info = json.loads((out / "pretrain.json").read_text())
    config = BranchConfig(view="rgb", image_size=32)
    settings = {k: info[k] for k in ("data_dir", "run", "dataset_fingerprint", "epochs", "batch_size",
                                     "learning_rate", "seed", "lesion_crop", "extra_dirs")}
    kept = _finished_encoder(out, config, settings)
    assert kept["kept"] and kept["history"] == info["history"]
    assert _finished_encoder(out, config, {**settings, "epochs": EPOCHS + 1}) is None
    assert f"other settings (epochs {EPOCHS}, now {EPOCHS + 1})" in caplog.text
    assert _finished_encoder(out, BranchConfig(view="rgb", image_size=48), settings) is None


def test_a_batch_larger_than_the_data_names_the_flag(synthetic_data, tmp_path, capsys):
    assert pretrain_main(["--view", "rgb", "--data", str(synthetic_data), "--run", str(tmp_path / "r"),
                          "--image-size", "32", "--epochs", "1", "--batch-size", "5000"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 5000" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "splits.csv").exists(), "a refused pre-training left a split in the run"
