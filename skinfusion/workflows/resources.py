"""Process resources for long jobs: glibc's malloc settings and the peak resident memory."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: Allocations served by mmap (and returned at once when freed): above a training step's largest
#: activation (a batch of 32 at 96 px, 16 channels: 19 MB), at glibc's own ceiling of 32 MB.
MMAP_THRESHOLD = 32 << 20
#: Free memory a heap keeps at its top before giving it back, as glibc's dynamic rule would set it.
TRIM_THRESHOLD = 64 << 20


def bound_allocator(arenas: int | None = None) -> bool:
    """Tune glibc's malloc for a training process: fast steps, resident memory that stays flat.

    Three settings, each measured (``experiments/RESULTS.md``, "Where a CPU training's time went"):

    * a fixed mmap threshold of ``MMAP_THRESHOLD`` (32 MB). A small one (1 MB here before, and
      TensorFlow's own 128 KB) makes every step's activations fresh mappings: a third of the
      step went to page faults. glibc's dynamic threshold is as fast but is not used, because
    * the number of malloc arenas is capped (``arenas``, default the CPU count, at least 2):
      with glibc's default of 8 per core, the input pipeline's threads each kept freed batches
      in their own heaps and resident memory crept up epoch after epoch;
    * a trim threshold of ``TRIM_THRESHOLD``, which a fixed mmap threshold would otherwise leave
      at 128 KB, giving back (and faulting in again) every heap top.

    Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        count = arenas or max(2, os.cpu_count() or 2)
        return all(bool(libc.mallopt(param, int(value))) for param, value in
                   ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, count)))
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


