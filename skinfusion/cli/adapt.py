"""Adapt a run's ensemble to a clinic's unlabelled images and write it as a new run.

``skinfusion adapt`` reads no labels. By default (``--method prior``) it estimates the clinic's
melanoma prevalence and recalibrates the fused probability and threshold to it, which cannot
change AUC; ``bn-balanced`` and ``tent`` also adapt the branches' BatchNorm layers. The work is
``skinfusion.workflows.adapting``; this module is its flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from skinfusion.cli.common import (
    add_quiet,
    exit_for_skipped,
    learning_rate,
    new_parser,
    positive_int,
    refuse_export_dir,
    run_command,
)
from skinfusion.workflows.adaptation import (
    DEFAULT_METHODS,
    METHODS,
    MIN_IMAGES,
    AdaptOptions,
    parse_methods,
)

_METHOD_HELP = {
    "prior": "estimate the clinic's melanoma prevalence (EM on the fused probabilities) and shift the fused "
             "log-odds and the threshold by the prior change: recalibrates, keeps the operating point and AUC",
    "bn-balanced": "re-estimate every branch's BatchNorm statistics on the images, each weighted so the classes "
                   "count 50/50 as in training",
    "bn": "plain AdaBN: re-estimate BatchNorm statistics unweighted (lowered AUC on held-out clinics; for "
          "comparison)",
    "tent": "a few steps of entropy minimisation of the BatchNorm scale and offset, class-balanced",
}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion adapt`` parser."""
    p = new_parser("adapt", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="the trained and fused source run (left unchanged)")
    p.add_argument("--images", required=True, metavar="DIR_OR_LIST",
                   help=f"the clinic's unlabelled images: a folder (searched recursively) or a text file listing one "
                        f"path per line; at least {MIN_IMAGES} readable images (unreadable ones are skipped and listed)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the new run to write (adapted branches, signed ensemble, the source run's split, "
                        "adaptation.json); must differ from --run")
    methods = "; ".join(f"{m}: {_METHOD_HELP[m]}" for m in METHODS)
    p.add_argument("--method", default=",".join(DEFAULT_METHODS), metavar="LIST",
                   help=f"comma-separated, applied in the order {', '.join(METHODS)}: {methods} "
                        f"(default {','.join(DEFAULT_METHODS)})".replace("%", "%%"))
    p.add_argument("--bn-alpha", type=_fraction, default=1.0, metavar="A",
                   help="bn and bn-balanced: the share of the clinic's statistics in the new BatchNorm statistics, "
                        "mixed with the source's (default 1: the clinic's only)")
    p.add_argument("--tent-steps", type=positive_int, default=30, metavar="N", help="tent: optimisation steps (default 30)")
    p.add_argument("--tent-lr", type=learning_rate, default=5e-4, metavar="LR", help="tent: Adam learning rate (default 5e-4)")
    p.add_argument("--tent-batch", type=positive_int, default=64, metavar="N", help="tent: images per step (default 64)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="tent: seed of the batch order (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="image decoding threads (default 2)")
    p.add_argument("--force", action="store_true",
                   help="replace --out when it holds a run written by skinfusion adapt (never any other folder)")
    add_quiet(p)
    return p


def _adapt(args: argparse.Namespace) -> int:
    refuse_export_dir(args.run, "adapt")
    from skinfusion.workflows.adapting import SKIPPED_FILE, adapt_run  # TensorFlow: not for --help

    options = AdaptOptions(methods=parse_methods(args.method), bn_alpha=args.bn_alpha, tent_steps=args.tent_steps,
                           tent_lr=args.tent_lr, tent_batch=args.tent_batch, seed=args.seed,
                           batch_size=args.batch_size)
    record = adapt_run(args.run, args.images, args.out, options, force=args.force, workers=args.workers)
    prev, thr, exp = record["prevalence"], record["threshold"], record["expected"]
    lo, hi = prev["ci95"]
    print(f"adapted run written to {args.out} ({', '.join(record['methods'])}) from {record['images']['n_used']} "
          f"images; summary in {Path(args.out) / 'adaptation.json'}")
    print(f"estimated melanoma prevalence {prev['estimated']:.1%} (95% CI {lo:.1%}-{hi:.1%}); the source ensemble's "
          f"probabilities assumed {prev['source_calibrated_to']:.1%}")
    if record["logit_offset"]:
        print(f"fused probabilities shifted by {record['logit_offset']:+.3f} in log-odds; threshold "
              f"{thr['source']:.4f} -> {thr['adapted']:.4f} (the same operating point)")
    for change in record.get("changed", []):
        print(f"changed: {change}")
    print(f"expected: {exp['flagged_adapted']:.1%} of these images flagged as melanoma (source ensemble: "
          f"{exp['flagged_source']:.1%}); check it with `skinfusion evaluate` on labelled images of the clinic")
    return exit_for_skipped(record["images"]["n_skipped"], str(Path(args.out) / SKIPPED_FILE))


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion adapt``: write the adapted run ``--out``.

    Returns:
        0, or 1 if any image was unreadable (skipped and listed), 2 on a reported error, 130 after Ctrl-C.
    """
    return run_command(parser(), _adapt, argv, interrupted_hint=_interrupted_message)


def _interrupted_message(args: argparse.Namespace) -> str:
    # The run is built in a hidden folder beside --out and moved into place only when complete.
    return f"interrupted; {args.out} was not written (rerun the command)"
