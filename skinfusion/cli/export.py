"""Export a fused run as a pickle-free ONNX or TFLite bundle that predicts without TensorFlow.

``skinfusion export --run RUN --format onnx --out DIR`` writes ``DIR/model.onnx`` (the branches in
one graph), ``fusion.json``, ``preprocess.json``, the OOD gate's ``ood.npz`` and a
``manifest.json`` with every file's SHA-256. ``skinfusion predict --run DIR`` and
``predict(image, run=DIR)`` then score with onnxruntime or LiteRT. The work is
``skinfusion.workflows.exporting`` and ``ensemble.export``; this module is its flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from ensemble.export import DEFAULT_CALIBRATION, FLOAT_TOLERANCE
from ensemble.formats import DEFAULT_FORMAT, EXPORT_FORMATS, formats_help
from skinfusion.cli.common import (
    EXIT_OK,
    add_quiet,
    new_parser,
    non_negative_int,
    positive_int,
    refuse_export_dir,
    run_command,
)

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion export`` parser."""
    p = new_parser("export", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble")
    p.add_argument("--format", default=DEFAULT_FORMAT, choices=sorted(EXPORT_FORMATS),
                   help=f"{formats_help()} (default {DEFAULT_FORMAT})")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: post-training static quantisation calibrated on the run's training images "
                        f"(default: float32, checked against Keras to {FLOAT_TOLERANCE:g})")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="export directory: new, empty, or a previous export (rewritten)")
    p.add_argument("--calibration-images", type=positive_int, default=None, metavar="N",
                   help="--quantize int8: training images (a seeded subsample) to calibrate on "
                        f"(default {DEFAULT_CALIBRATION})")
    p.add_argument("--check-test", type=non_negative_int, default=0, metavar="N",
                   help="score N test-split images with the Keras bundle and the export and print both AUCs "
                        "(recorded in the manifest; default 0: skip)")
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads (default 2)")
    add_quiet(p)
    return p


def _export(args: argparse.Namespace) -> int:
    refuse_export_dir(args.run, "export")
    from skinfusion.workflows.exporting import export_run

    m = export_run(args.run, args.out, args.format, args.quantize, args.calibration_images, args.check_test,
                   args.workers)
    kind = f"{args.format}{'-' + args.quantize if args.quantize else ''}"
    parity = m["parity"]
    print(f"exported {args.run} -> {args.out} ({kind}); max |probability difference| vs Keras on "
          f"{parity['probe_images']} probe images: {parity['max_abs_fused_proba']:.2g}", file=sys.stderr)
    if "test_check" in m:
        print("test split: " + json.dumps(m["test_check"]), file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion export``: write the export bundle.

    Returns:
        0, 2 on a reported error, 130 after Ctrl-C.
    """
    return run_command(parser(), _export, argv,
                       interrupted_hint=lambda args: f"interrupted; {args.out} was not changed (the export is built "
                                                     "beside it and moved in only when complete)")
