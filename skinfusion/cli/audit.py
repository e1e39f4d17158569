"""Artefact and bias audit: colour discs, ink, size/source mix per class, near-duplicates.

``skinfusion audit`` writes one CSV row per image plus a summary JSON beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from skinfusion.cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    add_quiet,
    data_help,
    new_parser,
    positive_int,
    run_command,
)
from skinfusion.workflows.auditing import audit_dataset


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion audit`` parser."""
    p = new_parser("audit", __doc__)
    p.add_argument("--data", required=True, metavar="DIR", help=data_help())
    p.add_argument("--out", metavar="CSV",
                   help="audit CSV to write (default runs/audit-<folder>.csv); a .summary.json is written beside it")
    p.add_argument("--max-distance", type=int, default=18, help="perceptual-hash distance for near-duplicates (default 18)")
    p.add_argument("--no-hash", dest="hash", action="store_false", help="skip the near-duplicate search")
    p.add_argument("--workers", type=positive_int, default=2, help="threads (default 2)")
    add_quiet(p)
    return p


def _audit(args: argparse.Namespace) -> int:
    out = args.out or f"runs/audit-{Path(args.data).resolve().name}.csv"
    s = audit_dataset(args.data, out, workers=args.workers, hash_pairs=args.hash, max_distance=args.max_distance)
    print(f"{s['data_dir']} ({s['format']}): {s['n_images']} images, {s['n_unreadable']} unreadable, "
          f"{len(s['missing_files'])} missing, {s['near_duplicate_pairs']} near-duplicate pairs")
    if s["skipped_labels"]:
        print("other labels (not used): " + ", ".join(f"{k}={v}" for k, v in sorted(s["skipped_labels"].items())))
    print(f"\n{'class':10} {'n':>6} {'colour disc':>14} {'ink':>14}  top sizes / sources")
    for cls, c in s["per_class"].items():
        def rate(a):
            return f"{c[a]['count']} ({100 * (c[a]['rate'] or 0):.1f}%)"
        sizes = ", ".join(f"{k}:{v}" for k, v in sorted(c["sizes"].items(), key=lambda kv: -kv[1])[:3])
        sources = ", ".join(f"{k}:{v}" for k, v in sorted(c["sources"].items(), key=lambda kv: -kv[1])[:4])
        print(f"{cls:10} {c['n']:6d} {rate('colour_disc'):>14} {rate('ink'):>14}  {sizes} | {sources}")
    print(f"\nwrote {out} and {Path(out).with_suffix('.summary.json')}")
    return EXIT_SKIPPED if s["n_unreadable"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion audit``: write the audit CSV and summary.

    Returns:
        0, or 1 if any image was unreadable, 2 on a reported error.
    """
    return run_command(parser(), _audit, argv)
