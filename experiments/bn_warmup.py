"""Very short trainings and BatchNorm's moving statistics: each epoch's validation AUC of a toy
branch, with and without the re-estimation of the first ``BN_WARMUP_STEPS`` steps, per block order.

    python -m experiments.bn_warmup [--seeds 3]

The task is the bf16 test's: 48 synthetic images (bright = melanoma, 16 px, batch 8, 2 epochs:
12 optimizer steps), scored on the images it trained on, so any AUC below 1 is the statistics', not
the task's. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from experiments.common import run_experiment
from skinfusion.cli.common import positive_int


def toy_task(seed: int, n: int = 48, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: half bright (melanoma), half dark, with uniform noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    x = np.where(y[:, None, None, None] == 1, 200, 40).astype(np.uint8)
    return x + rng.integers(0, 30, (n, size, size, 3)).astype(np.uint8), y


def _epoch_aucs(order: str, seed: int, warmup: bool) -> list[float]:
    import models.ema as ema
    from models import BranchConfig
    from models.train import fit_branch

    saved = ema.BN_WARMUP_STEPS
    ema.BN_WARMUP_STEPS = saved if warmup else 0
    try:
        x, y = toy_task(seed)
        config = BranchConfig(view="rgb", image_size=16, base_filters=4, batch_size=8, epochs=2, patience=2,
                              block_order=order, seed=seed)
        _, history = fit_branch(config, x, y, x, y)
    finally:
        ema.BN_WARMUP_STEPS = saved
    return history["per_epoch"]["val_auc"]


def main(argv: Sequence[str] | None = None) -> int:
    """Print one Markdown row per block order and seed: epoch AUCs without and with the re-estimation."""
    parser = argparse.ArgumentParser(prog="python -m experiments.bn_warmup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=positive_int, default=3, help="training seeds 0 .. N-1 (default 3)")
    args = parser.parse_args(argv)

    def job(args: argparse.Namespace) -> int:
        from models.config import BLOCK_ORDERS

        print("| block order | seed | epoch AUCs, no re-estimation | with it (the default) |")
        print("|---|---|---|---|")
        for order in BLOCK_ORDERS:
            for seed in range(args.seeds):
                rows = [", ".join(f"{a:.2f}" for a in _epoch_aucs(order, seed, w)) for w in (False, True)]
                print(f"| {order} | {seed} | {rows[0]} | {rows[1]} |", flush=True)
        return 0

    return run_experiment(job, args, parser)


if __name__ == "__main__":
    sys.exit(main())
