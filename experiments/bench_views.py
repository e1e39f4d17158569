"""Inference preprocessing cost: the branches' view arrays made branch by branch against
``Preprocess.branch_inputs``, which shares the colour constancy and windows between branches.

Usage: ``python -m experiments.bench_views [--views rgb,hsv,fft,rgb_sog,hsv_sog] [--size 96]
[--crop-scale 1.0] [--batch 64] [--batches 20] [--rounds 5]``

Both sides score the same synthetic RGB uint8 batches (the work does not depend on the pixel
values), in alternating rounds so that load from other processes falls on both alike; each
round's time is the process CPU time (all threads) and the wall time of one pass over every
batch. Reported: the median per image over rounds, the ratio (branch by branch / shared), and
whether the arrays are identical. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Sequence

import numpy as np

from colorspaces import DEFAULT_VIEWS
from colorspaces.pipeline import BranchRecipe, Preprocess, view_inputs
from experiments.common import run_experiment
from skinfusion.cli.common import positive_int
from skinfusion.cli.fuse import parse_views


def parser() -> argparse.ArgumentParser:
    """The flags of ``python -m experiments.bench_views``."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench_views", description=__doc__.splitlines()[0])
    p.add_argument("--views", default=",".join(DEFAULT_VIEWS),
                   help=f"comma-separated branch views (default {','.join(DEFAULT_VIEWS)})")
    p.add_argument("--size", type=positive_int, default=96, help="branch input side in pixels (default 96)")
    p.add_argument("--crop-scale", type=float, default=1.0,
                   help="load side = round(size x this); > 1 cuts the 3x3 test-time windows (default 1.0)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--batches", type=positive_int, default=20, help="batches per pass (default 20)")
    p.add_argument("--rounds", type=positive_int, default=5, help="alternating rounds per side (default 5)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    return p


def _time(fn, batches: list[np.ndarray]) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    for b in batches:
        fn(b)
    return time.process_time() - c0, time.perf_counter() - w0


def _body(args: argparse.Namespace) -> int:
    if not 1.0 <= args.crop_scale <= 2.0:
        raise ValueError(f"--crop-scale must be in [1, 2], got {args.crop_scale}")
    views = parse_views(args.views)
    load = int(round(args.size * args.crop_scale))
    recipe = Preprocess(args.size, load, tuple(BranchRecipe(v) for v in views))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (args.batch, load, load, 3), dtype=np.uint8) for _ in range(args.batches)]

    def alone(b: np.ndarray) -> list[tuple[np.ndarray, int]]:
        return [view_inputs(b, r.view, args.size, r.color_constancy, r.crop_stride) for r in recipe.branches]

    identical = all(np.array_equal(x, y) and k == j
                    for (x, k), (y, j) in zip(alone(batches[0]), recipe.branch_inputs(batches[0])))
    sides = {"branch by branch": alone, "shared": recipe.branch_inputs}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            times[name].append(_time(sides[name], batches))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    n = args.batch * args.batches
    report = {"views": views, "size": args.size, "load": load, "images_per_pass": n,
              "identical_arrays": identical}
    for name, ts in times.items():
        report[name] = {"cpu_ms_per_image": 1e3 * statistics.median(c for c, _ in ts) / n,
                        "wall_ms_per_image": 1e3 * statistics.median(w for _, w in ts) / n}
    for unit in ("cpu_ms_per_image", "wall_ms_per_image"):
        report[f"ratio_{unit}"] = report["branch by branch"][unit] / report["shared"][unit]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if identical else 1  # as the table: different arrays make the timing meaningless
    print(f"views {','.join(views)}, {args.size} px branch input, {load} px load, "
          f"{n} images per pass, median of {args.rounds} rounds; arrays identical: {identical}")
    print("| side | CPU ms/image | wall ms/image |\n| --- | ---: | ---: |")
    for name in sides:
        print(f"| {name} | {report[name]['cpu_ms_per_image']:.3f} | {report[name]['wall_ms_per_image']:.3f} |")
    print(f"| ratio (branch by branch / shared) | {report['ratio_cpu_ms_per_image']:.2f}x "
          f"| {report['ratio_wall_ms_per_image']:.2f}x |")
    return 0 if identical else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m experiments.bench_views``."""
    p = parser()
    return run_experiment(_body, p.parse_args(argv), p, tensorflow=False)


if __name__ == "__main__":
    sys.exit(main())
