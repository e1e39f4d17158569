"""``skinfusion bench --train``: training throughput of the branch CNNs, setting against setting, in one run.

Every setting (a *variant*: XLA, bfloat16, batch size, threads, ...) is measured in its own
child process (thread counts must be fixed before TensorFlow starts) on the same images, and
the variants are run ``rounds`` times in alternating order, the fastest of each kept, so a
noisy neighbour on a shared machine does not decide a ratio. The fp32 ceiling is a large
matrix product measured in the same run.

FLOPs are counted from the built model: 2 x multiply-adds of every convolution and dense
layer (BatchNorm, ReLU, pooling and the optimizer are left out, a few percent), and a
training step is counted as 3 x the forward pass (forward, gradient w.r.t. activations,
gradient w.r.t. weights), the usual estimate.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces import DEFAULT_VIEWS

logger = logging.getLogger(__name__)

# name -> settings; "threads" is per process, "memory" holds the batches (views made) in memory,
# so that the step is timed alone and the difference is what the input pipeline costs.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "memory": {"memory": True},
    "jit": {"jit": True},
    "bf16": {"policy": "mixed_bfloat16"},
    "batch64": {"batch_size": 64},
    "batch128": {"batch_size": 128},
    "jit+batch128": {"jit": True, "batch_size": 128},
    "bf16+memory": {"policy": "mixed_bfloat16", "memory": True},
    # The block order of the default before 2026-12-07: the baseline of issue 27's throughput goal.
    "bn-first": {"block_order": "conv-bn-relu-pool"},
    "threads1": {"threads": 1},
    "parallel3x1": {"threads": 1, "parallel": True},
}
DEFAULT_VARIANTS = ("default", "bn-first", "memory", "jit", "bf16", "bf16+memory", "batch64", "batch128",
                    "jit+batch128", "parallel3x1")
VIEWS = DEFAULT_VIEWS


def forward_flops(model) -> int:
    """FLOPs of one image's forward pass: 2 x the multiply-adds of the Conv2D and Dense layers."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * c_out * kh * kw * int(layer.input.shape[-1])
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(layer.input.shape[-1]) * layer.units
    return int(total)


def peak_gflops(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """The fp32 ceiling: an ``n`` x ``n`` matrix product's GFLOP/s (wall) and GFLOP per CPU-second, best of ``reps``."""
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    tf.linalg.matmul(a, b).numpy()
    best = best_cpu = math.inf
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        tf.linalg.matmul(a, b).numpy()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return {"peak_gflops": 2 * n**3 / best / 1e9, "peak_gflops_per_cpu_s": 2 * n**3 / best_cpu / 1e9}


def _images(data: str | None, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images at ``size`` px with labels: the first of a dataset's melanomas and nevi, or synthetic."""
    if data is None:
        import cv2

        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        images = np.stack([cv2.GaussianBlur(img, (0, 0), 2.0) for img in noise])
        return images, (np.arange(n) % 4 == 0).astype(int)
    from skinfusion.data.index import load_images
    from skinfusion.data.layouts import index_dataset

    recs = index_dataset(data, log=False).records
    pos = [r for r in recs if r.label == 1][: n // 4]
    chosen = pos + [r for r in recs if r.label == 0][: n - len(pos)]
    images, ok, _ = load_images([r.path for r in chosen], size, log_progress=False)
    return images, np.array([chosen[i].label for i in ok])


def _measure_view(view: str, settings: dict[str, Any], images: np.ndarray, y: np.ndarray, n_images: int,
                  repeats: int) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from models import BranchConfig, build_branch
    from models.train import class_weights, make_optimizer, training_batches

    config = BranchConfig(view=view, image_size=images.shape[1], batch_size=settings.get("batch_size", 32),
                          block_order=settings.get("block_order", BranchConfig.block_order))
    bs = config.batch_size
    steps = max(2, math.ceil(n_images / bs))
    keras.utils.set_random_seed(config.seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(settings.get("policy", "float32"))
    try:
        model = build_branch(config)
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(optimizer=make_optimizer(config, steps), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)], jit_compile=settings.get("jit", False))
    weights = class_weights(y, config.class_weight)
    per_epoch = training_batches(images, y, config, weights, epochs=1)[1]
    ds, _ = training_batches(images, y, config, weights, epochs=math.ceil((steps * (repeats + 1) + 3) / per_epoch))
    if settings.get("memory"):
        held = list(ds.take(steps).as_numpy_iterator())
        ds = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate([b[i] for b in held]) for i in range(3)))
        ds = ds.batch(bs).cache().repeat()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # traces (and XLA-compiles) the step
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flops = forward_flops(model)
    return {"images_per_s": steps * bs / min(times), "images_per_cpu_s": steps * bs / min(cpu),
            "forward_mflop": flops / 1e6, "seconds": times, "cpu_seconds": cpu, "steps": steps, "batch_size": bs}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant (or, for ``peak``, the matmul ceiling) in this fresh process."""
    threads = spec["settings"].get("threads") or os.cpu_count() or 1
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    if spec["variant"] == "peak":
        return peak_gflops()
    images, y = _images(spec["data"], spec["n_pool"], spec["image_size"])
    return {view: _measure_view(view, spec["settings"], images, y, spec["n_images"], spec["repeats"])
            for view in spec["views"]}


def _spawn(spec: dict[str, Any]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "skinfusion.bench.bench_train", "--child", json.dumps(spec)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _collect(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark variant {what} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_variant(name: str, base: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant: one child process, or one per view at once for a ``parallel`` variant."""
    settings = VARIANTS.get(name, {}) if name != "peak" else {}
    spec = {**base, "variant": name, "settings": settings}
    if not settings.get("parallel"):
        return _collect(_spawn(spec), name)
    # As `train --view all` runs by default: one process per branch, all at once.
    procs = [(_spawn({**spec, "views": [v]}), v) for v in base["views"]]
    out: dict[str, Any] = {}
    for proc, view in procs:
        out.update(_collect(proc, f"{name} ({view})"))
    return out


def aggregate_rate(result: dict[str, Any], views: Sequence[str], parallel: bool, key: str = "images_per_s") -> float:
    """Training images through all ``views`` per second (wall) or per CPU-second (``key``).

    Per CPU-second the work adds up whatever the layout; in wall time branches run at once
    (``parallel``: the slowest sets the pace) or one after another.
    """
    rates = [result[v][key] for v in views]
    return min(rates) if parallel and key == "images_per_s" else 1.0 / sum(1.0 / r for r in rates)


def format_table(results: dict[str, Any], views: Sequence[str]) -> str:
    """Markdown: per variant, images per CPU-second per branch, achieved GFLOP against the fp32 peak, wall images/s."""
    peak, peak_cpu = results["peak_gflops"], results["peak_gflops_per_cpu_s"]
    flops = sum(results["variants"]["default"][v]["forward_mflop"] for v in views) * 1e6
    default = results["variants"]["default"]
    base_cpu = aggregate_rate(default, views, False, "images_per_cpu_s")
    base_wall = aggregate_rate(default, views, False)
    head = " | ".join(f"{v} img/CPU-s" for v in views)
    rows = [f"| variant | {head} | all branches img/CPU-s | GFLOP/CPU-s (3x fwd) | % of fp32 peak | vs default "
            "(CPU) | all branches img/s (wall) | vs default (wall) |", "| --- |" + " ---: |" * (len(views) + 6)]
    for name, r in results["variants"].items():
        cpu = aggregate_rate(r, views, False, "images_per_cpu_s")
        wall = aggregate_rate(r, views, VARIANTS.get(name, {}).get("parallel", False))
        gflops = 3 * flops * cpu / 1e9
        cells = " | ".join(f"{r[v]['images_per_cpu_s']:.1f}" for v in views)
        rows.append(f"| {name} | {cells} | {cpu:.1f} | {gflops:.1f} | {100 * gflops / peak_cpu:.0f}% | "
                    f"{cpu / base_cpu:.2f}x | {wall:.1f} | {wall / base_wall:.2f}x |")
    rows.append(f"\nfp32 peak (2048^2 matmul): {peak_cpu:.0f} GFLOP per CPU-second, {peak:.0f} GFLOP/s wall on "
                f"{results['cpu_count']} cores; forward {flops / 1e6:.0f} MFLOP per image through the {len(views)} "
                "branches (Conv2D + Dense multiply-adds x 2), a training image = 3x forward. Per CPU-second "
                "figures are the process's CPU time (all its threads, input pipeline included), so they hold on a "
                "shared machine; wall figures move with the neighbours' load.")
    return "\n".join(rows)


def bench_train_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion bench --train``."""
    p = argparse.ArgumentParser(prog="skinfusion bench --train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help="dataset folder to take the images from (default: synthetic images)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--views", default=",".join(VIEWS), help=f"branches to measure (default {','.join(VIEWS)})")
    p.add_argument("--image-size", type=int, default=96, help="input side in pixels (default 96)")
    p.add_argument("--images", type=int, default=256, help="timed training images per branch and repeat (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats within a child, the fastest kept (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="passes over the variants, alternating order (default 1)")
    p.add_argument("--out", type=Path, help="also write the raw figures as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def _refusal(args: argparse.Namespace, views: Sequence[str]) -> str | None:
    """Why ``--views``, ``--data`` or ``--out`` cannot work (one line), or None."""
    from colorspaces import VIEWS as ALL_VIEWS
    from colorspaces.files import check_output_file

    bad = [v for v in views if v not in ALL_VIEWS]
    if bad or not views:
        return f"--views {args.views}: name views from {', '.join(ALL_VIEWS)}"
    if args.data is not None and not Path(args.data).is_dir():
        return f"--data {args.data}: not a folder; give a dataset folder, or leave --data out for synthetic images"
    if args.out is not None:
        try:
            check_output_file("--out", args.out)
        except (ValueError, FileNotFoundError) as exc:
            return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every variant, print the table, optionally write the raw JSON."""
    args = bench_train_parser().parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for flag, value, low in (("--images", args.images, 1), ("--repeats", args.repeats, 1), ("--rounds", args.rounds, 1),
                             ("--image-size", args.image_size, 16)):
        if value < low:
            print(f"skinfusion bench: error: {flag} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "default" not in names:
        print(f"skinfusion bench: error: --variants {args.variants}: must include default and name only "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    problem = _refusal(args, views)  # everything a child would fail on, before minutes of measuring
    if problem:
        print(f"skinfusion bench: error: {problem}", file=sys.stderr)
        return 2
    base = {"data": args.data, "views": views, "image_size": args.image_size, "n_images": args.images,
            "n_pool": max(64, args.images), "repeats": args.repeats}
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "args": vars(args), "variants": {}, "peaks": []}
    results["peaks"].append(run_variant("peak", base))
    for round_ in range(args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            logger.info("variant %s (round %d) ...", name, round_ + 1)
            r = run_variant(name, base)
            best = results["variants"].get(name)
            results["variants"][name] = r if best is None else {
                v: max(best[v], r[v], key=lambda m: m["images_per_cpu_s"]) for v in views}
    results["peaks"].append(run_variant("peak", base))
    for key in ("peak_gflops", "peak_gflops_per_cpu_s"):
        results[key] = max(p[key] for p in results["peaks"])
    table = format_table(results, views)
    print(table)
    if args.out:
        from colorspaces.files import write_json_atomic

        write_json_atomic(args.out, {**results, "args": {k: str(v) for k, v in vars(args).items()}, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
