"""Where a CPU training's time goes outside the model: the tf.distribute wrapper and glibc's malloc.

    python -m experiments.train_overhead [--images 1200] [--epochs 4] [--rounds 2]

Each variant trains the default rgb branch with ``models.train.fit_branch`` on the same synthetic
96 px images, in a fresh process, the variants alternating round by round (the machine is shared
and noisy, so compare the ratios of one run). Variants:

* ``wrapped``: the path of every `skinfusion train` before 2026-12-07: a ``OneDeviceStrategy``
  (Keras then feeds the model through a multi-device iterator, whose generator dataset makes
  TensorFlow pin glibc's mmap threshold at 128 KB) and the old 1 MB threshold;
* ``default``: today's ``--strategy one-device`` (no wrapper) and ``bound_allocator``;
* ``glibc``: no wrapper and glibc's own malloc rules (dynamic thresholds, 8 arenas per core).

Prints seconds per epoch (median of the epochs after the first), the process's user and system
CPU seconds, and resident memory: at the end of each epoch (does it creep?) and at its peak.
Linux (glibc) only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from experiments.common import run_experiment
from skinfusion.cli.common import positive_int

VARIANTS = ("wrapped", "default", "glibc")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith("VmRSS:"))


def _child(variant: str, n_images: int, epochs: int) -> dict:
    """One training in this process; returns its timings and memory."""
    import ctypes
    import resource

    import keras
    import numpy as np
    import tensorflow as tf

    from models import BranchConfig
    from models.distribute import make_strategy
    from models.train import fit_branch
    from skinfusion.workflows.resources import bound_allocator, peak_rss_mb

    strategy = None
    if variant == "wrapped":
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # the bound_allocator of before: M_MMAP_THRESHOLD 1 MB
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    elif variant == "default":
        bound_allocator()
        strategy = make_strategy("one-device")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_images, 96, 96, 3), dtype=np.uint8)
    y = (rng.random(n_images) < 0.16).astype(int)
    xv, yv = x[: n_images // 5], np.r_[0, 1, y[2 : n_images // 5]]
    epoch_s, rss = [], []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.t0)
            rss.append(_rss_mb())

    config = BranchConfig(view="rgb", epochs=epochs, patience=epochs)
    fit_branch(config, x, y, xv, yv, callbacks=[Clock()], strategy=strategy)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"variant": variant, "epoch_s": epoch_s, "rss_mb": rss, "peak_rss_mb": peak_rss_mb(),
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "images_per_epoch": 2 * int(np.sum(y == 0))}  # the default oversampling: nevi x 2


def _spawn(variant: str, n_images: int, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "experiments.train_overhead", "--child", variant,
           "--images", str(n_images), "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Run every variant ``--rounds`` times, alternating, and print one Markdown row per variant."""
    parser = argparse.ArgumentParser(prog="python -m experiments.train_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=1200, help="synthetic training images (default 1200)")
    parser.add_argument("--epochs", type=positive_int, default=4, help="epochs per training, at least 2 (default 4)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="trainings per variant, alternating (default 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.images, args.epochs)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch, which traces the step, is not timed)")
    if args.images < 50:
        parser.error(f"--images must be at least 50 (a fifth of them validate, with both classes), got {args.images}")
    if not sys.platform.startswith("linux"):
        parser.error("the variants set glibc's malloc and read /proc: Linux only")

    def job(args: argparse.Namespace) -> int:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                print(f"round {r + 1}: {v} ...", file=sys.stderr, flush=True)
                runs[v].append(_spawn(v, args.images, args.epochs))
        base = statistics.median(s for run in runs[variants[0]] for s in run["epoch_s"][1:])
        print(f"| variant | s per epoch | images/s | vs {variants[0]} | user CPU s | system CPU s | "
              "RSS at each epoch's end (MB, round 1) | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        for v in variants:
            per_epoch = statistics.median(s for run in runs[v] for s in run["epoch_s"][1:])
            first = runs[v][0]
            print(f"| {v} | {per_epoch:.1f} | {first['images_per_epoch'] / per_epoch:.0f} | {base / per_epoch:.2f}x | "
                  f"{statistics.median(r['user_s'] for r in runs[v]):.0f} | {statistics.median(r['sys_s'] for r in runs[v]):.0f} | "
                  f"{' '.join(f'{m:.0f}' for m in first['rss_mb'])} | {max(r['peak_rss_mb'] for r in runs[v]):.0f} |")
        return 0

    return run_experiment(job, args, parser)


if __name__ == "__main__":
    sys.exit(main())
