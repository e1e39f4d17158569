"""Scoring throughput of the Ray engine (1 and 2 workers) against the local engine, on the same images.

Usage: ``python -m experiments.bench_ray [--run runs/loso/HAM10000/baseline]
[--images ../shared/data/isic-mel-nev/images] [--n 2000] [--rounds 2]``

Each round scores the same ``--n`` images (the first in sorted order) once per configuration, the
configurations in a rotated order from round to round, so load from other processes on the
machine falls on all of them alike. One Ray instance on this machine serves every Ray pass; its
actors are started anew for each pass (each loads the bundle), as ``skinfusion predict --engine
ray`` does. Each configuration also scores a short pass (``2 x batch`` images) right before its
full pass: its wall time is the fixed cost (for Ray: actor start-up, TensorFlow import, bundle
load), and the difference between the two passes gives the cost per image. Reported per
configuration (median over rounds):

- wall s: the full pass, from the call to the last result, start-up included; img/s = n / wall;
- fixed s: the short pass's wall time;
- marginal img/s: ``(n - n_short) / (wall - wall_short)``, throughput once started;
- overhead ms/img: ``1000 * (1 / marginal - 1 / marginal_local)``, what the engine adds per image.

The fused probabilities of every Ray pass are checked against the local engine's (max |diff|).
Not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import run_experiment
from skinfusion.cli.common import positive_int

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]


def _time_pass(scorer, paths: list[str], batch_size: int) -> dict:
    """Score ``paths`` once: wall time and the fused probabilities, in order."""
    t0 = time.perf_counter()
    fused = [np.asarray(b.fused) for b in scorer.iter_files(paths, batch_size=batch_size, workers=2)]
    return {"wall": time.perf_counter() - t0, "fused": np.concatenate(fused)}


def main(argv: list[str] | None = None) -> int:
    """Command line: score the same images locally and through Ray, interleaved, and print the ratios."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench_ray", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "loso" / "HAM10000" / "baseline"),
                   help="a fused run (default: runs/loso/HAM10000/baseline, 96 px, three branches)")
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "isic-mel-nev" / "images"),
                   help="a folder of images (default: ../shared/data/isic-mel-nev/images)")
    p.add_argument("--n", type=positive_int, default=2000, help="images per pass (default 2000)")
    p.add_argument("--rounds", type=positive_int, default=2, help="passes per configuration, interleaved (default 2)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    args = p.parse_args(argv)
    return run_experiment(_run, args, p)


def _run(args: argparse.Namespace) -> int:
    """The benchmark itself (``main``'s body, guarded)."""

    import ray

    from ensemble import load
    from skinfusion.workflows.predicting import input_paths
    from skinfusion.workflows.ray_scoring import RayEngine

    paths = input_paths(args.images)[: args.n]
    if len(paths) < args.n:
        print(f"--images {args.images}: only {len(paths)} images, fewer than --n {args.n}", file=sys.stderr)
        return 2
    ens = load(args.run)
    cpus = os.cpu_count() or 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance: no token to write into ~/.ray
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    configs = {"local": lambda: contextlib.nullcontext(ens),
               "ray, 1 worker": lambda: RayEngine(ens, args.run, num_workers=1),
               "ray, 2 workers": lambda: RayEngine(ens, args.run, num_workers=2)}
    names = list(configs)
    results: dict[str, list[dict]] = {n: [] for n in names}
    # Warm-up: TensorFlow's first calls in this process, and the OS file cache for the images.
    _time_pass(ens, paths[: 4 * args.batch_size], args.batch_size)
    n_short = 2 * args.batch_size
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with configs[name]() as scorer:
                short = _time_pass(scorer, paths[:n_short], args.batch_size)
            with configs[name]() as scorer:
                res = _time_pass(scorer, paths, args.batch_size)
            res["short"] = short["wall"]
            res["marginal"] = (args.n - n_short) / max(res["wall"] - short["wall"], 1e-9)
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['wall']:.1f} s, short pass {short['wall']:.1f} s", file=sys.stderr)
    ray.shutdown()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    reference = results["local"][0]["fused"]
    print(f"\n{args.n} images from {args.images}, run {args.run} ({ens.image_size} px, {len(ens.models)} branches), "
          f"batch {args.batch_size}, {cpus} CPUs, median of {args.rounds} interleaved rounds\n")
    print("| engine | wall s | img/s | fixed s | marginal img/s | overhead ms/img | max abs diff vs local |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        wall, marginal = med(name, "wall"), med(name, "marginal")
        overhead = 1000 * (1 / marginal - 1 / med("local", "marginal"))
        diff = max(float(np.max(np.abs(x["fused"] - reference))) for x in results[name])
        print(f"| {name} | {wall:.1f} | {args.n / wall:.1f} | {med(name, 'short'):.1f} | {marginal:.1f} | "
              f"{'—' if name == 'local' else f'{overhead:+.1f}'} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
