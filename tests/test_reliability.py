"""Fault tests: kill-and-resume, atomic writes, bundle trust, and concurrent use."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ensemble
from ensemble.bundle import check_versions
from skinfusion.cli import fuse_main
from colorspaces.files import atomic_open, atomic_path, write_json_atomic

from helpers import rehash_manifest


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"auc": 0.8})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_open(target) as fh:
            fh.write('{"auc": 0.')  # half-written ...
            raise RuntimeError("killed")  # ... when the job dies
    assert json.loads(target.read_text()) == {"auc": 0.8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"], "no temporary file is left behind"
    with atomic_path(target) as tmp:
        tmp.write_text('{"auc": 0.9}')
        assert json.loads(target.read_text()) == {"auc": 0.8}, "the old file stays until the new one is complete"
    assert json.loads(target.read_text()) == {"auc": 0.9}
    assert oct(target.stat().st_mode & 0o777) != oct(0o600), "artifacts keep normal permissions"


def test_version_check_warns_on_minor_and_refuses_major_differences():
    from colorspaces.files import library_versions

    now = library_versions()
    assert check_versions(now, "bundle") == []
    major, minor = now["keras"].split(".")[:2]
    warned = check_versions({**now, "keras": f"{major}.{int(minor) + 1}.0"}, "bundle")
    assert len(warned) == 1 and "keras" in warned[0]
    with pytest.raises(ValueError, match="different major version"):
        check_versions({**now, "scikit-learn": "0.24.2"}, "bundle")


@pytest.mark.slow
def test_bundle_refuses_missing_files_swapped_branches_and_mismatched_settings(trained_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    ensemble.clear_cache()
    (run / "branches" / "hsv" / "model.keras").rename(run / "hsv-model.bak")
    with pytest.raises(FileNotFoundError, match="hsv/model.keras.*missing"):
        ensemble.load(run)
    (run / "hsv-model.bak").rename(run / "branches" / "hsv" / "model.keras")

    # a branch directory holding another view's branch is refused at fuse time ...
    shutil.copytree(run / "branches" / "rgb", run / "rgb-backup")
    shutil.rmtree(run / "branches" / "fft")
    shutil.copytree(run / "rgb-backup", run / "branches" / "fft")
    assert fuse_main(["--run", str(run), "-q"]) == 2
    # ... and at load time, even with re-signed hashes
    rehash_manifest(run / "ensemble")
    with pytest.raises(ValueError, match="does not match the manifest"):
        ensemble.load(run)

    # a manifest that claims another image size is refused
    shutil.rmtree(run / "branches" / "fft")
    shutil.copytree(trained_run / "branches" / "fft", run / "branches" / "fft")
    manifest = rehash_manifest(run / "ensemble")
    manifest["image_size"] = 64
    (run / "ensemble" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match the manifest"):
        ensemble.load(run)
    manifest["image_size"] = 32
    manifest["label_map"] = {"0": "melanoma", "1": "nevus"}
    (run / "ensemble" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="label map"):
        ensemble.load(run)


@pytest.mark.slow
def test_predict_from_eight_threads_matches_serial(trained_run, synthetic_data):
    paths = sorted(str(p) for p in (synthetic_data / "images").glob("*.jpg"))[:48]
    ensemble.clear_cache()
    serial = [ensemble.predict(p, run=trained_run) for p in paths]
    results = [None] * len(paths)
    barrier = threading.Barrier(8)
    errors = []

    def worker(k):
        try:
            barrier.wait()
            for i in range(k, len(paths), 8):
                results[i] = ensemble.predict(paths[i], run=trained_run)
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == serial, "threaded predictions must equal serial ones exactly"


def _train_cmd(data, run, *extra):
    return [sys.executable, "-m", "skinfusion.cli", "train", "--view", "rgb", "--data", str(data), "--run", str(run),
            "--image-size", "32", "--epochs", "6", "--patience", "6", *extra]


def _env(tmp_path):
    return {**os.environ, "SKINFUSION_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_a_checkpoint_killed_between_its_files_resumes_the_epoch_its_state_names(tmp_path, monkeypatch):
    import models.checkpoint as checkpoint
    from models import BranchConfig, build_branch
    from models.train import _BestKeeper

    config = BranchConfig(view="rgb", image_size=16, base_filters=4)
    model = build_branch(config)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    keeper = _BestKeeper(config, tmp_path)
    keeper.set_model(model)
    keeper.on_epoch_end(0, {"val_auc": 0.7})
    after_one = model.get_weights()
    model.set_weights([w + 1.0 for w in after_one])  # epoch 2 trains on ...

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed after the model file, before state.json")

    monkeypatch.setattr(checkpoint, "write_json_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        keeper.on_epoch_end(1, {"val_auc": 0.9})  # ... and dies while saving it
    monkeypatch.undo()
    restored, start = _BestKeeper(config, tmp_path).restore()
    assert start == 1
    for got, want in zip(restored.get_weights(), after_one):
        np.testing.assert_array_equal(got, want)  # epoch 1's model, not the half-saved epoch 2's
    keeper = _BestKeeper(config, tmp_path)
    keeper.set_model(restored)
    keeper.restore()
    keeper.on_epoch_end(1, {"val_auc": 0.8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-0002.weights.h5", "last-0002.keras", "state.json"]
    # A checkpoint written before the files were named (fixed names, no "files") still resumes.
    state = json.loads((tmp_path / "state.json").read_text())
    del state["files"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "last-0002.keras").rename(tmp_path / "last.keras")
    (tmp_path / "best-0002.weights.h5").rename(tmp_path / "best.weights.h5")
    legacy, start = _BestKeeper(config, tmp_path).restore()
    assert start == 2
    for got, want in zip(legacy.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(synthetic_data, tmp_path):
    env = _env(tmp_path)
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(synthetic_data, whole, "-q"), env=env, check=True, timeout=600)

    run = tmp_path / "killed"
    state = run / "branches" / "rgb" / ".checkpoint" / "state.json"
    proc = subprocess.Popen(_train_cmd(synthetic_data, run, "-q"), env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            time.sleep(0.3)  # into the next epoch
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; the test needs a longer run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 2 <= killed_at < 6
    assert not (run / "branches" / "rgb" / "model.keras").exists()

    subprocess.run(_train_cmd(synthetic_data, run, "--resume", "-q"), env=env, check=True, timeout=600)
    meta = json.loads((run / "branches" / "rgb" / "metadata.json").read_text())
    ref = json.loads((whole / "branches" / "rgb" / "metadata.json").read_text())
    assert meta["training"]["resumed_from_epoch"] == killed_at
    assert meta["training"]["epochs_run"] == 6 == len(meta["history"]["val_auc"])
    assert not state.parent.exists(), "the checkpoint is removed once the branch is saved"
    # Same split, seeds, batches, optimizer and dropout state: the resumed run retraces the
    # uninterrupted one epoch by epoch (up to float round-off between processes).
    np.testing.assert_allclose(meta["history"]["loss"], ref["history"]["loss"], rtol=1e-3)
    np.testing.assert_allclose(meta["history"]["val_auc"], ref["history"]["val_auc"], atol=1e-3)
    assert meta["validation_metrics"]["auc"] == pytest.approx(ref["validation_metrics"]["auc"], abs=1e-3)

    # resuming a finished branch keeps it
    before = (run / "branches" / "rgb" / "model.keras").stat().st_mtime_ns
    subprocess.run(_train_cmd(synthetic_data, run, "--resume", "-q"), env=env, check=True, timeout=600)
    assert (run / "branches" / "rgb" / "model.keras").stat().st_mtime_ns == before


@pytest.mark.slow
def test_two_processes_training_different_runs_do_not_touch_each_other(synthetic_data, tmp_path):
    env = _env(tmp_path)  # one shared decoded-image cache, built by both at once
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen(_train_cmd(synthetic_data, r, "--epochs", "2", "--seed", str(i), "-q"), env=env,
                              stderr=subprocess.PIPE, text=True) for i, r in enumerate(runs)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for i, r in enumerate(runs):
        meta = json.loads((r / "branches" / "rgb" / "metadata.json").read_text())
        config = json.loads((r / "branches" / "rgb" / "config.json").read_text())
        assert config["seed"] == i and meta["training"]["epochs_run"] == 2
        files = sorted(str(p.relative_to(r)) for p in r.rglob("*") if p.is_file())
        assert not [f for f in files if f.endswith(".tmp") or ".checkpoint" in f]
    assert (runs[0] / "splits.csv").read_text() == (runs[1] / "splits.csv").read_text()
    caches = list((tmp_path / "cache").glob("*.u8"))
    assert caches and not list((tmp_path / "cache").glob(".*tmp"))
