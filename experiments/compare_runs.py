"""Compare in-source runs image by image: per source family, each run's fused AUC and its paired
bootstrap difference from the first run (the reference).

    skinfusion evaluate --run runs/a --split val      # and --run runs/b ...; also the test split
    python -m experiments.compare_runs runs/a runs/b [--split val|test] [--boot 1000] [--out FILE.md]

Each run is a fused run of the same split (``skinfusion train`` + ``fuse``) that ``skinfusion
evaluate`` has scored: ``RUN/predictions.csv`` for the test split, ``RUN/eval-val/predictions.csv``
for ``evaluate --split val``. The rows are the pooled images and each source family (the train and
validation parts of a challenge are one family, ``ISIC2017``, each part also shown); the fused column is what the run's
bundle gives a user. A configuration is chosen on ``--split val`` (the images that also chose each
branch's epochs: fine for comparing, optimistic as a result) and reported on the test split.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import paired_rows, run_experiment
from skinfusion.cli.common import positive_int
from skinfusion.data.index import source_family

PREDICTIONS = {"test": "predictions.csv", "val": "eval-val/predictions.csv"}


def _load(run: Path, split: str) -> dict[str, tuple[int, str, float]]:
    """image id -> (label, source, fused probability) of ``evaluate``'s predictions for ``split``."""
    path = run / PREDICTIONS[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; score the run first with `skinfusion evaluate --run {run}"
                                + (" --split val`" if split == "val" else "`"))
    try:
        with open(path, newline="") as fh:
            rows = {r["image_id"]: (int(r["label"]), r["source"], float(r["fused"])) for r in csv.DictReader(fh)}
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: damaged ({exc.__class__.__name__}: {exc}); score the run again with "
                         "`skinfusion evaluate`") from None
    if not rows:
        raise ValueError(f"{path}: holds no scored image; score the run again with `skinfusion evaluate`")
    return rows


def compare(runs: Sequence[str | Path], split: str = "val", n_boot: int = 1000) -> str:
    """A Markdown table of the runs' fused AUCs on ``split``, pooled and per source family, with the
    paired difference from ``runs[0]``.

    Raises:
        FileNotFoundError: if a run has not been scored on ``split``.
        ValueError: if the runs scored different images or labels (another split), or a file is damaged.
    """
    loaded = [_load(Path(r), split) for r in runs]
    ref = loaded[0]
    for run, rows in zip(runs[1:], loaded[1:]):
        if {i: v[0] for i, v in rows.items()} != {i: v[0] for i, v in ref.items()}:
            raise ValueError(f"{Path(run) / PREDICTIONS[split]}: other images or labels than "
                             f"{Path(runs[0]) / PREDICTIONS[split]}; compare runs of one split")
    ids = sorted(ref)
    groups: dict[str, list[str]] = {"all": ids}
    for family in sorted({source_family(ref[i][1]) for i in ids}):
        groups[family] = [i for i in ids if source_family(ref[i][1]) == family]
        parts = sorted({ref[i][1] for i in groups[family]})
        if len(parts) > 1:  # e.g. ISIC2017_train, the part the README's ISIC 2017 proxy is
            groups.update({f"{s} (part of {family})": [i for i in groups[family] if ref[i][1] == s] for s in parts})
    labels = {i: ref[i][0] for i in ids}
    fused = [{i: rows[i][2] for i in ids} for rows in loaded]
    names = [Path(r).name for r in runs]
    return "\n".join([f"| run | images ({split}) | n (mel) | fused AUC (95% CI) | minus the first run (paired 95% CI) |",
                      "|---|---|---|---|---|", *paired_rows(names, labels, fused, groups, n_boot)])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print (and with ``--out`` write) the comparison table."""
    p = argparse.ArgumentParser(prog="python -m experiments.compare_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="fused, evaluated runs of one split; the first is the reference")
    p.add_argument("--split", choices=sorted(PREDICTIONS), default="val",
                   help="compare on the validation split (evaluate --split val; default) or the test split")
    p.add_argument("--boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", metavar="FILE", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give the reference run and at least one more")

    def body(a: argparse.Namespace) -> int:
        from colorspaces.files import atomic_open, check_output_file

        if a.out:
            check_output_file("--out", a.out)  # before minutes of bootstrap, not after
        table = compare(a.runs, a.split, a.boot)
        if a.out:
            with atomic_open(a.out, "w") as fh:
                fh.write(table + "\n")
        print(table)
        return 0

    return run_experiment(body, args, p, tensorflow=False)


if __name__ == "__main__":
    sys.exit(main())
