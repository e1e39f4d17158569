"""``skinfusion bench``: training and inference speed and memory, side by side with the naive per-image loop.

Every figure is measured in one invocation, each side in its own child process (so peak RSS
is per side), on the run's own images: training on its train split, inference on its test split.
Each phase imports what it measures inside its own function, on purpose: the naive side must not
pay for (or benefit from) our modules, and the orchestrating parent loads neither side.
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

from colorspaces import VIEWS
from ensemble.rundir import MANIFEST_FILE, RunDir

logger = logging.getLogger(__name__)

PHASES = ("train-ours", "train-naive", "infer-ours", "infer-naive")


def _peak_rss_mb() -> float:
    from skinfusion.workflows.resources import peak_rss_mb

    return peak_rss_mb()


def _split_paths(run: Path, split: str) -> tuple[list[str], np.ndarray]:
    from skinfusion.data.layouts import index_dataset
    from skinfusion.data.splits import load_split, recorded_data_dir

    assign, info = load_split(run)
    index = index_dataset(recorded_data_dir(run, info))
    recs = [r for r in index.records if assign.get(r.image_id) == split]
    return [r.path for r in recs], np.array([r.label for r in recs])


def _branch_configs(run: Path):
    from models import BranchConfig

    out = []
    for view in VIEWS:
        cfg = RunDir(run).branch(view) / "config.json"
        if cfg.is_file():
            out.append(BranchConfig.from_saved(json.loads(cfg.read_text())))
    if not out:
        raise FileNotFoundError(f"{run}: no trained branches under {RunDir(run).branches}")
    return out


def _compiled_model(config):
    import keras

    from models import build_branch

    keras.utils.set_random_seed(config.seed)
    model = build_branch(config)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)])
    return model


def _timed_fit(model, data, steps: int) -> float:
    t0 = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - t0


def _blocked_on_input(model, ds, steps: int) -> float:
    """Share of wall time a training loop spends blocked in ``next()`` on the input pipeline.

    The direct measure (PyTorch's "data time"): each step fetches its batch, then trains on it;
    with prefetching keeping up, the fetch returns at once.
    """
    it = iter(ds)
    for _ in range(2):  # trace train_on_batch
        model.train_on_batch(*next(it))
    waited = 0.0
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t0
        model.train_on_batch(*batch)
    return waited / (time.perf_counter() - t_start)


def _phase_train_ours(run: Path, steps: int, warmup: int, rounds: int = 3) -> dict[str, Any]:
    """Streaming tf.data input from the decoded-image cache, against the same batches held in memory.

    Two input-wait figures per branch: ``input_wait_share``, the share of step time blocked on
    the input pipeline (measured directly), and ``input_cost_share``, how much slower a
    step is with streamed input than with the batches already in memory. On a 2-core machine
    the second also counts the CPU the input threads take from the training step, so it is
    the stricter one. Streamed and in-memory epochs are interleaved ``rounds`` times and the
    fastest of each kept, so a noisy neighbour does not decide the ratio.
    """
    import tensorflow as tf

    from models.train import class_weights, training_batches
    from skinfusion.data.cache import cached_images

    paths, y = _split_paths(run, "train")
    out = {}
    for config in _branch_configs(run):
        images, ok, _ = cached_images(paths, config.load_size, desc="train images")
        yy = y[ok]
        weights = class_weights(yy, config.class_weight)
        model = _compiled_model(config)
        ds, _ = training_batches(images, yy, config, weights, epochs=2 + rounds)
        # The same batches already materialised in memory: what the step costs with no input work.
        held = list(ds.take(steps).as_numpy_iterator())
        mem = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate([b[i] for b in held]) for i in range(3)))
        mem = mem.batch(config.batch_size).cache().repeat()
        _timed_fit(model, ds, warmup)  # traces the train step
        _timed_fit(model, mem, warmup)
        t_stream, t_mem = [], []
        for _ in range(rounds):
            t_stream.append(_timed_fit(model, ds, steps))
            t_mem.append(_timed_fit(model, mem, steps))
        n = steps * config.batch_size
        blocked = _blocked_on_input(model, ds, steps)
        out[config.view] = {"images_per_s": n / min(t_stream), "compute_only_images_per_s": n / min(t_mem),
                            "input_wait_share": blocked,
                            "input_cost_share": max(0.0, (min(t_stream) - min(t_mem)) / min(t_stream)),
                            "stream_s": t_stream, "memory_s": t_mem}
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _naive_view(view: str, img: np.ndarray) -> np.ndarray:
    """One image's view as published code writes it: the FFT in float64 with NumPy, per image."""
    from colorspaces import apply_view

    if view != "fft":
        return apply_view(view, img)
    spec = np.fft.fftshift(np.fft.fft2(img / 255.0, axes=(0, 1)), axes=(0, 1))
    log_mag = np.log1p(np.abs(spec))
    return ((log_mag - log_mag.mean(axis=(0, 1))) / (log_mag.std(axis=(0, 1)) + 1e-6)).astype(np.float32)


def _phase_train_naive(run: Path, steps: int, warmup: int) -> dict[str, Any]:
    """The usual published loop: a Python generator that cv2.imreads and transforms each image, no prefetch."""
    import cv2
    import keras

    paths, y = _split_paths(run, "train")
    out = {}
    for config in _branch_configs(run):
        class Naive(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()  # workers=1, no multiprocessing: the common default

            def __len__(self):
                return math.ceil(len(paths) / config.batch_size)

            def __getitem__(self, i):
                xs, ys = [], []
                for j in range(i * config.batch_size, min(len(paths), (i + 1) * config.batch_size)):
                    img = cv2.cvtColor(cv2.imread(paths[j]), cv2.COLOR_BGR2RGB)
                    img = cv2.resize(img, (config.image_size, config.image_size))
                    xs.append(_naive_view(config.view, img))
                    ys.append(y[j])
                return np.stack(xs), np.array(ys, np.float32)

        model = _compiled_model(config)
        data = Naive()
        _timed_fit(model, data, warmup)
        t = _timed_fit(model, data, steps)
        out[config.view] = {"images_per_s": steps * config.batch_size / t}
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _phase_infer_ours(run: Path, n_images: int, latency_calls: int, batch_size: int) -> dict[str, Any]:
    import ensemble

    paths, _ = _split_paths(run, "test")
    paths = paths[:n_images]
    ens = ensemble.load(run)
    list(ens.iter_files(paths[:batch_size], batch_size=batch_size))  # warm: page cache and kernels
    t0 = time.perf_counter()
    n = sum(len(b.paths) for b in ens.iter_files(paths, batch_size=batch_size))
    batch_rate = n / (time.perf_counter() - t0)
    # The fusion's share: fuse() alone on the batch's member matrix.
    P = ens.member_proba(paths[:batch_size], batch_size=batch_size)
    t0 = time.perf_counter()
    for _ in range(100):
        ens.fuse(P)
    fuse_ms_per_image = (time.perf_counter() - t0) / (100 * len(P)) * 1e3
    lat = []
    for i in range(latency_calls + 5):
        t0 = time.perf_counter()
        ensemble.predict(paths[i % len(paths)], run=run)
        lat.append((time.perf_counter() - t0) * 1e3)
    lat = np.array(lat[5:])
    return {"images_per_s": batch_rate, "n_images": n, "fuse_ms_per_image": fuse_ms_per_image,
            "views": list(ens.views), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)), "peak_rss_mb": _peak_rss_mb()}


def _phase_infer_naive(run: Path, n_images: int) -> dict[str, Any]:
    """Per image: cv2.imread, every fused branch's view in Python, one model.predict call per branch, then the fusion."""
    import cv2
    import joblib
    import keras

    paths, _ = _split_paths(run, "test")
    paths = paths[:n_images]
    manifest = json.loads((RunDir(run).ensemble / MANIFEST_FILE).read_text())
    views, size = manifest["branch_order"], int(manifest["image_size"])
    models = [keras.saving.load_model(str(RunDir(run).branch(v) / "model.keras")) for v in views]
    fusion = joblib.load(RunDir(run).ensemble / "fusion.joblib")
    lat = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        img = cv2.resize(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
        probs = [float(m.predict(_naive_view(v, img)[None], verbose=0)[0, 0]) for m, v in zip(models, views)]
        fusion.predict_proba(np.array([probs]))
        lat.append((time.perf_counter() - t0) * 1e3)
    lat = np.array(lat[2:])  # the first calls build predict functions
    return {"images_per_s": 1e3 / lat.mean(), "n_images": len(lat), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)), "peak_rss_mb": _peak_rss_mb()}


def _run_phase(args, phase: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "skinfusion.bench.bench", "--run", str(args.run), "--phase", phase,
           "--train-steps", str(args.train_steps), "--n-images", str(args.n_images),
           "--naive-images", str(args.naive_images), "--latency-calls", str(args.latency_calls),
           "--batch-size", str(args.batch_size)]
    logger.info("benchmark phase %s ...", phase)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logger.info("phase %s done in %.0fs", phase, time.perf_counter() - t0)
    return result


def format_table(r: dict[str, Any]) -> str:
    """The benchmark table (Markdown) from the four phases' results."""
    to, tn, io, inv = (r[p] for p in PHASES)
    rows = ["| measure | skinfusion | naive loop | ratio |", "| --- | ---: | ---: | ---: |"]
    for view in [v for v in VIEWS if v in to]:
        rows.append(f"| training throughput, {view} branch (images/s) | {to[view]['images_per_s']:.0f} | "
                    f"{tn[view]['images_per_s']:.0f} | {to[view]['images_per_s'] / tn[view]['images_per_s']:.1f}× |")
    for view in [v for v in VIEWS if v in to]:
        rows.append(f"| input-wait share of training step time, {view} (blocked on input) | "
                    f"{100 * to[view]['input_wait_share']:.1f}% | | |")
    for view in [v for v in VIEWS if v in to]:
        rows.append(f"| input cost, {view} (step slowdown vs batches held in memory) | "
                    f"{100 * to[view]['input_cost_share']:.1f}% | | |")
    # The fused bundle's branches (a bench.json written before "views" was recorded: the trained ones).
    n_branches = len(io.get("views") or [v for v in VIEWS if v in to])
    rows.append(f"| batch inference, {n_branches} branches + fusion (images/s) | {io['images_per_s']:.0f} | "
                f"{inv['images_per_s']:.1f} | {io['images_per_s'] / inv['images_per_s']:.0f}× |")
    rows.append(f"| single-image predict latency p50 (ms) | {io['latency_ms_p50']:.1f} | {inv['latency_ms_p50']:.1f} | "
                f"{inv['latency_ms_p50'] / io['latency_ms_p50']:.1f}× faster |")
    rows.append(f"| single-image predict latency p95 (ms) | {io['latency_ms_p95']:.1f} | {inv['latency_ms_p95']:.1f} | "
                f"{inv['latency_ms_p95'] / io['latency_ms_p95']:.1f}× faster |")
    rows.append(f"| fusion time per image (ms) | {io['fuse_ms_per_image']:.4f} | | |")
    rows.append(f"| peak RSS, training phase (MB) | {to['peak_rss_mb']:.0f} | {tn['peak_rss_mb']:.0f} | |")
    rows.append(f"| peak RSS, inference phase (MB) | {io['peak_rss_mb']:.0f} | {inv['peak_rss_mb']:.0f} | |")
    return "\n".join(rows)


def bench_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion bench``."""
    p = argparse.ArgumentParser(prog="skinfusion bench", description=__doc__)
    p.add_argument("--run", required=True, type=Path, help="a fused run (its split names the images used)")
    p.add_argument("--train-steps", type=int, default=30, help="timed training steps per branch and side (default 30)")
    p.add_argument("--n-images", type=int, default=1000, help="test images for skinfusion's batch inference (default 1000)")
    p.add_argument("--naive-images", type=int, default=100, help="test images for the naive loop, which is slow (default 100)")
    p.add_argument("--latency-calls", type=int, default=200, help="single-image predict calls for p50/p95 (default 200)")
    p.add_argument("--batch-size", type=int, default=64, help="skinfusion's inference batch size (default 64)")
    p.add_argument("--out", type=Path, help="also write the raw figures as JSON (default RUN/bench.json)")
    p.add_argument("--train", action="store_true",
                   help="measure training throughput settings side by side instead (XLA, bfloat16, batch size, "
                        "input pipeline, threads) against the fp32 peak; see `skinfusion bench --train --help`")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="only print the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run every phase in a child process, print the side-by-side table, write the raw JSON."""
    args = bench_parser().parse_args(argv)
    if args.phase:  # child process: one phase, one JSON line on stdout
        logging.basicConfig(level=logging.WARNING)
        warmup = 3
        fn = {"train-ours": lambda: _phase_train_ours(args.run, args.train_steps, warmup),
              "train-naive": lambda: _phase_train_naive(args.run, args.train_steps, warmup),
              "infer-ours": lambda: _phase_infer_ours(args.run, args.n_images, args.latency_calls, args.batch_size),
              "infer-naive": lambda: _phase_infer_naive(args.run, args.naive_images)}[args.phase]
        print(json.dumps(fn()))
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    if not (RunDir(args.run).ensemble / MANIFEST_FILE).is_file():
        print(f"skinfusion bench: error: {args.run} has no fused ensemble (run `skinfusion fuse --run {args.run}`)", file=sys.stderr)
        return 2
    results = {"cpu_count": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items() if k != "phase"}}
    for phase in PHASES:
        results[phase] = _run_phase(args, phase)
    table = format_table(results)
    out = args.out or args.run / "bench.json"
    from colorspaces.files import write_json_atomic

    write_json_atomic(out, {**results, "table": table})
    print(table)
    print(f"\nraw figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
