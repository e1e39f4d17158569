"""Accuracy experiments: the full three-branch ensemble under one config per row, fused both ways.

Run ``python -m experiments.accuracy --data DIR --out runs/accuracy [--configs NAME ...]``.
Each NAME is a file ``experiments/configs/acc-NAME.json`` of branch-config fields (also usable
as ``skinfusion train --config FILE``). For each, the script trains rgb, hsv and fft on the
default split (seed 0) in ``OUT/NAME``, fuses them by mean and by stacking, scores the test
split, and prints one Markdown row per fusion for ``experiments/RESULTS.md``. A run that
already holds a finished branch with the same config is reused, so an interrupted study
resumes and a rerun only re-scores. Nothing is tuned on the test split: thresholds and the
stacker are fitted on validation, and the test numbers are only reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")
VIEWS = ("rgb", "hsv", "fft")
DEFAULT_CONFIGS = ("default", "augment", "crops", "shades-of-gray")


def load_config(name: str) -> dict:
    """The branch-config fields of ``experiments/configs/acc-<name>.json``."""
    path = CONFIG_DIR / f"acc-{name}.json"
    if not path.is_file():
        known = sorted(p.stem[4:] for p in CONFIG_DIR.glob("acc-*.json"))
        raise FileNotFoundError(f"{path}: no such experiment config; known: {known}")
    return json.loads(path.read_text())


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, spec: float) -> float:
    """Best sensitivity among thresholds whose specificity on these images is at least ``spec``."""
    neg, pos = np.sort(p[y == 0]), p[y == 1]
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    # the smallest threshold t with share(neg < t) >= spec, predicting melanoma for p >= t
    k = int(np.ceil(spec * len(neg)))
    t = neg[k - 1] if k >= 1 else -np.inf
    t = np.nextafter(t, np.inf) if k >= 1 else t
    return float(np.mean(pos >= t))


def _trained(run: Path, config: dict) -> bool:
    from models import BranchConfig

    for view in VIEWS:
        cfg = run / "branches" / view / "config.json"
        if not (cfg.is_file() and (run / "branches" / view / "metadata.json").is_file()):
            return False
        if json.loads(cfg.read_text()) != BranchConfig.from_dict({**config, "view": view}).to_dict():
            return False
    return True


def run_config(data: str, out: Path, name: str, audit: str | None) -> list[dict]:
    """Train (or reuse), fuse by mean and stack, and evaluate one config; returns one row per fusion."""
    from experiments.pipeline import evaluate_run, fuse_run, train_branches
    from models import BranchConfig

    config = load_config(name)
    run = out / name
    if _trained(run, config):
        logger.info("%s: reusing the trained branches in %s", name, run)
    else:
        configs = [BranchConfig.from_dict({**config, "view": v}) for v in VIEWS]
        train_branches(data, str(run), configs, jobs=len(configs), resume=True)
    rows = []
    for method in ("mean", "stack"):
        target = run if method == "mean" else out / f"{name}-stack"
        if method == "stack":
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(run, target, ignore=shutil.ignore_patterns("ensemble", "eval-*", "*.png", "report.html"))
        fuse_run(str(target), method=method)
        metrics = evaluate_run(str(target), plots=False, audit_csv=audit, audit=audit is not None)
        rows.append(_row(name, method, target, metrics))
    return rows


def _row(name: str, method: str, run: Path, metrics: dict) -> dict:
    import csv

    with open(run / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    y = np.array([int(r["label"]) for r in preds])
    fused = np.array([float(r["fused"]) for r in preds])
    seconds = sum(json.loads((run / "branches" / v / "metadata.json").read_text())["training"]["train_seconds"]
                  for v in VIEWS)
    f = metrics["fused"]
    best_branch = max(metrics["members"][v]["auc"] for v in VIEWS)
    isic17 = metrics["per_source"].get("ISIC2017_train", {}).get("fused", {}).get("auc", float("nan"))
    return {"name": name, "method": method, "members": {v: metrics["members"][v]["auc"] for v in VIEWS},
            "auc": f["auc"], "ci": f["auc_ci95"], "gain": f["auc"] - best_branch, "sens": f["sensitivity"],
            "spec": f["specificity"], "sens_at_spec85": sensitivity_at_specificity(y, fused, 0.85),
            "isic2017_train_auc": isic17, "train_seconds": seconds}


def format_rows(rows: Sequence[dict]) -> str:
    """The Markdown table of ``run_config`` rows."""
    out = ["| config | fusion | rgb | hsv | fft | fused AUC (95% CI) | fused − best branch | sens | spec | "
           "sens @ spec 0.85 | ISIC 2017 AUC | branch train time |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["members"]
        out.append(f"| `acc-{r['name']}.json` | {r['method']} | {m['rgb']:.3f} | {m['hsv']:.3f} | {m['fft']:.3f} | "
                   f"{r['auc']:.3f} ({r['ci'][0]:.3f}–{r['ci'][1]:.3f}) | {r['gain']:+.3f} | {r['sens']:.3f} | "
                   f"{r['spec']:.3f} | {r['sens_at_spec85']:.3f} | {r['isic2017_train_auc']:.3f} | "
                   f"{r['train_seconds']:.0f} s |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named experiments in order and print the results table."""
    p = argparse.ArgumentParser(prog="python -m experiments.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="where the runs go (default runs/accuracy)")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help=f"experiment names, files experiments/configs/acc-NAME.json (default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--audit", help="audit CSV for the per-artefact AUCs (default: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in args.configs:
        load_config(name)  # fail on a typo before hours of training
    rows = []
    for name in args.configs:
        rows += run_config(args.data, args.out, name, args.audit)
        print(format_rows(rows[-2:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n" + format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
