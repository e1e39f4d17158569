"""How far an interrupted branch got (``models.progress``): resume point, worker agreement and Ctrl-C message."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from models.config import BranchConfig
from models.progress import Progress, checkpoint_progress


def _state(folder: Path, epoch: int, epochs: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"epoch": epoch, "config": {"epochs": epochs}}))


def _done(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").write_text(json.dumps({"config": {}, "history": {}}))


def test_one_seed_progress_is_the_checkpoint_epoch(tmp_path):
    assert checkpoint_progress(tmp_path / ".checkpoint") is None
    _state(tmp_path / ".checkpoint", 4, 30)
    assert checkpoint_progress(tmp_path / ".checkpoint") == Progress(0, None, 4, 30)
    assert Progress(0, None, 4, 30).describe() == "epoch 4 of 30"
    (tmp_path / ".checkpoint" / "state.json").write_text("{torn")
    assert checkpoint_progress(tmp_path / ".checkpoint") is None


def test_several_seeds_progress_names_the_member_in_training(tmp_path):
    ckpt = tmp_path / ".checkpoint"
    _done(ckpt / "member1")
    assert checkpoint_progress(ckpt, 3) == Progress(1, 2, 0, 0)  # member 2 not checkpointed yet
    _state(ckpt / "member2", 3)
    p = checkpoint_progress(ckpt, 3)
    assert p == Progress(1, 2, 3, 12)
    assert p.describe(3) == "member 2 of 3, epoch 3 of 12"
    # The top-level state.json a one-seed branch would have is not what a seeds branch reads.
    assert checkpoint_progress(ckpt, 1) is None


def test_resume_point_counts_finished_members(tmp_path):
    from skinfusion.workflows.training import _resume_point

    branch = tmp_path / "rgb"
    _done(branch / ".checkpoint" / "member1")
    _state(branch / ".checkpoint" / "member2", 5)
    config = BranchConfig(view="rgb", seeds=2)
    assert _resume_point(branch, config, resume=True) == (1, 5)
    assert _resume_point(branch, config, resume=False) == (0, 0)


def test_workers_that_disagree_on_the_member_are_refused_by_name(tmp_path, monkeypatch):
    from skinfusion.workflows import training

    monkeypatch.setattr(training, "worker_values", lambda dist, values: [values, [0, *values[1:]]])
    with pytest.raises(ValueError, match=r"replica 0: epoch 5 after 1 finished member\(s\).*replica 1: epoch 5,"):
        training._check_workers_agree(object(), tmp_path, (1, 5), ["a", "b"])
    monkeypatch.setattr(training, "worker_values", lambda dist, values: [values, values])
    training._check_workers_agree(object(), tmp_path, (1, 5), ["a", "b"])  # agreeing workers pass


def _args(run: Path, view: str = "all", **extra) -> argparse.Namespace:
    return argparse.Namespace(run=str(run), view=view, **extra)


def test_ctrl_c_message_names_the_member_and_the_branches_saved(tmp_path):
    from skinfusion.cli.train import interrupted_message

    run = tmp_path / "run"
    msg = interrupted_message(_args(run))
    assert "before the first epoch was checkpointed" in msg and "--resume" in msg

    started = time.time()
    (run / "branches" / "rgb").mkdir(parents=True)
    (run / "branches" / "rgb" / "metadata.json").write_text("{}")
    _done(run / "branches" / "hsv" / ".checkpoint" / "member1")
    _state(run / "branches" / "hsv" / ".checkpoint" / "member2", 2, 30)
    msg = interrupted_message(_args(run, resolved_seeds={"rgb": 2, "hsv": 2, "fft": 2}, started_at=started - 1))
    assert "after member 2 of 2, epoch 2 of 30 (hsv)" in msg
    assert "rgb finished and saved" in msg and "before the first epoch" not in msg

    # A branch saved by an earlier command is not reported as this one's.
    msg = interrupted_message(_args(run, view="rgb", started_at=time.time() + 60))
    assert "before the first epoch was checkpointed" in msg and "finished and saved" not in msg
