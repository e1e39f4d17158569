"""A CPU training's overhead outside the model: no tf.distribute wrapper for one device, and
glibc's malloc set so that a step's activations come from the heap (speed is measured by
``experiments/train_overhead.py``, not here)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

from models.distribute import make_strategy
from skinfusion.workflows.resources import MMAP_THRESHOLD, bound_allocator


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_blocks() -> int:
    """glibc's count of live allocations it served with mmap (``mallinfo2().hblks``)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblks)


def test_one_device_trains_outside_any_tf_distribute_strategy():
    # Keras feeds a model made in a strategy's scope through a multi-device iterator, and that
    # iterator's generator dataset pins glibc's mmap threshold at 128 KB (TensorFlow's
    # ApplyPython311MemoryPatch): a third slower steps on CPU. One device needs no strategy.
    import tensorflow as tf

    strategy = make_strategy("one-device")
    assert strategy.num_replicas_in_sync == 1
    with strategy.scope():
        assert not tf.distribute.has_strategy()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings are Linux-only")
def test_a_training_steps_largest_activation_comes_from_the_heap_not_a_fresh_mapping():
    try:
        before = _mapped_blocks()
    except (OSError, AttributeError):
        pytest.skip("this C library has no mallinfo2 (not glibc 2.33 or later)")
    assert bound_allocator()
    # The first conv block's output for a batch of 32 at 96 px and 16 filters: 19 MB of float32.
    activation = np.empty((32, 96, 96, 16), np.float32)
    assert activation.nbytes < MMAP_THRESHOLD
    assert _mapped_blocks() == before
    del activation
    # (Whether a block above the threshold is mapped is not asserted: glibc first looks for a free
    # chunk in the heap, which earlier tests in the same process may have left; CI saw one.)
