"""Score the test split (or the validation split, or another folder): AUC with 95% CI, sensitivity, specificity.

``skinfusion evaluate`` writes metrics.json, predictions.csv and subgroups.csv (and risk_coverage.csv
when the bundle scores how typical each image is) and prints the results tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skinfusion.cli.common import (
    MIN_BOOTSTRAP,
    add_quiet,
    bootstrap_resamples,
    data_help,
    exit_for_skipped,
    new_parser,
    positive_int,
    refuse_export_dir,
    run_command,
)
from skinfusion.workflows.tables import (
    format_dx_type_table,
    format_risk_coverage_table,
    format_source_table,
    format_subgroup_table,
    format_table,
)


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion evaluate`` parser."""
    p = new_parser("evaluate", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble")
    p.add_argument("--data", metavar="DIR", help=data_help("score every image of this labelled folder instead of the test split"))
    p.add_argument("--split", choices=["test", "val"],
                   help="which of the run's splits to score (default test); val writes RUN/eval-val/ and serves to "
                        "compare runs per source on the images that chose their epochs and thresholds, never to "
                        "report a result")
    p.add_argument("--data-root", metavar="DIR",
                   help="where the run's dataset is now, if it moved since the run was split (default: the folder "
                        "RUN/split.json records); it must hold the same images, or evaluate refuses")
    p.add_argument("--out", metavar="DIR",
                   help="where to write metrics.json and predictions.csv (default RUN, or RUN/eval-<folder> with --data)")
    p.add_argument("--audit", metavar="FILE",
                   help="audit CSV whose artefact flags define the subsets (default: detect on the scored images)")
    p.add_argument("--no-audit", dest="run_audit", action="store_false", help="skip the per-artefact-subset AUCs")
    p.add_argument("--isic-csv", metavar="FILE",
                   help="also write the fused predictions in ISIC challenge format (image,MEL,NV)")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the ROC/PR/reliability/risk-coverage PNGs and report.html")
    p.add_argument("--bootstrap", type=bootstrap_resamples, default=1000, metavar="N",
                   help=f"bootstrap resamples for the AUC 95%% CI, at least {MIN_BOOTSTRAP} (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads (default 2)")
    p.add_argument("--tta", action="store_true",
                   help="test-time averaging: score each image under its 8 rotations and flips and average (8x the compute)")
    add_quiet(p)
    return p


def _evaluate(args: argparse.Namespace) -> int:
    refuse_export_dir(args.run, "evaluate")
    from skinfusion.workflows.evaluation import EvaluateOptions, evaluate  # TensorFlow: not for --help

    options = EvaluateOptions(n_boot=args.bootstrap, workers=args.workers, batch_size=args.batch_size, tta=args.tta,
                              audit=args.run_audit, audit_csv=args.audit, isic_csv=args.isic_csv, plots=args.plots)
    if args.split and args.data:
        raise ValueError(f"--split {args.split} scores the run's own split; --data {args.data} scores a folder: "
                         "give one of them")
    m = evaluate(args.run, args.data, args.out, options, data_root=args.data_root, split=args.split or "test")
    print(f"{m['scope']}: {m['n_images']} images, {m['fused']['n_melanoma']} melanoma; {m['method']} fusion"
          + (" with test-time averaging over 8 rotations/flips" if args.tta else ""))
    print(format_table({**m["members"], "fused": m["fused"]}))
    print("\nAUC per source:")
    print(format_source_table(m["per_source"], list(m["members"])))
    if m["per_dx_type"]:
        print("\nAUC per diagnosis confirmation (dx_type; sens/spec = fused, at the validation threshold):")
        print(format_dx_type_table(m["per_dx_type"], list(m["members"])))
    if m["per_subset"]:
        print("\nAUC per artefact subset (a shortcut shows up as a gap; spec = fused specificity on its nevi):")
        print(format_source_table(m["per_subset"], list(m["members"]), header="subset"))
        print("  " + ", ".join(f"{k}: spec {v['fused_specificity']:.3f}" for k, v in m["per_subset"].items() if v["n"]))
    print(f"\nFused AUC per subgroup (not scored with fewer than {m['subgroups']['min_per_class']} melanomas or nevi):")
    print(format_subgroup_table(m["subgroups"]))
    rc = m["risk_coverage"]
    if rc:
        print(f"\nRisk-coverage: images accepted most typical first (in-distribution score) or most confident first "
              f"(|p - {rc['threshold']:.3f}|); error = {rc['risk']}"
              + ("; gate_verdict: the images the bundle's out-of-distribution gate passed" if rc.get("gate") else ""))
        print(format_risk_coverage_table(rc))
    written = ["metrics.json", "predictions.csv", "subgroups.csv"] + (["risk_coverage.csv"] if rc else [])
    print(f"\nwrote {m['out_dir']}/" + ", ".join(written) + (", report.html and curve PNGs" if args.plots else ""))
    if args.isic_csv:
        print(f"wrote ISIC challenge CSV {args.isic_csv}")
    return exit_for_skipped(m["n_skipped"], f"{m['out_dir']}/skipped.csv")


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion evaluate``: score the run and write its results.

    Returns:
        0, or 1 if unreadable images were skipped, 2 on a reported error, 130 after Ctrl-C.
    """
    return run_command(parser(), _evaluate, argv)
