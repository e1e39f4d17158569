"""Grad-CAM heat maps of every branch for images, as an overlay PNG per branch and a panel PNG per image.

For each image, ``--out`` gets ``NAME.VIEW.png`` per branch (the heat map of the branch's last
convolution for its melanoma logit, over the photo; for fft over the spectrum, whose centre is
the low frequencies) and ``NAME.panel.png`` (the image, its views, the heat maps and the
per-branch and fused probabilities with the threshold). NAME is the image's file stem, made
longer only where two images would collide. The probabilities are those ``predict`` gives (no
TTA). The work is ``skinfusion.workflows.explaining``; this module is its flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ensemble import load
from skinfusion.cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    add_quiet,
    check_output_dir,
    new_parser,
    reading,
    refuse_export_dir,
    run_command,
)
from skinfusion.workflows.predicting import input_paths, no_images_message, read_metadata_csv


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion explain`` parser."""
    p = new_parser("explain", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--input", metavar="DIR_OR_LIST",
                   help="a folder (searched recursively for image files) or a text file listing one image path "
                        "per line, as for predict")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (made if missing)")
    p.add_argument("--metadata", metavar="CSV",
                   help="for an ensemble fused with metadata: the CSV predict --metadata takes (images it does "
                        "not list are explained with those fields unknown)")
    add_quiet(p)
    return p


def _explain(args: argparse.Namespace) -> int:
    refuse_export_dir(args.run, "explain")
    folders = [p for p in args.images if os.path.isdir(p)]
    if folders:
        raise ValueError(f"{folders[0]} is a directory; explain a folder with --input {folders[0]}")
    with reading("--input", args.input or ""):
        listed = input_paths(args.input) if args.input else []
    if args.input and not listed:
        raise ValueError(no_images_message(args.input))
    paths = list(args.images) + listed
    if not paths:
        raise ValueError("no images given: pass image files and/or --input DIR_OR_LIST")
    out = check_output_dir("--out", args.out)  # before loading the ensemble, not after
    ens = load(args.run)
    metadata = None
    if ens.metadata_fields:
        if not args.metadata:
            raise ValueError(f"{args.run}: this ensemble fuses metadata ({', '.join(ens.metadata_fields)}); pass "
                             "--metadata CSV with image_id (or path) and those columns")
        with reading("--metadata", args.metadata):
            metadata = read_metadata_csv(args.metadata, paths, ens.metadata_fields, sites=ens.known_sites)
    elif args.metadata:
        print(f"skinfusion: {args.run} was fused without metadata; --metadata {args.metadata} is ignored",
              file=sys.stderr)

    def report(path: str, files) -> None:
        if not args.quiet:
            print(f"{path} -> {files[-1]}", file=sys.stderr)

    # Each skipped image is logged as a warning naming it and why, as predict does.
    from skinfusion.workflows.explaining import explain_files  # TensorFlow: not for --help

    written, skipped = explain_files(ens, paths, out, metadata=metadata, on_image=report)
    print(f"explained {len(written)} images -> {out}; {len(skipped)} skipped", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion explain``: write Grad-CAM overlays and a panel per image into ``--out``.

    Returns:
        0, or 1 if any image was unreadable (it is skipped and named), 2 on a reported error,
        130 after Ctrl-C.
    """
    return run_command(parser(), _explain, argv,
                       interrupted_hint="the PNGs written so far are complete; rerun the command for the rest")
