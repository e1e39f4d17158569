"""Choose the branch's image size and width by measurement: one view trained at a grid of both.

Run ``python -m experiments.sweep --data DIR --out runs/sweep --view hsv --grid 96x16 128x16 ...``.
Each grid point ``SIZExWIDTH`` trains the branch with ``image_size=SIZE`` and ``base_filters=WIDTH``
(every other field from ``--config``, default ``experiments/configs/acc-default.json``) for the
same fixed number of epochs with a cosine schedule and no early stop, so every point gets the same
budget of passes over the data. All points share one split (the first point's).

The choice is made on the **validation** split only, by the one-standard-error rule: the cheapest
point (fewest training seconds per epoch) whose validation AUC is within one bootstrap standard
error of the best. Test AUCs are printed for the record and never used. A finished point is
reused, so an interrupted sweep resumes and a rerun only re-scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from colorspaces import VIEWS
from colorspaces.files import write_json_atomic
from ensemble.metrics import binary_report
from experiments.common import run_experiment

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")


def parse_point(text: str) -> tuple[int, int]:
    """``"128x16"`` → ``(128, 16)``: image size and base filters of one grid point.

    Raises:
        ValueError: naming the text, if it is not ``SIZExWIDTH`` with a size of at least 16 px and
            a width of at least 1.
    """
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"grid point {text!r}: expected SIZExWIDTH, e.g. 128x16")
    size, width = int(m.group(1)), int(m.group(2))
    if size < 16 or width < 1:
        raise ValueError(f"grid point {text!r}: image size must be >= 16 px (four 2x poolings) and width >= 1")
    return size, width


def choose(rows: Sequence[dict]) -> dict:
    """The one-standard-error choice: the cheapest row whose validation AUC is within one SE of the best.

    Each row needs ``val_auc``, ``val_auc_se`` and ``seconds_per_epoch``. The SE is the best
    row's; ties in cost go to the higher validation AUC.
    """
    if not rows:
        raise ValueError("no grid points to choose from")
    best = max(rows, key=lambda r: r["val_auc"])
    near = [r for r in rows if r["val_auc"] >= best["val_auc"] - best["val_auc_se"]]
    return min(near, key=lambda r: (r["seconds_per_epoch"], -r["val_auc"]))


def _val_report(branch_dir: Path) -> dict:
    from skinfusion.workflows.fusing import read_val_predictions

    y, p = map(np.array, zip(*read_val_predictions(branch_dir).values()))
    return binary_report(y.astype(int), p.astype(float), 0.5, n_boot=1000)


def run_point(data: str, out: Path, view: str, base: dict, size: int, width: int, epochs: int,
              split_from: Path | None = None) -> dict:
    """Train (or reuse) one grid point and measure it on validation (for the choice) and test (for the record)."""
    from models import BranchConfig
    from models.store import read_branch_info
    from skinfusion.workflows.training import TrainRequest, score_branch, train_branch_run

    config = BranchConfig.from_dict({**base, "view": view, "image_size": size, "base_filters": width,
                                     "epochs": epochs, "patience": epochs, "lr_schedule": "cosine"})
    run = out / f"{view}-{size}px-{width}f"
    branch = run / "branches" / view
    if split_from is not None and not (run / "splits.csv").is_file():
        run.mkdir(parents=True, exist_ok=True)
        for name in ("splits.csv", "split.json"):
            shutil.copy2(split_from / name, run / name)
    trained = (branch / "metadata.json").is_file() and read_branch_info(branch)[0] == config
    if trained:
        logger.info("%s: reusing the trained branch", run)
    else:
        train_branch_run(TrainRequest(data, str(run), resume=True), config)
    _, meta = read_branch_info(branch)
    val = _val_report(branch)
    t0 = time.perf_counter()
    records, proba = score_branch(str(run), view)
    infer_s = time.perf_counter() - t0
    y = np.array([r.label for r in records])
    test = binary_report(y, proba, meta["validation_metrics"]["threshold"], n_boot=1000)
    training = meta["training"]
    lo, hi = val["auc_ci95"]
    return {"view": view, "image_size": size, "base_filters": width, "parameters": meta["parameter_count"],
            "epochs": training["epochs_run"], "best_epoch": training["best_epoch"],
            "train_seconds": training["train_seconds"],
            "seconds_per_epoch": training["train_seconds"] / max(training["epochs_run"], 1),
            "val_auc": val["auc"], "val_auc_se": (hi - lo) / 3.92,
            "test_auc": test["auc"], "test_ci": test["auc_ci95"],
            "infer_ms_per_image": 1000 * infer_s / max(len(records), 1), "run": str(run)}


def format_rows(rows: Sequence[dict], chosen: dict | None) -> str:
    """The Markdown table of the sweep, the chosen point marked."""
    out = ["| view | image size | width | parameters | val AUC (± SE) | test AUC (95% CI) | best epoch | "
           "train s / epoch | test ms / image |",
           "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        mark = " **(chosen)**" if chosen is r else ""
        out.append(f"| {r['view']} | {r['image_size']} | {r['base_filters']}{mark} | {r['parameters']:,} | "
                   f"{r['val_auc']:.3f} ± {r['val_auc_se']:.3f} | {r['test_auc']:.3f} ({r['test_ci'][0]:.3f}–"
                   f"{r['test_ci'][1]:.3f}) | {r['best_epoch']} / {r['epochs']} | {r['seconds_per_epoch']:.0f} | "
                   f"{r['infer_ms_per_image']:.1f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every grid point in order, print the table and the one-SE choice."""
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="where the runs go (default runs/sweep)")
    p.add_argument("--view", choices=sorted(VIEWS), default="hsv", help="the view to train (default hsv)")
    p.add_argument("--grid", nargs="+", default=["96x16", "128x16", "160x16", "96x32", "128x32"], metavar="SIZExWIDTH",
                   help="grid points, image size x first-layer filters (default 96x16 128x16 160x16 96x32 128x32)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per point, cosine schedule, no early stop (default 10)")
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "acc-default.json",
                   help="JSON of the other branch-config fields (default experiments/configs/acc-default.json)")
    args = p.parse_args(argv)
    try:
        points = [parse_point(t) for t in args.grid]
    except ValueError as e:
        p.error(str(e))
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder")
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file")
    return run_experiment(lambda a: _run(a, points), args, p)


def _run(args: argparse.Namespace, points: Sequence[tuple[int, int]]) -> int:
    """Train every grid point, print the rows and the one-SE choice, keep them in ``OUT``."""
    base = json.loads(args.config.read_text())
    rows, first = [], None
    for i, (size, width) in enumerate(points, 1):
        logger.info("grid point %d/%d: %s at %d px, width %d", i, len(points), args.view, size, width)
        rows.append(run_point(args.data, args.out, args.view, base, size, width, args.epochs, split_from=first))
        first = first or Path(rows[0]["run"])
        print(format_rows(rows[-1:], None).splitlines()[-1], flush=True)
    chosen = choose(rows)
    write_json_atomic(args.out / f"sweep-{args.view}.json", {"rows": rows, "chosen": chosen, "epochs": args.epochs,
                                                             "config": base})
    print("\n" + format_rows(rows, chosen))
    print(f"\nchosen (cheapest within one SE of the best validation AUC): image_size={chosen['image_size']}, "
          f"base_filters={chosen['base_filters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
