"""Which part of the OOD gate sees which images, and how the branch scores are best combined, on a fused run.

    python -m experiments.ood_rules --run RUN --data DIR --out OUT [--per-kind 30] [--percentile 99.5]
        [--sweep 99 99.9]

Embeds, with the run's bundle, the images its gate is fitted and thresholded on (a seeded
subsample of ``GATE_MAX_TRAIN`` training images, as ``skinfusion fuse`` takes them; the
validation images), its test split, the seborrheic keratoses (near-OOD), a leave-one-source-out
run's held-out source (grouped by its part of the split: ``split_val`` to choose on, ``split_test``
to report) and both parts of the realistic far-OOD set (``experiments.farood``). It fits the gate with each rule of
``ensemble.ood.COMBINE_RULES`` on the same embeddings and reports, per image set, the share
flagged by the image-level checks alone, by the feature score alone (per rule), and by the gate
as a whole (per rule), with Wilson 95% intervals, and the median standardised distance of each
branch (what the scores of white-page text look like). Choose on the ``tuning`` part, report
the ``heldout`` part. ``--sweep`` adds, for more validation percentiles (the same fitted gates,
only the threshold moves), the share each whole gate flags per set and group: the trade-off
between far-OOD recall and in-distribution or held-out-source flags. Writes ``OUT/rules.json``
and ``OUT/rules.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.image import read_image, resize_image
from colorspaces.quality import image_checks
from ensemble.ood import check_percentile
from experiments.common import add_set_arguments, run_report
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
        # Grouped by the held-out images' part of the grouped split: the percentile may be chosen
        # on the validation part, the test part is reported.
        sets["held_out_source"] = [(f"split_{assign.get(r.image_id, 'none')}", r.path)
                                   for r in records if r.image_id in held]
    for part in PARTS:
        sets[f"far_ood_{part}"] = list(realistic_far_ood(part, per_kind))
    return {"train": train, "val": val}, sets


def read_in_chunks(items: Sequence[tuple[str, Any]], load_size: int, chunk: int = 64):
    """Per chunk of ``(group, image)`` items: their groups, whether an image-level check flags each,
    and the images resized to ``load_size``. One chunk of full-size images is in memory at a time."""
    for i in range(0, len(items), chunk):
        imgs = [read_image(x) for _, x in items[i : i + chunk]]
        yield ([g for g, _ in items[i : i + chunk]], np.array([bool(image_checks(img)) for img in imgs]),
               np.stack([resize_image(img, load_size) for img in imgs]))


def compare_rules(run: str, data: str, per_kind: int = 30, percentile: float | None = None,
                  sweep: Sequence[float] = ()) -> dict[str, Any]:
    """The report described in the module docstring, as a dict (``sweep``: more percentiles to report)."""
    from ensemble import load_ensemble
    from ensemble.ood import COMBINE_RULES, fit_gate
    from skinfusion.data.cache import cached_images

    ens = load_ensemble(run)
    percentile = percentile if percentile is not None else (ens.gate.percentile if ens.gate else 99.5)
    fit, sets = _sets(run, data, per_kind)
    emb = {k: ens.embed(cached_images(paths, ens.load_size, desc=k)[0]) for k, paths in fit.items()}
    gates = {rule: fit_gate(emb["train"], emb["val"], percentile, combine=rule) for rule in COMBINE_RULES}
    sweep = sorted({float(check_percentile(q)) for q in sweep} - {float(percentile)})
    # The threshold is the percentile of the validation scores, so a sweep only moves it.
    cuts = {q: {rule: float(np.percentile(g.val_scores, q)) for rule, g in gates.items()} for q in sweep}
    result: dict[str, Any] = {"run": str(Path(run).resolve()), "percentile": percentile,
                              "n_fit": len(emb["train"][0]), "n_val": len(emb["val"][0]), "sets": {},
                              "sweep": {f"{q:g}": {} for q in sweep}}
    for name, items in sets.items():
        if not items:
            continue
        logger.info("scoring %s (%d images)", name, len(items))
        groups, checks, E = [], [], []
        for g, c, batch in read_in_chunks(items, ens.load_size):
            groups += g
            checks.append(c)
            E.append(ens.embed(batch))
        E = [np.concatenate([e[j] for e in E]) for j in range(len(ens.models))]
        checks = np.concatenate(checks)
        z = (gates["max"].distances(E) - gates["max"].dist_mean) / gates["max"].dist_std  # same m_j, s_j per rule
        scores = {rule: g.score(E) for rule, g in gates.items()}
        feats = {rule: scores[rule] > g.threshold for rule, g in gates.items()}
        for q, cut in cuts.items():
            result["sweep"][f"{q:g}"][name] = {
                grp: {f"gate_{rule}": _share((checks | (scores[rule] > cut[rule]))[m])
                      for rule in gates}
                for grp in sorted(set(groups)) + ["all"]
                for m in [np.array([grp in ("all", g) for g in groups])]}
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
    for q, sets in result.get("sweep", {}).items():
        lines += ["", f"Whole gate at the {q}th validation percentile (same fitted gates)", "",
                  "| set | group | n | gate (sum) | gate (sum) 95% CI | gate (max) |", "|---|---|---:|---:|---|---:|"]
        for name, groups in sets.items():
            for grp, r in groups.items():
                lo, hi = r["gate_sum"]["ci95"]
                lines.append(f"| {name} | {grp} | {r['gate_sum']['n']} | {r['gate_sum']['flagged']:.3f} | "
                             f"{lo:.3f}-{hi:.3f} | {r['gate_max']['flagged']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``OUT/rules.json`` and ``OUT/rules.md`` and print the table."""
    p = argparse.ArgumentParser(prog="python -m experiments.ood_rules", description=__doc__.splitlines()[0])
    add_set_arguments(p, "a fused run")
    p.add_argument("--percentile", type=float, help="validation percentile of the threshold (default: the run's)")
    p.add_argument("--sweep", type=float, nargs="+", default=[], metavar="P",
                   help="more validation percentiles (50-100) to report the whole gate at, e.g. --sweep 99 99.9")
    args = p.parse_args(argv)
    for flag, q in [("--percentile", args.percentile), *(("--sweep", q) for q in args.sweep)]:
        try:
            if q is not None:
                check_percentile(q)
        except ValueError:
            p.error(f"{flag} takes a validation percentile from 50 to 100, got {q:g}")
    return run_report(args, p, lambda: compare_rules(args.run, args.data, args.per_kind, args.percentile, args.sweep), "rules", markdown)


if __name__ == "__main__":
    sys.exit(main())
