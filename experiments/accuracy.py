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
import csv
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from colorspaces import DEFAULT_VIEWS as VIEWS
from colorspaces.files import write_json_atomic
from ensemble.metadata import parse_fields
from ensemble.metrics import sensitivity_at_specificity
from experiments.common import run_experiment
from models.config import BranchConfig

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_CONFIGS = ("default", "class-weights", "augment", "crops", "shades-of-gray")


def load_config(name: str) -> dict:
    """The branch-config fields of ``experiments/configs/acc-<name>.json``."""
    path = CONFIG_DIR / f"acc-{name}.json"
    if not path.is_file():
        known = sorted(p.stem[4:] for p in CONFIG_DIR.glob("acc-*.json"))
        raise FileNotFoundError(f"{path}: no such experiment config; known: {known}")
    return json.loads(path.read_text())


def _trained(run: Path, config: dict) -> bool:
    for view in VIEWS:
        cfg = run / "branches" / view / "config.json"
        if not (cfg.is_file() and (run / "branches" / view / "metadata.json").is_file()):
            return False
        if not BranchConfig.from_dict({**config, "view": view}).matches(json.loads(cfg.read_text())):
            return False
    return True


def run_config(data: str, out: Path, name: str, audit: str | None, oof_folds: int = 0,
               metadata: Sequence[str] = ()) -> list[dict]:
    """Train (or reuse), fuse by mean and stack (and OOF stack, and stack with each metadata
    field set), evaluate one config; one row per fusion."""
    # Keras: only once the flags are checked
    from skinfusion.workflows.evaluation import EvaluateOptions, evaluate
    from skinfusion.workflows.fusing import fuse_run
    from skinfusion.workflows.training import train_branches

    config = load_config(name)
    run = out / name
    if _trained(run, config):
        logger.info("%s: reusing the trained branches in %s", name, run)
    else:
        configs = [BranchConfig.from_dict({**config, "view": v}) for v in VIEWS]
        train_branches(data, str(run), configs, jobs=len(configs), resume=True)
    rows = []
    methods = ["mean", "stack"] + ([f"stack-oof{oof_folds}"] if oof_folds else []) + [f"stack+{m}" for m in metadata]
    for method in methods:
        target = run if method == "mean" else out / f"{name}-{method}"
        if method != "mean":
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(run, target, ignore=shutil.ignore_patterns("ensemble", "eval-*", "*.png", "report.html",
                                                                       "oof"))
        if method.startswith("stack-oof"):
            # The fold runs live in the trained run, so a rerun reuses them.
            (run / "oof").mkdir(exist_ok=True)
            (target / "oof").symlink_to((run / "oof").resolve(), target_is_directory=True)
            fuse_run(str(target), method="stack", folds=oof_folds)
        elif method.startswith("stack+"):
            fuse_run(str(target), method="stack", metadata=method[len("stack+"):])
        else:
            fuse_run(str(target), method=method)
        metrics = evaluate(str(target), options=EvaluateOptions(plots=False, audit_csv=audit, audit=audit is not None))
        rows.append(_row(name, method, target, metrics, oof_folds if method.startswith("stack-oof") else 0))
    return rows


def _row(name: str, method: str, run: Path, metrics: dict, oof_folds: int = 0) -> dict:
    with open(run / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    y = np.array([int(r["label"]) for r in preds])
    fused = np.array([float(r["fused"]) for r in preds])
    seconds = sum(json.loads((run / "branches" / v / "metadata.json").read_text())["training"]["train_seconds"]
                  for v in VIEWS)
    fold_seconds = sum(json.loads(m.read_text())["training"]["train_seconds"]
                       for m in (run / "oof").glob(f"k{oof_folds}-fold*/branches/*/metadata.json")) if oof_folds else 0.0
    f = metrics["fused"]
    best_branch = max(metrics["members"][v]["auc"] for v in VIEWS)
    isic17 = metrics["per_source"].get("ISIC2017_train", {}).get("fused", {}).get("auc", float("nan"))
    return {"name": name, "method": method, "members": {v: metrics["members"][v]["auc"] for v in VIEWS},
            "auc": f["auc"], "ci": f["auc_ci95"], "gain": f["auc"] - best_branch, "sens": f["sensitivity"],
            "spec": f["specificity"], "sens_at_spec85": sensitivity_at_specificity(y, fused, 0.85),
            "isic2017_train_auc": isic17, "per_source_auc": {s: v["fused"]["auc"] for s, v in metrics["per_source"].items()},
            "train_seconds": seconds, "fold_train_seconds": fold_seconds}


def _f(x, spec: str = ".3f") -> str:
    # results.json stores an undefined metric (NaN) as null
    return "n/a" if x is None or x != x else format(x, spec)


def format_rows(rows: Sequence[dict]) -> str:
    """The Markdown table of ``run_config`` rows."""
    out = ["| config | fusion | rgb | hsv | fft | fused AUC (95% CI) | fused − best branch | sens | spec | "
           "sens @ spec 0.85 | ISIC 2017 AUC | branch train time |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["members"]
        out.append(f"| `acc-{r['name']}.json` | {r['method']} | {_f(m['rgb'])} | {_f(m['hsv'])} | {_f(m['fft'])} | "
                   f"{_f(r['auc'])} ({_f(r['ci'][0])}–{_f(r['ci'][1])}) | {_f(r['gain'], '+.3f')} | {_f(r['sens'])} | "
                   f"{_f(r['spec'])} | {_f(r['sens_at_spec85'])} | {_f(r['isic2017_train_auc'])} | "
                   f"{r['train_seconds']:.0f} s" + (f" + {r['fold_train_seconds']:.0f} s folds" if r.get("fold_train_seconds") else "")
                   + " |")
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
    p.add_argument("--metadata", nargs="+", default=[], metavar="FIELDS",
                   help="also stack with these metadata field sets (fuse --metadata FIELDS), one row each, "
                        "e.g. --metadata age,sex age,sex,site (default: none)")
    p.add_argument("--oof-folds", type=int, default=0, metavar="K",
                   help="also stack on K-fold out-of-fold training probabilities (fuse --folds K; trains every "
                        "branch K more times) and add that row (default 0: off)")
    args = p.parse_args(argv)
    if args.oof_folds == 1 or args.oof_folds < 0:
        p.error(f"--oof-folds must be 0 (off) or at least 2, got {args.oof_folds}")
    for name in args.configs:
        try:
            load_config(name)  # fail on a typo before hours of training
        except (OSError, ValueError) as e:
            p.error(f"--configs {name}: {e}")
    for fields in args.metadata:
        try:
            parse_fields(fields)
        except ValueError as e:
            p.error(f"--metadata {fields}: {e}")
    return run_experiment(lambda a: _run(a), args, p)


def _run(args: argparse.Namespace) -> int:
    """Train, fuse and score every config of ``args.configs``; print and keep the rows."""
    rows = []
    for name in args.configs:
        new_rows = run_config(args.data, args.out, name, args.audit, args.oof_folds, args.metadata)
        rows += new_rows
        print(format_rows(new_rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    # Rows of earlier invocations (other configs) are kept; a rerun replaces its own rows.
    done = {(r["name"], r["method"]) for r in rows}
    earlier = [r for r in json.loads(results.read_text()) if (r["name"], r["method"]) not in done] \
        if results.is_file() else []
    write_json_atomic(results, earlier + rows)
    print("\n" + format_rows(earlier + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
