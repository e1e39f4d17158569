"""Several TensorFlow jobs at once, one process each: the cores split between them, the run locks handed over.

``train --view all --jobs N`` and ``pretrain --view all --jobs N`` share this. Processes rather than
threads, because a Keras model's training step holds the GIL in its Python callbacks and one
TensorFlow runtime per process is the only way to give each job its own thread pools.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, Callable, Sequence

from joblib import Parallel, delayed
from joblib.externals.loky.process_executor import BrokenProcessPool

from models.quiet import call_quietly
from skinfusion.workflows.runlock import HELD_ENV

logger = logging.getLogger(__name__)


def threads_per_job(jobs: int) -> int:
    """TensorFlow threads each of ``jobs`` parallel processes gets: the cores, split equally (at least 1)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _in_worker(threads: int, log_level: int, held_locks: str, function: Callable[..., Any], args: tuple) -> Any:
    # Runs in a joblib (loky) worker process. loky reuses its workers from one call to the next, and a
    # reused worker keeps the environment it was started with: the run locks our parent holds now are
    # handed over explicitly, or a second `train --view all` in one process is refused its own run.
    if held_locks:
        os.environ[HELD_ENV] = held_locks
    else:
        os.environ.pop(HELD_ENV, None)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    import tensorflow as tf

    # Split the cores before TensorFlow starts. A worker reused from an earlier call with another
    # --jobs has started TensorFlow already, and TensorFlow refuses a new thread count after that.
    current = tf.config.threading.get_intra_op_parallelism_threads()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning("this worker process already runs TensorFlow with %s threads (not %d): kept",
                       current or "its default number of", threads)
    return function(*args)


def in_processes(function: Callable[..., Any], calls: Sequence[tuple], jobs: int) -> list[Any]:
    """``[function(*args) for args in calls]``, ``jobs`` at a time in loky worker processes.

    Each worker gets ``threads_per_job(jobs)`` TensorFlow threads, this process's log level, and the
    run locks this process holds (so ``run_lock`` in the worker lets it write the run its parent
    locked). ``function`` must be importable by name (a module-level function).

    Returns:
        The results, in ``calls`` order.

    Raises:
        ChildProcessError: a worker process died (killed, most often by the system for lack of
            memory); the message says what to do, and the CLI prints it as one line.
    """
    threads, level = threads_per_job(jobs), logging.getLogger().getEffectiveLevel()
    held = os.environ.get(HELD_ENV, "")
    try:
        return Parallel(n_jobs=jobs, backend="loky")(
            delayed(call_quietly)(pickle.dumps((_in_worker, (threads, level, held, function, tuple(args)))))
            for args in calls)
    except BrokenProcessPool as exc:
        # The advice counts the processes that really ran (--jobs 16 for 5 views runs 5).
        raise ChildProcessError(worker_lost_message(str(exc), min(jobs, len(calls)))) from None


def worker_lost_message(detail: str, jobs: int) -> str:
    """What to tell a user whose worker process died (one of ``jobs`` running): the exit codes loky saw,
    the likely cause, what to do."""
    codes = re.search(r"exit codes of the workers are (\{[^}]*\})", detail)
    seen = f" (exit codes {codes.group(1)})" if codes else ""
    fewer = f"--jobs {jobs // 2}" if jobs > 1 else "a machine with more memory"
    return (f"a worker process of the {jobs} running in parallel stopped unexpectedly{seen}; most often the "
            f"system killed it for lack of memory (each runs its own TensorFlow). Finished work is kept: "
            f"rerun with --resume and {fewer}")
