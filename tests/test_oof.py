"""Stacking on out-of-fold probabilities: `skinfusion fuse --method stack --folds K`."""

import json
import shutil

import pytest

from skinfusion.cli import fuse_main
from skinfusion.workflows.fusing import fuse_run
from skinfusion.data.splits import load_split, load_split_groups


@pytest.mark.slow
def test_folds_need_stacking_and_at_least_two(trained_run, tmp_path, capsys):
    assert fuse_main(["--run", str(trained_run), "--method", "mean", "--folds", "3", "-q"]) != 0
    assert "--folds only applies to --method select or stack" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2"):
        fuse_run(str(trained_run), "stack", folds=1)


@pytest.mark.slow
def test_stacker_is_fitted_on_out_of_fold_training_probabilities(trained_run, tmp_path):
    run = tmp_path / "oof-run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("ensemble"))
    assert fuse_main(["--run", str(run), "--method", "stack", "--folds", "2", "--jobs", "1", "-q"]) == 0

    assign, _ = load_split(run)
    train = {i for i, s in assign.items() if s == "train"}
    val = {i for i, s in assign.items() if s == "val"}
    held_out = []
    for k in range(2):
        fold = run / "oof" / f"k2-fold{k}"
        fa, info = load_split(fold)
        groups = load_split_groups(fold)
        fold_train = {i for i, s in fa.items() if s == "train"}
        fold_test = {i for i, s in fa.items() if s == "test"}
        # each fold model trains on the run's training images minus the held-out fold, never on test
        assert fold_train | fold_test == train and not fold_train & fold_test
        assert {i for i, s in fa.items() if s == "val"} == val
        assert not {groups[i] for i in fold_train} & {groups[i] for i in fold_test}
        assert info["oof"]["fold"] == k
        assert all((fold / "branches" / v / "model.keras").is_file() for v in ("rgb", "hsv", "fft"))
        held_out += sorted(fold_test)
    assert sorted(held_out) == sorted(train)  # every training image held out exactly once

    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    fit = manifest["stack_fit"]
    assert fit["on"] == "train out-of-fold" and fit["folds"] == 2 and fit["n_images"] == len(train)
    # The fold models learned (each from half of 170 images): their scores on the held-out
    # images rank melanoma above nevus, and the stacker fitted on those scores separates the
    # validation images, which neither it nor any fold model saw.
    oof_auc = fit["oof_member_auc"]
    assert set(oof_auc) == {"rgb", "hsv", "fft"} and sum(oof_auc.values()) / 3 > 0.7 and max(oof_auc.values()) > 0.85
    assert fit["val_auc_oof_stacker"] > 0.85

    # A rerun reuses the finished fold models instead of training them again.
    model = run / "oof" / "k2-fold0" / "branches" / "rgb" / "model.keras"
    before = model.stat().st_mtime_ns
    assert fuse_main(["--run", str(run), "--method", "stack", "--folds", "2", "--jobs", "1", "-q"]) == 0
    assert model.stat().st_mtime_ns == before
