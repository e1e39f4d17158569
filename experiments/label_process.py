"""Validation AUC of trained branches per source family and per dx_type, side by side (issue 27, the
nevus label process): how ``--follow-up-weight`` and ``--select-on`` move each part of validation.

    python -m experiments.label_process --data DIR --view rgb RUN_A RUN_B ...

Each RUN is a run directory whose ``branches/<view>/`` was trained on the same split (the table
checks that the validation images agree). It reads ``val_predictions.csv`` (every validation
image, whatever ``--select-on`` chose the epoch on) and prints one Markdown row per run: the AUC
with its 95% bootstrap CI on all validation images, on each source family, and on each dx_type
that has both classes, plus the epoch kept and the images that selected it.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ensemble.metrics import roc_auc_ci
from experiments.common import run_experiment
from skinfusion.data.index import source_family
from skinfusion.data.layouts import index_dataset


def _cell(y: np.ndarray, p: np.ndarray, n_boot: int) -> str:
    if len(set(y.tolist())) < 2:
        return "one class"
    auc, lo, hi = roc_auc_ci(y, p, n_boot=n_boot)
    return f"{auc:.3f} ({lo:.3f}-{hi:.3f})"


def rows(data: str, runs: Sequence[str], view: str, n_boot: int) -> list[str]:
    """The Markdown table (header and one row per run)."""
    by_id = {r.image_id: r for r in index_dataset(data, log=False).records}
    table, ids0 = [], None
    for run in runs:
        bdir = Path(run) / "branches" / view
        with open(bdir / "val_predictions.csv", newline="") as fh:
            pred = {r["image_id"]: float(r["melanoma_proba"]) for r in csv.DictReader(fh)}
        ids = sorted(pred)
        if ids0 is not None and ids != ids0:
            raise SystemExit(f"{run}: its validation images differ from {runs[0]}'s; compare runs of one split")
        ids0 = ids
        y = np.array([by_id[i].label for i in ids])
        p = np.array([pred[i] for i in ids])
        fam = np.array([source_family(by_id[i].source) for i in ids])
        dx = np.array([by_id[i].dx_type for i in ids])
        groups = [("all", np.ones(len(ids), bool))] + [(f, fam == f) for f in sorted(set(fam))] + \
                 [(d, dx == d) for d in ("histopathology", "follow_up", "consensus", "unknown") if (dx == d).any()]
        if not table:
            table.append("| run | epoch kept | selected on | " + " | ".join(
                f"{g} (n={int(m.sum())}, mel={int(y[m].sum())})" for g, m in groups) + " |")
            table.append("|---" * (len(groups) + 3) + "|")
        meta = json.loads((bdir / "metadata.json").read_text())
        config = json.loads((bdir / "config.json").read_text())
        lp = meta.get("label_process", {})
        sel = f"{config.get('select_on', 'all')} ({lp.get('n_validation_selecting', len(ids))})"
        name = f"{Path(run).name} (follow_up_weight {config.get('follow_up_weight', 1.0):g})"
        table.append(f"| {name} | {meta['training']['best_epoch']} of {meta['training']['epochs_run']} | {sel} | "
                     + " | ".join(_cell(y[m], p[m], n_boot) for _, m in groups) + " |")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN")
    ap.add_argument("--data", required=True, help="the dataset the runs were split on")
    ap.add_argument("--view", default="rgb")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    return run_experiment(lambda a: print("\n".join(rows(a.data, a.runs, a.view, a.bootstrap))) or 0, args, ap)


if __name__ == "__main__":
    raise SystemExit(main())
