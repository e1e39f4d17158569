"""Several seeds per view (a deep ensemble): what averaging them gains over one seed per view.

    python -m experiments.seeds runs/loso/ISIC2017/gate runs/loso/ISIC2017/seed1 runs/loso/ISIC2017/seed2 \\
        [--out OUT] [--boot 1000]

Each argument is a leave-one-source-out run of ``experiments.loso train`` with the same
configuration and split, trained with another branch seed (``--set seed=1``); the first is the
reference. From their ``scores.csv`` it reports, per role (the held-out source's validation and
test images, the in-distribution test images): the AUC of each seed's mean fusion of its views, of
every view averaged over the seeds, and of the mean over all seeds and views, each with a 95%
bootstrap CI, and the paired bootstrap difference (all seeds minus the reference's fusion; the
same resampled images for both). Writes ``OUT/seeds.json`` and ``OUT/seeds.md`` when ``--out`` is
given. Nothing is chosen here: there is no threshold or weight to fit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import write_json_atomic
from ensemble.metrics import paired_auc_delta as paired_delta
from ensemble.metrics import roc_auc_ci
from experiments.common import run_experiment

ROLES = ("holdout_val", "holdout_test", "indist_test")


def compare_seeds(runs: Sequence[str | Path], n_boot: int = 1000) -> dict[str, Any]:
    """The report of the module docstring, as a dict."""
    from experiments.loso import load_runs

    if len(runs) < 2:
        raise ValueError("give at least two runs: the reference seed and one more")
    loaded = load_runs(runs)
    views = loaded[0][1]
    for run, (_, v) in zip(runs[1:], loaded[1:]):
        if v != views:
            raise ValueError(f"{run}: views {v} differ from {runs[0]}'s {views}; compare runs of one configuration")
    ids = sorted(loaded[0][0])

    def auc(y, p):
        a, lo, hi = roc_auc_ci(y, p, n_boot=n_boot)
        return {"auc": round(a, 4), "lo": round(lo, 4), "hi": round(hi, 4)}

    result: dict[str, Any] = {"runs": [str(r) for r in runs], "views": views, "roles": {}}
    for role in ROLES:
        sel = [i for i in ids if loaded[0][0][i]["role"] == role]
        if not sel:
            continue
        y = np.array([int(loaded[0][0][i]["label"]) for i in sel])
        if y.min() == y.max():
            continue
        # P[s, n, v]: seed s, image n, view v.
        try:
            P = np.array([[[float(rows[i][v]) for v in views] for i in sel] for rows, _ in loaded])
        except ValueError as exc:
            raise ValueError(f"a scores.csv of {', '.join(map(str, runs))} is damaged ({exc}); train that run "
                             "again with `python -m experiments.loso train`") from None
        per_seed = [auc(y, P[s].mean(axis=1)) for s in range(len(runs))]
        entry = {
            "n": len(sel), "n_melanoma": int(y.sum()),
            "per_seed_fused": per_seed,
            "mean_single_seed_fused": round(float(np.mean([e["auc"] for e in per_seed])), 4),
            "all_seeds_fused": auc(y, P.mean(axis=(0, 2))),
            "per_view_seed0": {v: auc(y, P[0, :, j]) for j, v in enumerate(views)},
            "per_view_all_seeds": {v: auc(y, P[:, :, j].mean(axis=0)) for j, v in enumerate(views)},
            "delta_vs_seed0": paired_delta(y, P.mean(axis=(0, 2)), P[0].mean(axis=1), n_boot),
        }
        result["roles"][role] = entry
    return result


def markdown(result: dict[str, Any]) -> str:
    """One Markdown table: a row per role."""
    def c(e):
        return f"{e['auc']:.3f} ({e['lo']:.3f}–{e['hi']:.3f})"

    k = len(result["runs"])
    views = result["views"]
    lines = [f"| images | n (mel) | seed 0 fused | each seed fused | {k} seeds fused | all minus seed 0 (paired 95% CI) | "
             + " | ".join(f"{v}: 1 → {k} seeds" for v in views) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(views)]
    for role, e in result["roles"].items():
        d = e["delta_vs_seed0"]
        each = ", ".join(f"{s['auc']:.3f}" for s in e["per_seed_fused"])
        per_view = " | ".join(f"{e['per_view_seed0'][v]['auc']:.3f} → {e['per_view_all_seeds'][v]['auc']:.3f}"
                              for v in views)
        lines.append(f"| {role} | {e['n']} ({e['n_melanoma']}) | {c(e['per_seed_fused'][0])} | {each} | "
                     f"{c(e['all_seeds_fused'])} | {d['delta']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f}) | {per_view} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table (and write it under ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.seeds", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="LOSO runs of one configuration, one per seed; the first is the reference")
    p.add_argument("--out", metavar="OUT", help="also write OUT/seeds.json and OUT/seeds.md")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = p.parse_args(argv)
    if args.boot < 1:
        p.error(f"--boot takes a whole number >= 1, got {args.boot}")
    return run_experiment(_run, args, p, tensorflow=False)


def _run(args: argparse.Namespace) -> int:
    """Compare the runs' seeds, print the table and keep it under ``--out``."""
    result = compare_seeds(args.runs, args.boot)
    table = markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "seeds.json", result)
        (out / "seeds.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
