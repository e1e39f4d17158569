"""Process resources for long jobs: glibc's mmap threshold and the peak resident memory."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)


def bound_allocator(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, always.

    By default glibc raises its mmap threshold after the first large free, so the input
    pipeline's per-batch arrays (megabytes each, allocated by several tf.data threads) are
    then carved from per-thread heaps that keep their freed memory: resident memory creeps
    up epoch after epoch. A fixed threshold returns every batch's memory when it is freed.
    A no-op (returns False) where the C library is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``getrusage``'s ``ru_maxrss``, it is
    not inherited from the parent across fork and exec, so a child reports its own peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


