"""An advisory lock on a run directory, so two commands never write one run at once.

The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the holding process
dies, however it dies, so a killed ``train`` never leaves a stale lock behind. It is re-entrant
within a process and inherited by the worker processes a holder starts (``train --view all``
trains branches in child processes while the parent holds the lock).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"
# Paths of the run locks held by an ancestor process: its workers may write the run too.
HELD_ENV = "SKINFUSION_HELD_RUN_LOCKS"

_held: dict[str, tuple[int, int]] = {}  # resolved run path -> (fd, depth)
_guard = threading.Lock()


class RunLockedError(ValueError):
    """Another process is writing the run (a ValueError, so the CLI reports it as a user error)."""


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        return "another process"
    return text or "another process"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, command: str = "skinfusion") -> Iterator[Path]:
    """Hold the run's lock for the block; refuse at once if another process holds it.

    Args:
        run_dir: the run directory (created if missing).
        command: what is writing the run, recorded in the lock file for the message others see.

    Yields:
        The run directory.

    Raises:
        RunLockedError: naming the run and the PID that holds it.
        ValueError: if ``run_dir`` exists and is not a directory.
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run {run}: exists and is not a directory; give a directory for the run")
    run.mkdir(parents=True, exist_ok=True)
    key = str(run.resolve())
    if key in os.environ.get(HELD_ENV, "").split(os.pathsep):
        yield run  # a worker of the process that holds the lock
        return
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        lock_path = run / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"--run {run}: is being written by {_holder(lock_path)}; wait for it to finish "
                "(or stop it), or use another --run") from None
        started = _dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} ({command}, since {started})\n".encode(), 0)
        with _guard:
            _held[key] = (fd, 1)
        previous = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = os.pathsep.join(p for p in (previous, key) if p)
    try:
        yield run
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                if not reentered:
                    held = [p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p and p != key]
                    if held:
                        os.environ[HELD_ENV] = os.pathsep.join(held)
                    else:
                        os.environ.pop(HELD_ENV, None)
                    os.ftruncate(fd, 0)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
