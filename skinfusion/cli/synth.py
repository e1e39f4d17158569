"""Write a small SYNTHETIC dermoscopy-like dataset, for offline demos and tests.

``skinfusion synth`` writes labels.csv, metadata.csv, images/ and a README.txt that says the
images are not real dermoscopy. A folder that already holds a dataset is left as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from skinfusion.cli.common import (
    EXIT_OK,
    add_quiet,
    at_least,
    check_output_dir,
    new_parser,
    positive_int,
    run_command,
)
from skinfusion.data.synthetic import MIN_SIZE, make_synthetic_dataset


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion synth`` parser."""
    p = new_parser("synth", __doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write labels.csv, metadata.csv, images/ and README.txt")
    p.add_argument("--n-images", type=positive_int, default=600, metavar="N", help="about how many images (default 600)")
    p.add_argument("--size", type=at_least(MIN_SIZE, "the smallest input a branch takes"), default=96, metavar="N",
                   help=f"image side in pixels, at least {MIN_SIZE} (default 96)")
    p.add_argument("--melanoma-fraction", type=float, default=0.2, metavar="X",
                   help="share of melanoma lesions, strictly between 0 and 1 (default 0.2)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="generator seed (default 0)")
    p.add_argument("--atypical-rate", type=float, default=0.12, metavar="X",
                   help="share of lesions drawn with the other class's look, so the task is not trivial, "
                        "from 0 to 1 (default 0.12)")
    add_quiet(p)
    return p


def _synth(args: argparse.Namespace) -> int:
    # Both classes must occur, or the dataset cannot be split or scored.
    if not 0.0 < args.melanoma_fraction < 1.0:
        raise ValueError(f"--melanoma-fraction must be strictly between 0 and 1, got {args.melanoma_fraction}")
    if not 0.0 <= args.atypical_rate <= 1.0:
        raise ValueError(f"--atypical-rate must be from 0 to 1, got {args.atypical_rate}")
    check_output_dir("--out", args.out)
    if Path(args.out, "labels.csv").is_file():
        print(f"{args.out} already holds a dataset; leaving it as it is")
        return EXIT_OK
    out = make_synthetic_dataset(args.out, args.n_images, args.melanoma_fraction, args.size, args.seed, args.atypical_rate)
    print(f"wrote SYNTHETIC dataset to {out} (not real dermoscopy; see its README.txt)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion synth``: write the synthetic demo dataset.

    Returns:
        0, or 2 on a reported error.
    """
    return run_command(parser(), _synth, argv)
