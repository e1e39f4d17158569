"""Parallel TensorFlow jobs (skinfusion.workflows.processes): results in order, and a dead worker reported in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from skinfusion.workflows.processes import in_processes, worker_lost_message


def test_results_come_back_in_call_order():
    assert in_processes(pow, [(2, 3), (3, 2), (10, 1)], jobs=2) == [8, 9, 10]


def test_a_killed_worker_is_a_child_process_error_that_says_what_to_do():
    # The worker kills itself with SIGKILL, as the system's out-of-memory killer does.
    with pytest.raises(ChildProcessError) as info:
        in_processes(signal.raise_signal, [(signal.SIGKILL,), (signal.SIGKILL,)], jobs=8)
    message = str(info.value)
    assert "stopped unexpectedly" in message and "--resume" in message
    assert "of the 2 running" in message and "--jobs 1" in message  # the processes that ran, not --jobs 8
    assert "SIGKILL(-9)" in message  # what loky saw, kept for the user
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_advice_halves_the_jobs_or_asks_for_memory():
    assert "--jobs 2" in worker_lost_message("", 5)
    assert "more memory" in worker_lost_message("", 1)
    assert "exit codes {SIGKILL(-9)}" in worker_lost_message(
        "A worker process managed by the executor was unexpectedly terminated. ... The exit codes of the workers "
        "are {SIGKILL(-9)}", 2)


def test_the_cli_prints_one_line_for_a_dead_worker(tmp_path):
    """run_guarded reports the ChildProcessError like any OSError: one line, exit status 2, no traceback."""
    script = tmp_path / "dead_worker.py"
    script.write_text(textwrap.dedent("""
        import argparse, os, sys
        from skinfusion.cli.common import run_guarded
        from skinfusion.workflows.processes import in_processes
        import signal
        sys.exit(run_guarded(lambda a: in_processes(signal.raise_signal, [(signal.SIGKILL,)] * 3, 3) and 0,
                             argparse.Namespace()))
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("skinfusion: error:")]
    assert len(lines) == 1 and "--resume and --jobs 1" in lines[0], done.stderr
