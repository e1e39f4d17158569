"""Check that no lesion group or near-duplicate pair crosses a run's train/val/test split.

``skinfusion verify-split`` exits 0 if the split is leakage-free and 1 if anything crosses.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from skinfusion.cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    add_quiet,
    data_help,
    new_parser,
    reading,
    run_command,
)
from skinfusion.data.dedup import find_near_duplicates, read_near_duplicate_pairs
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, verify_split


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion verify-split`` parser."""
    p = new_parser("verify-split", __doc__)
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with splits.csv")
    p.add_argument("--data", metavar="DIR", help=data_help("dataset folder (default: the one recorded in RUN/split.json)"))
    p.add_argument("--pairs", help="CSV of known near-duplicate pairs (image_id_a,image_id_b), checked as well")
    p.add_argument("--max-distance", type=int, default=18,
                   help="perceptual-hash (phash) distance for near-duplicates (default 18)")
    p.add_argument("--no-hash", dest="hash", action="store_false", help="skip the perceptual-hash near-duplicate search")
    add_quiet(p)
    return p


def _verify_split(args: argparse.Namespace) -> int:
    assign, info = load_split(args.run)
    data = args.data or info.get("data_dir")
    if not data:
        raise ValueError(f"{args.run}: split.json names no data folder; pass --data")
    records = [r for r in index_dataset(data).records if r.image_id in assign]
    with reading("--pairs", args.pairs or ""):
        pairs = list(read_near_duplicate_pairs(args.pairs)) if args.pairs else []
    if args.hash:
        found = find_near_duplicates([r.path for r in records], max_distance=args.max_distance)
        pairs += [(records[i].image_id, records[j].image_id) for i, j, _ in found]
        print(f"perceptual hash: {len(found)} near-duplicate pairs within distance {args.max_distance}")
    problems = verify_split(records, assign, pairs)
    for line in problems:
        print(line)
    print(f"{len(records)} images, {len({r.group_id for r in records})} groups, {len(pairs)} near-duplicate pairs checked: "
          + ("OK, nothing crosses train/val/test" if not problems else f"{len(problems)} problems"))
    return EXIT_OK if not problems else EXIT_SKIPPED


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion verify-split``: check a run's saved split.

    Returns:
        0 if the split is leakage-free, 1 if anything crosses, 2 on a reported error.
    """
    return run_command(parser(), _verify_split, argv)
