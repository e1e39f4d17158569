"""The run lock: one writer per run directory, released when its holder dies."""

import os
import signal
import subprocess
import sys
import time

import pytest

from colorspaces import DEFAULT_VIEWS
from skinfusion.workflows.runlock import HELD_ENV, RunLockedError, run_lock

HOLDER = """
import sys, time
from skinfusion.workflows.runlock import run_lock
with run_lock(sys.argv[1], command="holder-test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _start_holder(run):
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_gets_the_lock_once_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run)
    try:
        with pytest.raises(RunLockedError, match=rf"--run {run}: is being written by PID {holder.pid} \(holder-test"):
            with run_lock(run):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(run) as got:  # the kernel dropped the dead holder's lock: no stale lock file blocks us
        assert got == run


def test_the_lock_is_reentrant_in_a_process_and_released_after_the_outermost_block(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        with run_lock(run):
            assert str(run.resolve()) in os.environ[HELD_ENV]
        assert str(run.resolve()) in os.environ[HELD_ENV]
    assert str(run.resolve()) not in os.environ.get(HELD_ENV, "")
    holder = _start_holder(run)  # released: another process can take it
    holder.kill()
    holder.wait()


def test_a_worker_started_by_the_holder_may_write_the_run(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        code = "import sys; from skinfusion.workflows.runlock import run_lock\nwith run_lock(sys.argv[1]): print('ok')"
        out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, env=dict(os.environ))
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_run_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text("not a run")
    with pytest.raises(ValueError, match=r"--run .*run\.txt: exists and is not a directory"):
        with run_lock(path):
            pass



@pytest.mark.slow
def test_two_train_commands_on_one_new_run_one_trains_the_other_is_refused(synthetic_data, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    cmd = [sys.executable, "-m", "skinfusion", "train", "--data", str(synthetic_data), "--run", str(run),
           "--image-size", "32", "--epochs", "10", "--patience", "10", "-q"]

    def start():
        return subprocess.Popen(cmd + ["--view", "rgb"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    deadline = time.monotonic() + 120
    while not ((run / ".lock").is_file() and (run / ".lock").read_text().strip()):  # the first holds the run
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    procs = [first, start()]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    winner = next(p for p, (rc, _) in zip(procs, results) if rc == 0)
    assert f"--run {run}: is being written by PID {winner.pid}" in refused and "Traceback" not in refused
    assert sorted(p.name for p in (run / "branches").iterdir()) == ["rgb"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.partial"))


@pytest.mark.slow
def test_two_parallel_trainings_in_one_process_each_write_their_own_run(synthetic_data, tmp_path):
    # loky reuses its worker processes, which keep the environment they started with: the second
    # `train --view all` in one process used to find its own run "being written by" this process.
    from skinfusion.cli.train import main as train_main

    for name in ("first", "second"):
        run = tmp_path / name
        rc = train_main(["--view", "all", "--jobs", "2", "--data", str(synthetic_data), "--run", str(run),
                         "--image-size", "16", "--epochs", "1", "--patience", "1", "--limit", "120", "-q"])
        assert rc == 0, name
        assert sorted(p.name for p in (run / "branches").iterdir()) == sorted(DEFAULT_VIEWS)
    assert HELD_ENV not in os.environ  # the parent lets go of both runs
