"""Training and inference throughput, latency and peak RSS, beside the naive per-image loop.

``skinfusion bench`` is ``skinfusion.workflows.bench``, which owns its flags and child processes.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from skinfusion.workflows import bench


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion bench`` parser (``skinfusion.workflows.bench.bench_parser``)."""
    return bench.bench_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion bench``: print the side-by-side table and write the raw JSON.

    Returns:
        0, or 2 if the run has no fused ensemble.
    """
    return bench.main(argv)
