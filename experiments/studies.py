"""Reproduce the two findings behind the design on real data: class imbalance and the disc-sticker shortcut.

Run ``python -m experiments.studies --data DIR --out runs/studies``; it prints Markdown tables
(written to ``experiments/RESULTS.md`` by hand, with the command).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from colorspaces.files import write_json_atomic
from ensemble.metrics import binary_report
from experiments.common import run_experiment
from models.config import BranchConfig
from skinfusion.workflows.auditing import read_audit_flags

logger = logging.getLogger(__name__)

# Study settings live in experiments/configs/*.json (each also works as `train --config`):
# one branch (rgb) at 96 px for at most 12 epochs, so that the six trainings fit a CPU afternoon.
# Each study compares configs against each other under these settings; the absolute AUCs are
# below those of the default three-branch ensemble.
CONFIG_DIR = Path(__file__).with_name("configs")
VIEW = "rgb"


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


STUDY = _config("artefacts")
IMBALANCE = {
    "none": _config("imbalance-none"),
    "class weights": _config("imbalance-class-weights"),
    "undersampling": _config("imbalance-undersample"),
    "oversampling": _config("imbalance-oversample"),
}


def _train_and_score(data: str, run: Path, exclude: set[str] | None = None, **overrides) -> dict:
    """Train (unless the run already holds this branch) and score the test split.

    A finished branch is reused, so an interrupted study resumes and a rerun only re-scores.
    """
    from skinfusion.workflows.training import TrainRequest, score_branch, train_branch_run  # Keras

    config = BranchConfig.from_dict({**STUDY, **overrides, "view": VIEW})
    meta_path = run / "branches" / config.view / "metadata.json"
    if meta_path.is_file() and config.matches(json.loads((run / "branches" / config.view / "config.json").read_text())):
        meta = json.loads(meta_path.read_text())
        logger.info("reusing trained branch %s", meta_path.parent)
    else:
        train_branch_run(TrainRequest(data, str(run), exclude_ids=exclude), config)
        meta = json.loads(meta_path.read_text())
    records, proba = score_branch(str(run), config.view)
    y = np.array([r.label for r in records])
    threshold = meta["validation_metrics"]["threshold"]
    return {"records": records, "proba": proba, "y": y, "report": binary_report(y, proba, threshold),
            "report_05": binary_report(y, proba, 0.5, n_boot=1), "train_seconds": meta["training"]["train_seconds"],
            "best_epoch": meta["training"]["best_epoch"], "excluded": meta.get("excluded_from_training", 0)}


def imbalance_study(data: str, out: Path) -> list[str]:
    """Train the rgb branch under four imbalance strategies on one grouped split; return table lines."""
    lines = ["| strategy | test AUC (95% CI) | sens @ val threshold | spec @ val threshold | sens @ 0.5 | spec @ 0.5 | sens @ spec 0.90 | best epoch | train time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, overrides in IMBALANCE.items():
        res = _train_and_score(data, out / f"imbalance-{name.replace(' ', '-')}", **overrides)
        r, r5 = res["report"], res["report_05"]
        lines.append(f"| {name} | {r['auc']:.3f} ({r['auc_ci95'][0]:.3f}–{r['auc_ci95'][1]:.3f}) | "
                     f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r5['sensitivity']:.3f} | {r5['specificity']:.3f} | "
                     f"{r['sensitivity_at_specificity']['0.90']:.3f} | {res['best_epoch']} | {res['train_seconds']:.0f} s |")
        logger.info("%s", lines[-1])
    return lines


def _disc_ids(data: str) -> set[str]:
    path = Path(data) / "metadata.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "artefact_visual_review" not in rows[0]:
        raise ValueError(f"{path}: needs an artefact_visual_review column (colour_disc flags)")
    return {r["image_id"] for r in rows if "colour_disc" in (r["artefact_visual_review"] or "")}


def artefact_study(data: str, out: Path, audit_csv: str | None = None) -> list[str]:
    """Train with and without disc-bearing images; compare scores on disc-free and disc-bearing test images.

    Training excludes the images the dataset's visual review marks ``colour_disc``. The test
    subsets use the review's flags together with the detector's (``audit_csv``), since the
    detector finds real discs the review missed.

    All disc-bearing images are nevi, so on them the table reports specificity and the mean
    melanoma probability: a model that learned "disc ⇒ benign" scores disc-bearing nevi lower
    than disc-free ones of the same source.
    """
    reviewed = _disc_ids(data)
    discs = set(reviewed)
    if audit_csv:
        discs |= read_audit_flags(audit_csv)["colour_disc"]
    lines = ["| training set | excluded from training | test AUC, disc-free (95% CI) | ISIC 2017 disc-free AUC | specificity: disc-free nevi | specificity: disc nevi | mean P(melanoma): disc-free ISIC 2017 nevi | mean P(melanoma): disc nevi |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, exclude in (("all images", None), ("disc images excluded", reviewed)):
        res = _train_and_score(data, out / f"artefact-{name.split()[0]}", exclude=exclude)
        y, p, recs = res["y"], res["proba"], res["records"]
        thr = res["report"]["threshold"]
        disc = np.array([r.image_id in discs for r in recs])
        isic17 = np.array([r.source.startswith("ISIC2017") for r in recs])
        free = binary_report(y[~disc], p[~disc], thr, n_boot=1000)
        free17 = binary_report(y[~disc & isic17], p[~disc & isic17], thr, n_boot=200)
        nev_free, nev_disc = (~disc) & (y == 0), disc & (y == 0)
        nev_free17 = nev_free & isic17
        lines.append(
            f"| {name} | {res['excluded']} | {free['auc']:.3f} ({free['auc_ci95'][0]:.3f}–{free['auc_ci95'][1]:.3f}) | {free17['auc']:.3f} | "
            f"{(p[nev_free] < thr).mean():.3f} (n={nev_free.sum()}) | {(p[nev_disc] < thr).mean():.3f} (n={nev_disc.sum()}) | "
            f"{p[nev_free17].mean():.3f} (n={nev_free17.sum()}) | {p[nev_disc].mean():.3f} |")
        logger.info("%s", lines[-1])
    return lines


def main(argv=None) -> int:
    """Run the imbalance and/or artefact study and print Markdown tables."""
    p = argparse.ArgumentParser(prog="python -m experiments.studies", description=__doc__)
    p.add_argument("--data", required=True, help="labels.csv + images/ folder with metadata.csv (artefact_visual_review)")
    p.add_argument("--out", default="runs/studies", help="where the study runs go (default runs/studies)")
    p.add_argument("--audit", help="audit CSV from `skinfusion audit`; its disc flags join the review's for the test subsets")
    p.add_argument("--study", choices=["imbalance", "artefacts", "both"], default="both", help="which study (default both)")
    args = p.parse_args(argv)
    return run_experiment(_run, args, p, log_format="%(asctime)s %(message)s")


def _run(args: argparse.Namespace) -> int:
    """Run the chosen studies, write ``OUT/tables.json`` and print the tables."""
    out = Path(args.out)
    tables = {}
    if args.study in ("imbalance", "both"):
        tables["imbalance"] = imbalance_study(args.data, out)
    if args.study in ("artefacts", "both"):
        tables["artefacts"] = artefact_study(args.data, out, args.audit)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "tables.json", tables)
    for name, lines in tables.items():
        print(f"\n## {name} (settings {STUDY})\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
