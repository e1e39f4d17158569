"""Ctrl-C held while native code runs, then delivered where Python can handle it cleanly."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

HELD_MESSAGE = "skinfusion: stopping after the current batch (press Ctrl-C again to stop at once)"
# Whether the first held press was answered: once per outermost block, not again by a nested one
# when the inner block hands its press outwards.
_announced = [False]


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C inside the block and deliver it, to the handler that was set before, when the block ends.

    A ``KeyboardInterrupt`` raised while TensorFlow's C++ code is calling back into Python (a lazy
    import inside ``nest.flatten``, seen in a predict) can surface as ``SystemError: ... returned a
    result with an exception set``, and TensorFlow prints that traceback itself before our handler
    sees anything. Wrapping each forward pass defers the signal by at most one batch. A second
    Ctrl-C inside the block is not held: a user who presses it twice wants out now, so every press
    so far goes to the previous handler at once, in order (a handler that counts presses sees all).

    The first held press is answered at once on stderr (``HELD_MESSAGE``), so that a user waiting
    on a long batch (test-time averaging scores eight copies of each image) knows it was heard.

    Outside the main thread (a server's worker) Python allows no handler to be set, and a handler
    of ``SIG_IGN`` or ``SIG_DFL`` is left alone; in those cases the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL, or set from C (None): not ours to change
        yield
        return
    held: list[int] = []
    delivered = [0]

    def deliver(frame) -> None:
        while delivered[0] < len(held):
            signum = held[delivered[0]]
            delivered[0] += 1
            try:
                previous(signum, frame)  # run_guarded's handler (or Python's) raises KeyboardInterrupt here
            except BaseException:
                delivered[0] = len(held)  # one KeyboardInterrupt on its way out is enough
                raise

    def hold(signum, frame) -> None:
        held.append(signum)
        if len(held) > 1:
            deliver(frame)
        elif not _announced[0]:
            _announced[0] = True
            print(HELD_MESSAGE, file=sys.stderr, flush=True)

    hold.holds_sigint = True  # type: ignore[attr-defined]
    outermost = not getattr(previous, "holds_sigint", False)
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if outermost:
            _announced[0] = False
        # Here only Python code runs: the handler's KeyboardInterrupt propagates normally and
        # replaces any error the block raised.
        deliver(None)
