"""Which part of the OOD gate sees which images, and how the branch scores are best combined, on a fused run.

    python -m experiments.ood_rules --run RUN --data DIR --out OUT [--per-kind 30] [--percentile 99.5]

Embeds, with the run's bundle, the images its gate is fitted and thresholded on (a seeded
subsample of ``GATE_MAX_TRAIN`` training images, as ``skinfusion fuse`` takes them; the
validation images), its test split, the seborrheic keratoses (near-OOD) and both parts of the
realistic far-OOD set (``experiments.farood``). It fits the gate with each rule of
``ensemble.ood.COMBINE_RULES`` on the same embeddings and reports, per image set, the share
flagged by the image-level checks alone, by the feature score alone (per rule), and by the gate
as a whole (per rule), with Wilson 95% intervals, and the median standardised distance of each
branch (what the scores of white-page text look like). Choose on the ``tuning`` part, report
the ``heldout`` part. Writes ``OUT/rules.json`` and ``OUT/rules.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import write_json_atomic
from colorspaces.image import read_image, resize_image
from colorspaces.quality import image_checks
from experiments.ood import _near_ood, _share

logger = logging.getLogger(__name__)


def _sets(run: str, data: str, per_kind: int) -> tuple[dict[str, list], dict[str, list[Any]]]:
    """``(fit, sets)``: gate-fitting paths (train, val), and per image set its items as (group, image)."""
    from experiments.farood import PARTS, realistic_far_ood
    from skinfusion.data.layouts import index_dataset
    from skinfusion.data.splits import load_split
    from skinfusion.workflows.fusing import GATE_MAX_TRAIN, held_out_ids

    assign, _ = load_split(run)
    records = index_dataset(data, log=False).records
    held = held_out_ids(Path(run))
    train = [r.path for r in records if assign.get(r.image_id) == "train" and r.image_id not in held]
    if len(train) > GATE_MAX_TRAIN:  # the subsample fit_run_gate takes (same seed)
        keep = np.random.default_rng(0).choice(len(train), GATE_MAX_TRAIN, replace=False)
        train = [train[i] for i in sorted(keep)]
    val = [r.path for r in records if assign.get(r.image_id) == "val" and r.image_id not in held]
    sets: dict[str, list[Any]] = {
        "test": [(r.source, r.path) for r in records if assign.get(r.image_id) == "test" and r.image_id not in held],
        "seborrheic_keratosis": [("SK", p) for p in _near_ood(Path(data))]}
    if held:
        sets["held_out_source"] = [(r.source, r.path) for r in records if r.image_id in held]
    for part in PARTS:
        sets[f"far_ood_{part}"] = list(realistic_far_ood(part, per_kind))
    return {"train": train, "val": val}, sets


def compare_rules(run: str, data: str, per_kind: int = 30, percentile: float | None = None) -> dict[str, Any]:
    """The report described in the module docstring, as a dict."""
    from ensemble import load_ensemble
    from ensemble.ood import COMBINE_RULES, fit_gate
    from skinfusion.data.cache import cached_images

    ens = load_ensemble(run)
    percentile = percentile if percentile is not None else (ens.gate.percentile if ens.gate else 99.5)
    fit, sets = _sets(run, data, per_kind)
    emb = {k: ens.embed(cached_images(paths, ens.load_size, desc=k)[0]) for k, paths in fit.items()}
    gates = {rule: fit_gate(emb["train"], emb["val"], percentile, combine=rule) for rule in COMBINE_RULES}
    result: dict[str, Any] = {"run": str(Path(run).resolve()), "percentile": percentile,
                              "n_fit": len(emb["train"][0]), "n_val": len(emb["val"][0]), "sets": {}}
    for name, items in sets.items():
        if not items:
            continue
        logger.info("scoring %s (%d images)", name, len(items))
        groups, reasons, E = [], [], []
        for i in range(0, len(items), 64):
            chunk = [(g, read_image(x)) for g, x in items[i : i + 64]]
            groups += [g for g, _ in chunk]
            reasons += [image_checks(img) for _, img in chunk]
            E.append(ens.embed(np.stack([resize_image(img, ens.load_size) for _, img in chunk])))
        E = [np.concatenate([e[j] for e in E]) for j in range(len(ens.models))]
        checks = np.array([bool(r) for r in reasons])
        z = (gates["max"].distances(E) - gates["max"].dist_mean) / gates["max"].dist_std  # same m_j, s_j per rule
        feats = {rule: g.score(E) > g.threshold for rule, g in gates.items()}
        out = {}
        for grp in sorted(set(groups)) + ["all"]:
            m = np.array([grp in ("all", g) for g in groups])
            out[grp] = {"checks": _share(checks[m]),
                        **{f"features_{r}": _share(f[m]) for r, f in feats.items()},
                        **{f"gate_{r}": _share(checks[m] | f[m]) for r, f in feats.items()},
                        "median_z": [float(v) for v in np.median(z[m], axis=0)]}
        result["sets"][name] = out
    result["views"] = list(ens.views)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The report as one Markdown table (shares flagged; 95% intervals for the whole gate)."""
    views = "/".join(result["views"])
    lines = [f"OOD gate rules on {result['run']} at the {result['percentile']:g}th validation percentile "
             f"(fitted on {result['n_fit']}, thresholded on {result['n_val']})", "",
             f"| set | group | n | image checks | features (sum) | features (max) | gate (sum) | gate (max) | "
             f"gate (max) 95% CI | median z {views} |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, groups in result["sets"].items():
        for grp, r in groups.items():
            ci = r["gate_max"]["ci95"]
            lines.append(f"| {name} | {grp} | {r['checks']['n']} | {r['checks']['flagged']:.3f} | "
                         f"{r['features_sum']['flagged']:.3f} | {r['features_max']['flagged']:.3f} | "
                         f"{r['gate_sum']['flagged']:.3f} | {r['gate_max']['flagged']:.3f} | {ci[0]:.3f}-{ci[1]:.3f} | "
                         + "/".join(f"{v:.1f}" for v in r["median_z"]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``OUT/rules.json`` and ``OUT/rules.md`` and print the table."""
    p = argparse.ArgumentParser(prog="python -m experiments.ood_rules", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, metavar="RUN", help="a fused run")
    p.add_argument("--data", required=True, metavar="DIR", help="the run's dataset")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--per-kind", type=int, default=30, help="realistic far-OOD images per kind and part (default 30)")
    p.add_argument("--percentile", type=float, help="validation percentile of the threshold (default: the run's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    result = compare_rules(args.run, args.data, args.per_kind, args.percentile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "rules.json", result)
    table = markdown(result)
    (out / "rules.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
