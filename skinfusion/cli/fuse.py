"""Fit the fusion of a run's branches on their validation probabilities.

``skinfusion fuse`` writes ``RUN/ensemble/`` (manifest.json + fusion.joblib + ood.npz, the
out-of-distribution gate fitted on the run's training images). Fusion methods come
from ``ensemble.fusion.FUSION_METHODS`` and views from ``colorspaces.VIEWS``, read when the
parser is built, so a method or view registered there is a choice here with no change.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from colorspaces import DEFAULT_VIEWS, DESIGN_VIEWS, VIEWS
from ensemble.fusion import FUSION_METHODS
from ensemble.ood import DEFAULT_PERCENTILE
from skinfusion.cli.common import (
    EXIT_OK,
    add_quiet,
    new_parser,
    positive_int,
    refuse_export_dir,
    run_command,
    summary,
)
from skinfusion.workflows.tables import format_table


def parse_views(text: str) -> list[str]:
    """The branches named by ``--views``, in order: comma-separated keys of ``VIEWS``.

    Raises:
        ValueError: if the list is empty, names a view twice, or names one that is not in ``VIEWS``.
    """
    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise ValueError(f"--views takes comma-separated names from {sorted(VIEWS)}, got {text!r}")
    if len(set(views)) != len(views):
        raise ValueError(f"--views names a branch twice: {text!r}")
    return views


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion fuse`` parser."""
    p = new_parser("fuse", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with trained branches")
    methods = "; ".join(f"{name}: {summary(cls.__doc__)}" for name, cls in FUSION_METHODS.items())
    p.add_argument("--method", default="mean", choices=list(FUSION_METHODS),
                   help=f"{methods} (default mean)".replace("%", "%%"))
    p.add_argument("--views", metavar="LIST",
                   help=f"comma-separated branches to fuse, in order, from {', '.join(VIEWS)} (default "
                        f"{','.join(DEFAULT_VIEWS)}; in a run holding only {','.join(DESIGN_VIEWS)} of them, those three)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="stack only: fit the stacker on out-of-fold probabilities of the training split, training "
                        "each branch K more times (in RUN/oof/; resumable) instead of on the validation split "
                        "(default 0: fit on validation)")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="with --folds: parallel training processes per fold (default one per branch)")
    p.add_argument("--metadata", default="", metavar="FIELDS",
                   help="stack only: also give the stacker these per-image metadata fields, comma-separated from "
                        "age, sex, site, read from the run's dataset (metadata.csv, isic-cli or HAM10000 columns); "
                        "unknown values are allowed. Every prediction then takes them (predict --metadata CSV, "
                        "predict(image, metadata={...})). Default: images only")
    p.add_argument("--ood-percentile", type=float, default=DEFAULT_PERCENTILE, metavar="P",
                   help="out-of-distribution gate: flag images whose feature score is above the P-th percentile of "
                        "the validation images' scores, so about P%% of in-distribution images pass (50-100; "
                        f"default {DEFAULT_PERCENTILE:g}). Higher P flags fewer images of other clinics but lets "
                        "more unusual inputs through; 99 still caught every non-dermoscopic image in a probe. "
                        "The gate is fitted on up to 2,000 training images of the run's dataset")
    add_quiet(p)
    return p


def _fuse(args: argparse.Namespace) -> int:
    refuse_export_dir(args.run, "fuse")
    from skinfusion.workflows.fusing import fuse_run  # TensorFlow: not for --help

    views = parse_views(args.views) if args.views else None  # None: fuse_run's default_fuse_views
    result = fuse_run(args.run, args.method, views, folds=args.folds, jobs=args.jobs,
                      metadata=args.metadata, ood_percentile=args.ood_percentile)
    with_meta = f" with metadata {', '.join(result['metadata'])}" if result["metadata"] else ""
    print(f"fusion '{args.method}'{with_meta} written to {result['ensemble_dir']}; threshold {result['threshold']:.4f} "
          "(chosen on validation)")
    fit = result.get("stack_fit", {})
    if fit.get("folds"):
        print(f"stacker fitted on {fit['n_images']} out-of-fold training images ({fit['folds']} folds); validation AUC "
              f"{fit['val_auc_oof_stacker']:.4f} vs {fit['val_auc_val_stacker_cv']:.4f} for a stacker fitted on "
              f"validation (cross-validated)")
    ood = result.get("ood")
    if ood:
        print(f"OOD gate fitted on {ood['n_fit']} training images; threshold {ood['threshold']:.3f}, the "
              f"{ood['percentile']:g}th percentile of {ood['n_val']} validation scores")
    else:
        print("no OOD gate (see the warning): predictions carry only the image-level checks")
    print("validation metrics (not a test result):")
    print(format_table(result["validation"]))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion fuse``: fit the fusion and write ``RUN/ensemble/``.

    Returns:
        0, or 2 on a reported error (130 after Ctrl-C).
    """
    return run_command(parser(), _fuse, argv, interrupted_hint=_interrupted_message)


def _interrupted_message(args: argparse.Namespace) -> str:
    # The ensemble is written atomically at the end: an interrupted fuse leaves the previous one.
    if args.folds:
        return (f"interrupted; {args.run}/ensemble was not written. Rerun the same command: the fold branches "
                f"already trained in {args.run}/oof/ are reused, and an interrupted one resumes")
    return f"interrupted; {args.run}/ensemble was not written (rerun the command)"
