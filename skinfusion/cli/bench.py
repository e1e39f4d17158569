"""Training and inference throughput, latency and peak RSS, beside the naive per-image loop.

``skinfusion bench`` is ``skinfusion.bench.bench``, which owns its flags and child processes;
this module checks them first, so a bad value is refused before minutes of benchmarking.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from colorspaces.files import check_output_file
from skinfusion.cli.common import run_guarded
from skinfusion.bench import bench

# bench's counts: each must be at least 1
_COUNTS = ("train_steps", "n_images", "naive_images", "latency_calls", "batch_size")


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion bench`` parser (``skinfusion.bench.bench.bench_parser``)."""
    return bench.bench_parser()


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for dest in _COUNTS:
        if getattr(args, dest) < 1:
            p.error(f"argument --{dest.replace('_', '-')}: must be at least 1, got {getattr(args, dest)}")
    if args.out is not None:
        try:
            check_output_file("--out", args.out)
        except (ValueError, FileNotFoundError) as exc:
            p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion bench``: print the side-by-side table and write the raw JSON.

    Returns:
        0, or 2 if a flag is out of range or the run has no fused ensemble. With ``--train``,
        ``skinfusion.bench.bench_train`` (training throughput variants) runs instead.
    """
    if argv is None:
        argv = sys.argv[1:]
    if "--train" in argv:  # training throughput, setting against setting: a parser of its own
        from skinfusion.bench import bench_train

        return bench_train.main(argv)
    p = parser()
    args = p.parse_args(argv)
    if args.phase is None:  # the parent; a child phase was checked by it
        _check(p, args)
    return run_guarded(lambda _: bench.main(argv), args, parser=p)
