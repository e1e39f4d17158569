"""Inference speed of the Keras bundle and its exports (onnx, onnx-int8, tflite), side by side in one run.

    python -m skinfusion.bench.bench_export --run RUN [--exports DIR]

Exports missing from ``DIR`` (default ``RUN/exports``) are written first (``DIR/onnx``,
``DIR/onnx-int8``, ``DIR/tflite``). Each backend is then measured in its own child process, so
the ONNX and TFLite ones show what a deployment without TensorFlow costs: batch throughput from
files (decoding threads overlapped, as ``skinfusion predict``) and from decoded arrays,
single-image ``predict`` latency from a decoded ``load_size`` array and from a JPEG on disk
(p50, p95), model file size and peak RSS. The compute ceiling is FLOPs per image (the convolutions
and the dense layer, counted from the Keras models) times images per second, against the fp32
peak of the cores used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ensemble.formats import EXPORT_FORMATS
from ensemble.rundir import MANIFEST_FILE

logger = logging.getLogger(__name__)

# Keras, then every export format in float32 and in the quantisations its table entry names (onnx-int8).
BACKENDS = ("keras", *(f.name + (f"-{q}" if q else "") for f in EXPORT_FORMATS.values() for q in ("", *f.bench_quantize)))
CORES = 2
# fp32 peak of one AVX-512 core: 2 FMA units x 16 lanes x 2 FLOP per cycle.
FLOP_PER_CYCLE = 64


def _clock_ghz() -> float:
    """Nominal clock from /proc/cpuinfo (the first core), or 2.0 GHz when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return 2.0


def _flops_per_image(run: str) -> float:
    """Multiply-adds x 2 of the branches' convolutions and dense layers for one image (all windows)."""
    import keras

    from ensemble.bundle import load_ensemble

    ens = load_ensemble(run)
    total = 0.0
    for model in ens.models:
        for layer in model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                _, h, w, f = layer.output.shape
                kh, kw = layer.kernel_size
                total += 2.0 * h * w * f * kh * kw * layer.input.shape[-1]
            elif isinstance(layer, keras.layers.Dense):
                total += 2.0 * layer.input.shape[-1] * layer.units
    from colorspaces.crops import window_offsets

    return total * len(window_offsets(ens.load_size, ens.image_size, ens.configs[0].crop_stride)) ** 2


def _percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def _phase(backend: str, bundle: str, paths: list[str], calls: int, batch_size: int) -> dict[str, Any]:
    """One backend's figures, measured in this (child) process."""
    import ensemble
    from colorspaces import read_image, resize_image

    t0 = time.perf_counter()
    ens = ensemble.load(bundle)
    load_s = time.perf_counter() - t0
    decoded = np.stack([resize_image(read_image(p), ens.load_size) for p in paths])
    list(ens.iter_files(paths[:batch_size], batch_size=batch_size))  # warm: page cache, kernels, allocations
    t0 = time.perf_counter()
    n = sum(len(b.paths) for b in ens.iter_files(paths, batch_size=batch_size))
    files_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(decoded), batch_size):
        ens.score_details(decoded[i : i + batch_size])
    array_rate = len(decoded) / (time.perf_counter() - t0)
    single = {}
    for what, source in (("array", lambda i: decoded[i % len(decoded)]), ("jpeg", lambda i: paths[i % len(paths)])):
        for i in range(10):
            ensemble.predict(source(i), run=bundle)
        ms = []
        for i in range(calls):
            t0 = time.perf_counter()
            ensemble.predict(source(i), run=bundle)
            ms.append((time.perf_counter() - t0) * 1e3)
        single[what] = _percentiles(ms)
    return {"backend": backend, "load_s": load_s, "batch_files_per_s": files_rate, "batch_arrays_per_s": array_rate,
            "single_array_ms": single["array"], "single_jpeg_ms": single["jpeg"],
            "tensorflow_loaded": "tensorflow" in sys.modules,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would count the parent's memory at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_size(bundle: Path, backend: str) -> int:
    if backend == "keras":
        from ensemble.bundle import bundle_dir

        ens_dir = bundle_dir(bundle)
        m = json.loads((ens_dir / MANIFEST_FILE).read_text())
        return sum((ens_dir / b["path"] / "model.keras").stat().st_size for b in m["branches"])
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    return (bundle / m["model"]["file"]).stat().st_size


def format_table(r: dict[str, Any]) -> str:
    """The Markdown table of a ``bench_export`` result."""
    rows = [("batch from files (images/s)", "batch_files_per_s", "{:.0f}"),
            ("batch from decoded arrays (images/s)", "batch_arrays_per_s", "{:.0f}"),
            ("single image p50, decoded array (ms)", ("single_array_ms", 0), "{:.2f}"),
            ("single image p95, decoded array (ms)", ("single_array_ms", 1), "{:.2f}"),
            ("single image p50, JPEG file (ms)", ("single_jpeg_ms", 0), "{:.2f}"),
            ("single image p95, JPEG file (ms)", ("single_jpeg_ms", 1), "{:.2f}"),
            ("model file(s) (KB)", "model_bytes", "{:.0f}"),
            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("share of the fp32 peak, batch from arrays", "peak_share", "{:.1%}")]
    names = [b for b in BACKENDS if b in r["backends"]]
    out = ["| measure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, key, fmt in rows:
        cells = []
        for b in names:
            v = r["backends"][b]
            v = v[key[0]][key[1]] if isinstance(key, tuple) else v[key]
            cells.append(fmt.format(v / 1024 if key == "model_bytes" else v))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(f"\n{r['flops_per_image'] / 1e6:.0f} MFLOP per image; fp32 peak of {CORES} AVX-512 cores at "
               f"{r['clock_ghz']:.2f} GHz = {r['peak_gflops']:.0f} GFLOP/s; {r['n_images']} test images, "
               f"{r['latency_calls']} single-image calls")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(prog="python -m skinfusion.bench.bench_export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a fused run (its test split names the images)")
    p.add_argument("--exports", help="folder of the exports (default RUN/exports; missing ones are written)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {','.join(BACKENDS)}")
    p.add_argument("--n-images", type=int, default=1000, help="test images for the batch figures (default 1000)")
    p.add_argument("--latency-calls", type=int, default=300, help="single-image calls per figure (default 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="raw figures as JSON (default EXPORTS/bench.json)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--phase``, one backend's child process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = parser().parse_args(argv)
    if args.phase:
        paths = Path(args.paths).read_text().splitlines()
        print(json.dumps(_phase(args.phase, args.bundle, paths, args.latency_calls, args.batch_size)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from skinfusion.workflows.exporting import export_run, split_records

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise SystemExit(f"--backends takes names from {','.join(BACKENDS)}, got {args.backends!r}")
    run = Path(args.run)
    exports = Path(args.exports) if args.exports else run / "exports"
    bundles = {"keras": run}
    for b in backends:
        if b == "keras":
            continue
        bundles[b] = exports / b
        if not (bundles[b] / MANIFEST_FILE).is_file():
            fmt, _, q = b.partition("-")
            logger.info("writing the %s export to %s", b, bundles[b])
            export_run(str(run), str(bundles[b]), fmt, q or None)
    records = split_records(run, "test")
    paths = [r.path for r in records][: args.n_images]
    list_file = exports / "bench-paths.txt"
    exports.mkdir(parents=True, exist_ok=True)
    list_file.write_text("\n".join(paths))
    result: dict[str, Any] = {"run": str(run), "n_images": len(paths), "latency_calls": args.latency_calls,
                              "batch_size": args.batch_size, "backends": {}}
    result["flops_per_image"] = _flops_per_image(str(run))
    result["clock_ghz"] = _clock_ghz()
    result["peak_gflops"] = CORES * FLOP_PER_CYCLE * result["clock_ghz"]
    for b in backends:
        logger.info("measuring %s", b)
        cmd = [sys.executable, "-m", "skinfusion.bench.bench_export", "--run", str(run), "--phase", b,
               "--bundle", str(bundles[b]), "--paths", str(list_file), "--latency-calls", str(args.latency_calls),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {b} phase failed:\n{proc.stderr[-2000:]}")
        fig = json.loads(proc.stdout.strip().splitlines()[-1])
        fig["model_bytes"] = _model_size(bundles[b], b)
        fig["peak_share"] = fig["batch_arrays_per_s"] * result["flops_per_image"] / (result["peak_gflops"] * 1e9)
        result["backends"][b] = fig
    out = Path(args.out) if args.out else exports / "bench.json"
    out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
