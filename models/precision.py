"""``--mixed-precision``: its compute types, how a checkpoint or history records one, and what this
machine does natively (the warning about slow settings is ``models.distribute.warn_if_mixed_precision_is_slow``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


# Compute types of --mixed-precision: float16 for GPUs; bfloat16 for GPUs and for CPUs with native
# bf16 arithmetic (avx512_bf16 or AMX), where it measured 1.06-1.12x per CPU-second (experiments/RESULTS.md).
MIXED_PRECISION = ("float16", "bfloat16")


def mixed_precision_name(value: str | bool | None) -> str:
    """``--mixed-precision``'s compute type: "" (off), "float16" or "bfloat16"; ``True`` means float16.

    Raises:
        ValueError: for any other value.
    """
    if value is True:
        return "float16"
    if not value:
        return ""
    if value not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision {value!r}: choose one of {', '.join(MIXED_PRECISION)}")
    return str(value)


def recorded_mixed_precision(raw: Any) -> str:
    """The compute type a checkpoint or history recorded: "", "float16" or "bfloat16".

    Releases before bfloat16 recorded ``true``/``false`` (true: float16); a history records "off"
    for float32; a record from before the field has nothing (``None``).

    Raises:
        ValueError: for any other value (a damaged record).
    """
    return "" if raw in ("off", False, None) else mixed_precision_name(raw)


def refuse_other_mixed_precision(source: Any, raw: Any, now: str | bool, what: str) -> None:
    """Refuse to resume ``what`` (in ``source``) trained with another compute type than ``now``:
    one branch, one compute type.

    Raises:
        ValueError: naming ``source`` and the flag to resume with.
    """
    was = recorded_mixed_precision(raw)
    if was != mixed_precision_name(now):
        how = f"with --mixed-precision {was}" if was else "without --mixed-precision"
        raise ValueError(f"{source}: {what} was trained {how}; resume {how}, or train without --resume")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """The compute capability (major, minor) of each GPU TensorFlow sees that reports one."""
    import tensorflow as tf

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except (RuntimeError, ValueError):  # a device that reports no details: nothing to judge by
            continue
        if cc:
            found.append((int(cc[0]), int(cc[1])))
    return found
