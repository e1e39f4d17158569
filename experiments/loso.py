"""Leave-one-source-out: a measurable proxy for "a clinic the model has never seen".

For a held-out source family (``ISIC2017`` = ISIC2017_train + ISIC2017_val, or ``HAM10000``),
train the branches on the other sources only (the held-out images leave both training and
validation, so nothing about them steers a branch), then score the held-out source's own part
of the run's grouped split: choices (levers, ensemble selection, adaptation settings) are made
on its **validation** images, results are reported on its **test** images. The grouped split is
the default one (split seed 0 over the whole dataset), so the ISIC 2017 test images here are the
ISIC 2017 subset of the grouped test split.

    python -m experiments.loso train --data DIR --out runs/loso --holdout ISIC2017 --name baseline \\
        --set epochs=12
    python -m experiments.loso report --out runs/loso
    python -m experiments.loso compare runs/loso/ISIC2017/baseline runs/loso/ISIC2017/lever ...

``train`` writes ``OUT/<holdout>/<name>/`` (a normal run directory: branches, split) plus
``scores.csv`` (every branch's probability on the held-out val/test images and the
in-distribution test images) and ``result.json``; ``report`` prints one Markdown table of every
result; ``compare`` prints, per role, each run's mean-fusion AUC and its paired bootstrap
difference from the first run (the same resampled images for both), the test of whether a
lever moved anything. A finished branch with the same config is reused, so an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from colorspaces import DEFAULT_VIEWS, VIEWS
from colorspaces.crops import DIHEDRAL, dihedral
from colorspaces.files import atomic_open, write_json_atomic
from ensemble.metrics import roc_auc_ci
from ensemble.selection import greedy_selection
from experiments.common import paired_rows, run_experiment
from skinfusion.cli.common import positive_int
from skinfusion.cli.fuse import parse_views
from models.config import BranchConfig
from skinfusion.data.cache import cached_images
from skinfusion.data.index import source_family
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split

logger = logging.getLogger(__name__)

ROLES = ("holdout_val", "holdout_test", "indist_test")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` branch config overrides; values are JSON when they parse, else strings.

    ``key@view=value`` overrides ``key`` for that view's branch only (e.g.
    ``color_constancy@rgb=shades_of_gray``): branches are trained independently, so a per-view
    setting is as real a configuration as a shared one.
    """
    out: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(BranchConfig)}
    for item in items:
        key, sep, value = item.partition("=")
        field, at, view = key.partition("@")
        if not sep or field not in fields or (at and view not in VIEWS):
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE or KEY@VIEW=VALUE with KEY one of {sorted(fields)} "
                             f"and VIEW one of {sorted(VIEWS)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _roles(records, assign: dict[str, str], holdout: str) -> dict[str, list]:
    by_role: dict[str, list] = {r: [] for r in ROLES}
    for r in records:
        split, held = assign.get(r.image_id), source_family(r.source) == holdout
        if held and split in ("val", "test"):
            by_role[f"holdout_{split}"].append(r)
        elif not held and split == "test":
            by_role["indist_test"].append(r)
    return by_role


def branch_configs(overrides: dict[str, Any], views: Sequence[str]) -> list[BranchConfig]:
    """One config per view; ``{view}`` in a text value becomes the view (``init_from=runs/r/pretrain/{view}``),
    and a ``key@view`` override applies to that view only, over a shared ``key``."""
    def for_view(v: str) -> dict[str, Any]:
        shared = {k: val for k, val in overrides.items() if "@" not in k}
        own = {k.partition("@")[0]: val for k, val in overrides.items() if k.endswith(f"@{v}")}
        return {k: val.replace("{view}", v) if isinstance(val, str) else val for k, val in {**shared, **own}.items()}

    return [BranchConfig.from_dict({**for_view(v), "view": v}) for v in views]


def branch_scores(model, config: BranchConfig, images, tta: bool = False) -> np.ndarray:
    """One branch's melanoma probability per image (RGB uint8 at ``config.load_size``).

    With ``tta``: the mean over the 8 rotations and flips of each image, so that a turned or
    mirrored image scores the same.
    """
    from models import predict_images_proba

    def score(x) -> np.ndarray:
        return predict_images_proba(model, config.view, x, constancy=config.color_constancy,
                                    crop_stride=config.crop_stride)

    if not tta:
        return score(images)
    arr = np.asarray(images)  # one copy in memory; each turned copy is made when scored, not all 8 at once
    return np.mean([score(dihedral(arr, k)) for k in range(len(DIHEDRAL))], axis=0)


def train(data: str, out: str, holdout: str, name: str, overrides: dict[str, Any], views: Sequence[str],
          jobs: int, tta: bool = False) -> dict[str, Any]:
    """Train ``views`` without the ``holdout`` source and score its val and test images.

    With ``tta`` each branch's probability is its mean over the 8 rotations and flips of the image,
    as ``skinfusion evaluate --tta`` scores (the flips of the RGB image, before its views).
    """
    from models import load_branch  # Keras: only once the flags are checked
    from skinfusion.workflows.training import train_branches

    index = index_dataset(data)
    families = sorted({source_family(r.source) for r in index.records})
    if holdout not in families:
        raise ValueError(f"--holdout {holdout!r}: not a source family of {data}; choose one of {families}")
    held = {r.image_id for r in index.records if source_family(r.source) == holdout}
    run = Path(out) / holdout / name
    configs = branch_configs(overrides, views)
    train_branches(data, str(run), configs, jobs=jobs, holdout_ids=held, resume=True)
    assign, _ = load_split(run)
    by_role = _roles(index.records, assign, holdout)
    rows: dict[str, dict[str, Any]] = {}
    for role, recs in by_role.items():
        for r in recs:
            rows[r.image_id] = {"image_id": r.image_id, "label": r.label, "source": r.source, "role": role}
    for v in views:
        model, config, _ = load_branch(run / "branches" / v)
        for role, recs in by_role.items():
            imgs, ok, _ = cached_images([r.path for r in recs], config.load_size, desc=f"{role} images")
            proba = branch_scores(model, config, imgs, tta)
            for i, p in zip(ok, proba):
                rows[recs[i].image_id][v] = float(p)
    kept = [row for row in rows.values() if all(v in row for v in views)]
    with atomic_open(run / "scores.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["image_id", "label", "source", "role", *views], lineterminator="\n")
        w.writeheader()
        w.writerows(kept)
    result = {**summarise(run, holdout, name, overrides, views), "tta": tta}
    write_json_atomic(run / "result.json", result)
    return result


def read_scores(run: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of ``RUN/scores.csv`` and the view columns it holds."""
    with open(run / "scores.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        # Read inside the block: on an empty file DictReader reads its header only when asked.
        columns = list(reader.fieldnames or ())
    return rows, [c for c in columns if c in VIEWS]


def _check_rows(path: Path, rows: list[dict[str, str]], views: Sequence[str]) -> None:
    """Refuse a damaged scores.csv by name, so that every reader can trust its cells."""
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        problem = None
        if None in row:  # DictReader's key for cells beyond the header
            problem = "more cells than the header"
        elif any(row.get(k) in (None, "") for k in ("image_id", "role", "label", *views)):
            problem = "a missing cell"
        elif row["label"] not in ("0", "1"):
            problem = f"label {row['label']!r} (0 or 1 expected)"
        else:
            for v in views:
                try:
                    value = float(row[v])
                except ValueError:
                    value = float("nan")
                if not 0.0 <= value <= 1.0:
                    problem = f"{v} score {row[v]!r} (a probability expected)"
                    break
        if problem:
            raise ValueError(f"{path}: line {n} is damaged ({problem}); train the run again with "
                             "`python -m experiments.loso train`")


def load_runs(runs: Sequence[str | Path]) -> list[tuple[dict[str, dict[str, str]], list[str]]]:
    """Each run's ``scores.csv``, as ``(rows by image id, view columns)``, checked to share the first
    run's images and roles (one split and held-out source), as every comparison of runs needs.

    Raises:
        FileNotFoundError: if a run has no ``scores.csv``.
        ValueError: if one has no view or id/role/label column, a row with a missing cell, a label
            other than 0/1 or a score that is not a number in [0, 1], or the runs' images or roles differ.
    """
    loaded = []
    for run in map(Path, runs):
        path = run / "scores.csv"
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not the file `python -m experiments.loso train` writes; "
                             "move it away and train the run again")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; train the run with `python -m experiments.loso train` first")
        rows, views = read_scores(run)
        if not views or not rows or not {"image_id", "role", "label"} <= set(rows[0]):
            raise ValueError(f"{path}: no scored images, or no image_id/role/label/view columns; it is not a "
                             "scores.csv of `python -m experiments.loso train`")
        _check_rows(path, rows, views)
        loaded.append(({r["image_id"]: r for r in rows}, views))
    ref = loaded[0][0]
    for run, (rows, _) in zip(runs[1:], loaded[1:]):
        if {(i, r["role"]) for i, r in rows.items()} != {(i, r["role"]) for i, r in ref.items()}:
            raise ValueError(f"{run}: its images or their roles differ from {runs[0]}'s; the runs must share one "
                             "split and held-out source")
    return loaded


def _arrays(rows, role: str, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sel = [r for r in rows if r["role"] == role]
    return (np.array([int(r["label"]) for r in sel]),
            np.array([[float(r[v]) for v in views] for r in sel]).reshape(len(sel), len(views)))


def _auc(y: np.ndarray, p: np.ndarray, n_boot: int = 1000) -> dict[str, float]:
    auc, lo, hi = roc_auc_ci(y, p, n_boot=n_boot)
    return {"auc": round(auc, 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def summarise(run: Path, holdout: str, name: str, overrides: dict[str, Any], views: Sequence[str]) -> dict[str, Any]:
    """Per-branch, mean-fused and validation-selected AUCs of one LOSO run, from its ``scores.csv``."""
    rows, have = read_scores(run)
    views = [v for v in views if v in have]
    default = [v for v in DEFAULT_VIEWS if v in views]
    yv, Pv = _arrays(rows, "holdout_val", views)
    # Caruana et al. (2004): greedy forward selection, with replacement, on the held-out source's
    # validation images only; the test images never take part in a choice.
    weights = greedy_selection(Pv, yv)
    result: dict[str, Any] = {"holdout": holdout, "name": name, "overrides": overrides, "views": views,
                              "selected_weights": dict(zip(views, map(float, weights)))}
    for role in ROLES:
        y, P = _arrays(rows, role, views)
        if len(y) == 0 or len(set(y.tolist())) < 2:
            continue
        entry: dict[str, Any] = {"n": int(len(y)), "n_melanoma": int(y.sum())}
        for j, v in enumerate(views):
            entry[v] = _auc(y, P[:, j])
        if default:
            entry["mean_default"] = _auc(y, P[:, [views.index(v) for v in default]].mean(axis=1))
        entry["mean_all"] = _auc(y, P.mean(axis=1))
        entry["selected"] = _auc(y, P @ weights)
        result[role] = entry
    return result


def report(out: str) -> str:
    """A Markdown table of every ``OUT/*/*/result.json``.

    Raises:
        FileNotFoundError: if ``out`` is not a folder.
    """
    if not Path(out).is_dir():
        raise FileNotFoundError(f"--out {out}: no such folder; train a run there with `python -m experiments.loso train` first")
    columns = (*DEFAULT_VIEWS, *(v for v in VIEWS if v not in DEFAULT_VIEWS))
    lines = [f"| held out | run | views | {' | '.join(columns)} | mean (default views) | mean (all) | "
             "selected on val | holdout val mean | in-dist test mean |",
             "| --- | --- | --- | " + "---: | " * len(columns) + "--- | --- | --- | ---: | ---: |"]
    for path in sorted(Path(out).glob("*/*/result.json")):
        res = json.loads(path.read_text())
        t = res.get("holdout_test", {})

        def cell(key, t=t):
            e = t.get(key)
            return "" if e is None else f"{e['auc']:.3f} ({e['lo']:.3f}–{e['hi']:.3f})"

        branch = [f"{t[v]['auc']:.3f}" if v in t else "" for v in columns]
        sel = ", ".join(f"{v} {w:.2f}" for v, w in res["selected_weights"].items() if w > 0)
        hv = res.get("holdout_val", {}).get("mean_default", {}).get("auc", float("nan"))
        it = res.get("indist_test", {}).get("mean_default", {}).get("auc", float("nan"))
        lines.append(f"| {res['holdout']} (n={t.get('n', 0)}, {t.get('n_melanoma', 0)} mel) | {res['name']} | "
                     f"{','.join(res['views'])} | {' | '.join(branch)} | {cell('mean_default')} | {cell('mean_all')} | "
                     f"{cell('selected')} [{sel}] | {hv:.3f} | {it:.3f} |")
    return "\n".join(lines)


def compare(runs: Sequence[str | Path], n_boot: int = 1000, views: Sequence[str] | None = None) -> str:
    """A Markdown table: per run and role, the mean-fusion AUC of the run's default views (or of
    ``views``, e.g. one branch) and its paired bootstrap difference from ``runs[0]`` (95% CI). Runs
    may fuse different views (a lever that adds a view is compared with the reference as a user
    would fuse each); the table names them.

    Raises:
        FileNotFoundError: if a run has no ``scores.csv``.
        ValueError: if the runs do not share their images and roles, a run holds none of the
            default views or not every one of ``views``, or a score is not a number.
    """
    loaded = []
    for run, (rows, held) in zip(runs, load_runs(runs)):
        if views:
            missing = [v for v in views if v not in held]
            if missing:
                raise ValueError(f"{Path(run) / 'scores.csv'}: has no {', '.join(missing)} scores (it holds "
                                 f"{', '.join(held)}); choose --views among the runs' common views")
            fused_views = list(views)
        else:
            fused_views = [v for v in DEFAULT_VIEWS if v in held]
        if not fused_views:
            raise ValueError(f"{Path(run) / 'scores.csv'}: holds none of the default views {', '.join(DEFAULT_VIEWS)}")
        loaded.append((rows, fused_views))
    ref = loaded[0][0]
    ids = sorted(ref)
    fused = []
    for run, (rows, views) in zip(runs, loaded):
        try:
            fused.append({i: float(np.mean([float(rows[i][v]) for v in views])) for i in ids})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{Path(run) / 'scores.csv'}: damaged ({exc}); train the run again with "
                             "`python -m experiments.loso train`") from None
    try:
        labels = {i: int(ref[i]["label"]) for i in ids}
    except ValueError as exc:
        raise ValueError(f"{Path(runs[0]) / 'scores.csv'}: damaged ({exc})") from None
    groups = {role: [i for i in ids if ref[i]["role"] == role] for role in ROLES}
    lines = ["| run | views fused | role | n (mel) | mean fusion AUC (95% CI) | minus the first run (paired 95% CI) |",
             "|---|---|---|---|---|---|",
             *paired_rows([Path(r).name for r in runs], labels, fused, groups, n_boot,
                          extra=[",".join(views) for _, views in loaded])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train`` one LOSO run, ``report`` all of them, or ``compare`` runs with a reference."""
    p = argparse.ArgumentParser(prog="python -m experiments.loso", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one configuration with one source held out, and score it")
    t.add_argument("--data", required=True, metavar="DIR", help="the labelled dataset (with a source column)")
    t.add_argument("--out", required=True, metavar="DIR", help="where LOSO runs live (OUT/<holdout>/<name>)")
    t.add_argument("--holdout", required=True, metavar="SOURCE", help="source family to hold out, e.g. ISIC2017")
    t.add_argument("--name", required=True, help="name of this configuration (a folder under OUT/<holdout>)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="branch config overrides; {view} in a text value becomes each branch's view "
                        "(e.g. init_from=runs/r/pretrain/{view}); KEY@VIEW=VALUE sets it for one view only "
                        "(e.g. color_constancy@rgb=shades_of_gray)")
    t.add_argument("--views", default=",".join(DEFAULT_VIEWS), help=f"comma-separated views (default {','.join(DEFAULT_VIEWS)})")
    t.add_argument("--jobs", type=positive_int, default=2, help="branches trained in parallel (default 2)")
    t.add_argument("--tta", action="store_true",
                   help="score each image as the mean over its 8 rotations and flips, as `skinfusion evaluate --tta` "
                        "(to measure it on finished branches, copy a run's split files and branches to a new --name)")
    r = sub.add_parser("report", help="print the Markdown table of every finished LOSO run")
    r.add_argument("--out", required=True, metavar="DIR")
    c = sub.add_parser("compare", help="paired bootstrap differences of LOSO runs from the first (the reference)")
    c.add_argument("runs", nargs="+", metavar="RUN", help="LOSO run folders; the first is the reference")
    c.add_argument("--boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    c.add_argument("--views", metavar="V[,V...]",
                   help="fuse these views in every run instead of each run's default views (one view: compare a branch)")
    args = p.parse_args(argv)
    if args.cmd == "report":
        return run_experiment(lambda a: print(report(a.out)) or 0, args, p, tensorflow=False)
    if args.cmd == "compare":
        if len(args.runs) < 2:
            c.error("give the reference run and at least one more")
        try:
            chosen = parse_views(args.views) if args.views is not None else None
        except ValueError as e:
            c.error(str(e))
        return run_experiment(lambda a: print(compare(a.runs, a.boot, chosen)) or 0, args, p, tensorflow=False)
    try:
        views = parse_views(args.views)
    except ValueError as e:
        p.error(str(e))
    overrides = _parse_set(args.set)
    try:
        branch_configs(overrides, views)  # a bad value fails here, before TensorFlow and the data
    except (ValueError, TypeError) as e:
        p.error(f"--set: {e}")

    def body(a: argparse.Namespace) -> int:
        res = train(a.data, a.out, a.holdout, a.name, overrides, views, a.jobs, a.tta)
        print(json.dumps(res.get("holdout_test", {}), indent=1))
        return 0

    return run_experiment(body, args, p)

if __name__ == "__main__":
    sys.exit(main())
