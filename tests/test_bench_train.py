"""``skinfusion bench --train``: the FLOP count, the table's arithmetic and the flag checks (no timing here)."""

from __future__ import annotations

import pytest

from skinfusion.cli import bench as bench_cli
from skinfusion.bench import bench_train


def test_forward_flops_counts_every_convolution_and_the_dense_layer():
    from models import BranchConfig, build_branch

    model = build_branch(BranchConfig(image_size=32, base_filters=4))
    # conv k: (32 / 2^k)^2 outputs x (4 * 2^k) filters x 3x3 x inputs, 2 FLOPs per multiply-add; dense 32 -> 1.
    convs = [(32 // 2**k) ** 2 * (4 * 2**k) * 9 * (3 if k == 0 else 4 * 2 ** (k - 1)) for k in range(4)]
    assert bench_train.forward_flops(model) == 2 * sum(convs) + 2 * 32


def _fake(rate_cpu: float, rate: float) -> dict:
    return {v: {"images_per_s": rate, "images_per_cpu_s": rate_cpu, "forward_mflop": 70.0} for v in ("rgb", "fft")}


def test_the_table_relates_each_variant_to_the_default_and_to_the_peak():
    results = {"peak_gflops": 100.0, "peak_gflops_per_cpu_s": 50.0, "cpu_count": 2,
               "variants": {"default": _fake(10.0, 20.0), "jit": _fake(20.0, 30.0)}}
    table = bench_train.format_table(results, ["rgb", "fft"])
    # two branches at 10 img/CPU-s each: 5 images through both per CPU-second, 3 x 140 MFLOP each
    assert "| default | 10.0 | 10.0 | 5.0 | 2.1 | 4% | 1.00x | 10.0 | 1.00x |" in table
    assert "| jit | 20.0 | 20.0 | 10.0 | 4.2 | 8% | 2.00x | 15.0 | 1.50x |" in table


@pytest.mark.parametrize("argv, message", [
    (["--train", "--variants", "default,warp"], "--variants default,warp"),
    (["--train", "--variants", "jit"], "must include default"),
    (["--train", "--images", "0"], "--images must be at least 1"),
    # refused before any measuring (each used to fail only in a child, or after the whole run)
    (["--train", "--data", "/nonexistent-skinfusion"], "--data /nonexistent-skinfusion: not a folder"),
    (["--train", "--out", "/nonexistent-skinfusion/x.json"], "--out /nonexistent-skinfusion/x.json"),
    (["--train", "--views", "rgb,xyz"], "--views rgb,xyz"),
])
def test_bad_bench_train_flags_exit_2_in_one_line(argv, message, capsys):
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
