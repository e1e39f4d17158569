"""Fused melanoma probability and out-of-distribution verdict per image, as a CSV, for files, folders or lists.

Next to ``path,melanoma_proba`` each row says whether the image looks like the dermoscopic images
the run was trained on: ``in_distribution_score`` (1 = most typical), ``out_of_distribution``
(1/0) and ``ood_reason`` (see ``skinfusion.workflows.predicting.write_predictions``).

``skinfusion predict`` streams: images are decoded, scored and written in batches, so folders of
any size fit in memory. The work is ``skinfusion.workflows.predicting``; this module is its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Sequence

from colorspaces.files import check_output_file
from colorspaces.image import IMAGE_SUFFIXES
from ensemble import load
from ensemble.formats import EXPORT_FORMATS, formats_help
from ensemble.rundir import MANIFEST_FILE
from models.quiet import import_tensorflow_quietly
from skinfusion.cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    Progress,
    add_quiet,
    new_parser,
    positive_int,
    reading,
    run_command,
)
from skinfusion.workflows.predicting import (
    input_paths,
    no_images_message,
    predict_to_csv,
    predict_to_parquet,
    read_metadata_csv,
    skip_report_path,
    write_predictions,
)
from skinfusion.workflows.ray_scoring import INSTALL_HINT, RayEngine, is_uri, remote_input_paths, require_ray


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion predict`` parser."""
    p = new_parser("predict", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--input", metavar="DIR_OR_LIST",
                   help=f"a folder (searched recursively for {'/'.join(IMAGE_SUFFIXES)} files, in sorted order) "
                        "or a text file listing one image path per line (relative paths are relative to that file)")
    p.add_argument("--out", metavar="CSV_OR_PARQUET",
                   help="write the CSV (path, melanoma_proba, in_distribution_score, out_of_distribution, "
                        "ood_reason) here instead of stdout (through a temporary file beside it, renamed when "
                        "complete); skipped files go to CSV.skipped.csv. A name ending in .parquet writes "
                        "Parquet instead: the same columns, numbers at full precision (needs pyarrow)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="image decoding threads, overlapped with inference (default 2)")
    p.add_argument("--tta", action="store_true", help="average each image over its 8 rotations and flips (8x the compute)")
    p.add_argument("--metadata", metavar="CSV",
                   help="for an ensemble fused with metadata (fuse --metadata): a CSV with an image_id column (the "
                        "file name without extension) or a path column, and the fused fields (age, sex, site); "
                        "empty cells and images it does not list are scored with those fields unknown")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: score on this machine (default); ray: score on a Ray cluster with Ray Data "
                        f"({INSTALL_HINT}); every node must see --run and the images at the same paths, or give "
                        "s3://, gs://, hdfs:// URIs (docs/cluster.md)")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="--engine ray: the Ray cluster to use (default: $RAY_ADDRESS if set, else a Ray instance "
                        "started on this machine for the run)")
    p.add_argument("--num-workers", type=positive_int, metavar="N",
                   help="--engine ray: scoring actors, each loads the bundle once and takes one CPU "
                        "(default: one per CPU of the cluster)")
    p.add_argument("--backend", choices=("keras", *EXPORT_FORMATS), default=None,
                   help=f"keras: a run's bundle through TensorFlow; {formats_help()}: an export written by "
                        "`skinfusion export` (no TensorFlow). Default: what --run holds")
    add_quiet(p)
    return p


def _predict(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        require_ray()  # before the images are listed and the bundle loaded
    elif args.address or args.num_workers:
        raise ValueError(f"{'--address' if args.address else '--num-workers'} applies to --engine ray only; "
                         "add --engine ray or drop it")
    folders = [p for p in args.images if os.path.isdir(p)]
    if folders:
        raise ValueError(f"{folders[0]} is a directory; score a folder with --input {folders[0]}")
    with reading("--input", args.input or ""):
        paths = list(args.images) + (_listed(args.input, args.engine) if args.input else [])
    remote = next((p for p in paths if is_uri(p)), None)
    if remote and args.engine == "local":
        raise ValueError(f"{remote}: a URI; the local engine reads files on this machine only; score URIs "
                         "with --engine ray (pyarrow.fs reads s3://, gs://, hdfs://) or copy the files here")
    if not paths:
        raise ValueError("no images given: pass image files and/or --input DIR_OR_LIST")
    if args.out:
        check_output_file("--out", args.out)  # before the minutes of loading and scoring, not after
        check_out_suffix(args.out)
    ens = _load_backend(args.run, args.backend)
    metadata = None
    if ens.metadata_fields:
        if not args.metadata:
            raise ValueError(f"{args.run}: this ensemble fuses metadata ({', '.join(ens.metadata_fields)}); pass "
                             "--metadata CSV with image_id (or path) and those columns")
        with reading("--metadata", args.metadata):
            metadata = read_metadata_csv(args.metadata, paths, ens.metadata_fields, sites=ens.known_sites)
    elif args.metadata:
        print(f"skinfusion: {args.run} was fused without metadata; --metadata {args.metadata} is ignored", file=sys.stderr)
    progress = Progress(len(paths), enabled=not args.quiet and (bool(args.out) or len(paths) > args.batch_size))
    options = dict(batch_size=args.batch_size, workers=args.workers, tta=args.tta, metadata=metadata,
                   on_batch=progress.update)
    with (RayEngine(ens, args.run, args.address, args.num_workers) if args.engine == "ray"
          else contextlib.nullcontext(ens)) as scorer:
        if not args.out:
            skipped = write_predictions(scorer, paths, sys.stdout, **options)
            return EXIT_SKIPPED if skipped else EXIT_OK
        to_file = predict_to_parquet if Path(args.out).suffix.lower() == ".parquet" else predict_to_csv
        skipped = to_file(scorer, paths, args.out, **options)
    report = f" (listed in {skip_report_path(args.out)})" if skipped else ""
    print(f"scored {len(paths) - len(skipped)} images -> {args.out}; {len(skipped)} skipped{report}", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def _load_backend(run: str, backend: str | None):
    """The bundle in ``run``, refused when it is not of the ``--backend`` asked for (before anything loads)."""
    from ensemble.runtime import is_export_dir

    if is_export_dir(run):
        from ensemble.runtime import read_export_manifest

        held = read_export_manifest(Path(run) / MANIFEST_FILE)["format"]
        if backend not in (None, held):
            raise ValueError(f"--run {run} holds an export in {held} format; use --backend {held}, or give the "
                             "run it was exported from for --backend keras")
    elif backend not in (None, "keras"):
        raise ValueError(f"--backend {backend} scores an export: write one with `skinfusion export --run {run} "
                         f"--format {backend} --out DIR` and pass --run DIR")
    else:
        import_tensorflow_quietly()  # a run's bundle is scored by Keras (an export's never loads TensorFlow)
    return load(run)


# What --out may be called: the suffix says the format, and a name that says another one
# (p.json, p.xlsx) is refused rather than silently given CSV. Dot-less names (/dev/stdout, a fifo) are CSV.
OUT_SUFFIXES = (".csv", ".txt", "", ".parquet")


def check_out_suffix(out: str) -> None:
    """Refuse an ``--out`` whose suffix names a format predict does not write (``.json``, ``.xlsx``...).

    Raises:
        ValueError: naming ``--out`` and the suffixes it takes.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: predict writes CSV (.csv, .txt or no suffix) or Parquet (.parquet), not "
                         f"{suffix}; rename the file")


def _listed(spec: str, engine: str) -> list[str]:
    """The images ``--input`` names; a URI (``s3://bucket/folder``) is listed through pyarrow for Ray."""
    if is_uri(spec):
        if engine != "ray":
            raise ValueError(f"--input {spec}: a URI; list and score it with --engine ray, or copy the files here")
        found = remote_input_paths(spec)
    else:
        found = input_paths(spec)
    if not found:
        raise ValueError(no_images_message(spec))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion predict``: write path, melanoma_proba and OOD columns to stdout or ``--out``.

    Returns:
        0, or 1 if any image was unreadable, 2 on a reported error, 130 after Ctrl-C.
    """
    # The output is data (stdout): keep the log to warnings, whatever -q says.
    return run_command(parser(), _predict, argv, quiet=True, interrupted_hint=_interrupted_message)


def _interrupted_message(args: argparse.Namespace) -> str:
    # --out is written through a temporary file that is removed on the way out: nothing half-written.
    if args.out:
        return f"interrupted; {args.out} was not written (rerun the command to score the images)"
    return "interrupted; the CSV written to stdout so far is incomplete"
