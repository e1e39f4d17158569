"""Leave-one-source-out measurement of ``skinfusion adapt``: does adapting to a held-out clinic help?

``python -m experiments.adapt --run RUN --data DIR --holdout-source NAME --out OUT`` takes a run
trained without source family NAME (``ISIC2017`` = ``ISIC2017_train`` + ``ISIC2017_val``, see
``skinfusion.data.index.source_family``) and splits that source's images by the run's
``splits.csv``: each method adapts on the held-out source's TRAIN images (their labels unused),
picks its hyper-parameters by fused AUC on its VAL images, and is scored on its TEST images.
Per method: fused AUC with a 95% bootstrap CI and its change against no adaptation, per-branch
AUC, estimated vs true prevalence, sensitivity and specificity at the adapted threshold, and
the expected calibration error before and after. A Markdown table is printed and written to
``OUT/adapt.md``, everything to ``OUT/adapt.json``.

A method is a ``+``-joined combination of ``skinfusion adapt --method`` names; ``none`` is the
unadapted source ensemble.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from colorspaces.files import write_json_atomic
from ensemble.metrics import binary_report, expected_calibration_error, roc_auc_ci
from experiments.common import run_experiment
from skinfusion.data.index import Record, source_family
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split, make_split
from skinfusion.workflows.adaptation import (
    AdaptOptions,
    adapt_ensemble,
    member_proba,
    parse_methods,
    source_calibration,
)

if TYPE_CHECKING:
    from ensemble.engine import Ensemble

logger = logging.getLogger("experiments.adapt")

DEFAULT_METHODS = "none,prior,bn,bn-balanced,bn-balanced+prior,tent+prior,bn-balanced+tent+prior"
# Hyper-parameters tried per method on the held-out source's validation images; the first
# entry of each list is the command's default.
GRID = {"bn_alpha": (1.0, 0.5, 0.25), "tent": ((30, 5e-4), (30, 1e-4), (60, 1e-3))}


def holdout_records(data_dir: str, source: str) -> list[Record]:
    """The records of source family ``source`` (or the exact source name) in the dataset.

    Raises:
        ValueError: naming the sources found when none matches.
    """
    records = index_dataset(data_dir).records
    chosen = [r for r in records if r.source == source or source_family(r.source) == source]
    if not chosen:
        found = sorted({r.source for r in records})
        raise ValueError(f"--holdout-source {source}: no images of that source in {data_dir} (sources: {found})")
    return chosen


def split_holdout(run: Path, records: Sequence[Record], seed: int = 0) -> dict[str, list[Record]]:
    """The held-out records by the run's split; images the split lacks get a grouped, stratified one of their own."""
    assign, _ = load_split(run)
    missing = [r for r in records if r.image_id not in assign]
    if missing:
        logger.warning("%d held-out images are not in %s/splits.csv; splitting them 70/15/15 by lesion group "
                       "(seed %d)", len(missing), run, seed)
        assign = {**assign, **make_split(missing, seed=seed)}
    out: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[assign[r.image_id]].append(r)
    return out


def _settings(methods: tuple[str, ...], grid: bool) -> list[dict[str, Any]]:
    """The hyper-parameter settings to try for one method combination."""
    alphas = GRID["bn_alpha"] if grid and set(methods) & {"bn", "bn-balanced"} else GRID["bn_alpha"][:1]
    tents = GRID["tent"] if grid and "tent" in methods else GRID["tent"][:1]
    return [{"bn_alpha": a, "tent_steps": s, "tent_lr": lr} for a, (s, lr) in itertools.product(alphas, tents)]


def _scores(ens: "Ensemble", images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    P = member_proba(ens, images)
    return P, ens.fuse(P)


def measure(run: str, data_dir: str, holdout: str, methods: Sequence[str], grid: bool = True,
            max_adapt_images: int = 0, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Adapt, select on validation and score on test for every method; returns the JSON document."""
    run_path = Path(run)
    parts = split_holdout(run_path, holdout_records(data_dir, holdout), seed)
    # Here, not at the top: `--help` and flag errors need no TensorFlow.
    from ensemble.bundle import load_ensemble
    from skinfusion.workflows.adapting import MIN_IMAGES, bundle_branch_dirs, decode_images

    ens = load_ensemble(run_path)
    _, branch_dirs = bundle_branch_dirs(run_path, ens.manifest)
    calibration = source_calibration(ens, branch_dirs)
    adapt_recs = parts["train"]
    if max_adapt_images and len(adapt_recs) > max_adapt_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(adapt_recs), max_adapt_images, replace=False))
        adapt_recs = [adapt_recs[i] for i in pick]
    if len(adapt_recs) < MIN_IMAGES:
        logger.warning("only %d adaptation images; skinfusion adapt refuses fewer than %d", len(adapt_recs), MIN_IMAGES)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, recs in (("adapt", adapt_recs), ("val", parts["val"]), ("test", parts["test"])):
        ok, images, failures = decode_images([r.path for r in recs], ens.preprocess)
        keep = set(ok)
        data[name] = (images, np.array([r.label for r in recs if r.path in keep], dtype=int))
        logger.info("%s: %d images (%d melanoma), %d unreadable", name, len(images), data[name][1].sum(), len(failures))
    y_val, y_test = data["val"][1], data["test"][1]
    _, fused_test0 = _scores(ens, data["test"][0])
    rows = {}
    for spec in methods:
        combo = parse_methods(spec.replace("+", ","))
        t0, best = time.perf_counter(), None
        for setting in _settings(combo, grid):
            options = AdaptOptions(methods=combo, seed=seed, **setting)
            adapted = adapt_ensemble(ens, data["adapt"][0], calibration, options, prior_ci=False)
            val_auc = roc_auc_ci(y_val, _scores(adapted.ensemble, data["val"][0])[1], n_boot=0)[0]
            logger.info("%s %s: validation AUC %.4f", spec, setting, val_auc)
            if best is None or val_auc > best[0] + 1e-9:
                best = (val_auc, setting, adapted)
        val_auc, setting, adapted = best
        P, fused = _scores(adapted.ensemble, data["test"][0])
        report = binary_report(y_test, fused, adapted.ensemble.threshold, n_boot=n_boot, seed=seed)
        rows[spec] = {
            "settings": {k: v for k, v in setting.items() if k in adapted.record},
            "val_auc": val_auc,
            "test": report,
            "branch_auc": {v: roc_auc_ci(y_test, P[:, j], n_boot=0)[0] for j, v in enumerate(adapted.ensemble.views)},
            "prevalence": {"estimated": adapted.record["prevalence"]["estimated"],
                           "true_adapt": float(data["adapt"][1].mean()), "true_test": float(y_test.mean())},
            "ece_before": expected_calibration_error(y_test, fused_test0), "ece_after": report["ece"],
            "threshold": adapted.record["threshold"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    base = rows.get("none", {}).get("test", {}).get("auc")
    for row in rows.values():
        row["delta_auc_vs_none"] = row["test"]["auc"] - base if base is not None else None
    return {"run": str(run_path.resolve()), "data": str(data_dir), "holdout_source": holdout,
            "n": {k: len(v[1]) for k, v in data.items()},
            "source_calibration": {"validation_prior": calibration.validation_prior,
                                   "effective_prior": calibration.effective_prior},
            "grid": grid, "selection": "max fused AUC on the held-out source's validation images", "methods": rows}


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    views = next(iter(doc["methods"].values()))["branch_auc"] if doc["methods"] else {}
    head = ["method", "settings", "fused AUC [95% CI]", "ΔAUC", *[f"{v} AUC" for v in views],
            "prev. est / true (adapt, test)", "sens", "spec", "ECE before → after"]
    lines = [(f"Held-out source **{doc['holdout_source']}**; adaptation / validation / test images: "
             f"{doc['n']['adapt']} / {doc['n']['val']} / {doc['n']['test']}."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in doc["methods"].items():
        t, p = r["test"], r["prevalence"]
        delta = "" if r["delta_auc_vs_none"] is None else f"{r['delta_auc_vs_none']:+.3f}"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        cells = [name, settings, f"{t['auc']:.3f} [{t['auc_ci95'][0]:.3f}, {t['auc_ci95'][1]:.3f}]", delta,
                 *[f"{a:.3f}" for a in r["branch_auc"].values()],
                 f"{p['estimated']:.3f} / {p['true_adapt']:.3f}, {p['true_test']:.3f}",
                 f"{t['sensitivity']:.3f}", f"{t['specificity']:.3f}", f"{r['ece_before']:.3f} → {r['ece_after']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The script's parser."""
    p = argparse.ArgumentParser(prog="python -m experiments.adapt", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run trained with the source held out of train and val")
    p.add_argument("--data", required=True, help="the dataset folder (labels.csv with a source column)")
    p.add_argument("--holdout-source", required=True, metavar="NAME", help="the held-out source (family) name")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated; + combines (default {DEFAULT_METHODS})")
    p.add_argument("--out", required=True, help="folder for adapt.json and adapt.md")
    p.add_argument("--no-grid", action="store_true", help="use each method's default settings only")
    p.add_argument("--max-adapt-images", type=int, default=0, help="subsample the adaptation images (0 = all)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUC CIs")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement; print the table and write ``OUT/adapt.json`` and ``OUT/adapt.md``."""
    p = parser()
    args = p.parse_args(argv)
    return run_experiment(_run, args, p)


def _run(args: argparse.Namespace) -> int:
    """Measure, write ``OUT/adapt.json`` and ``OUT/adapt.md`` and print the table."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    doc = measure(args.run, args.data, args.holdout_source, methods, grid=not args.no_grid,
                  max_adapt_images=args.max_adapt_images, n_boot=args.n_boot, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "adapt.json", doc)
    table = markdown(doc)
    (out / "adapt.md").write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
