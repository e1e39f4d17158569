"""Could another feature score meet both OOD goals? Layers, feature transforms, branch weights, and artefacts.

    python -m experiments.ood_variants --run RUN --data DIR --out OUT [--per-kind 30]
        [--percentiles 99.5 99.8 99.9]

On a fused leave-one-source-out run (``experiments.loso train``, then ``skinfusion fuse``), one
embedding pass takes, per branch, the gate's embedding (``gap``) and the global average of each
``reluK`` block's output, for the image sets of ``experiments.ood_rules`` (the gate's fitting
images, the test split, the held-out source by split part, both parts of the realistic far-OOD
set, the seborrheic keratoses). Each variant is a gate fitted by ``ensemble.ood.fit_gate`` on the
same images as ``skinfusion fuse`` fits it, with another feature score:

- ``gap`` (the current gate), ``gap, sqrt`` and ``gap, log1p`` (the post-ReLU features are skewed;
  a square root or a log makes them closer to normal, which Mahalanobis distances assume);
- distances at more than one layer (each layer of each branch a term of the sum);
- ``weights``: the standardised branch distances weighted (a 0.1 grid on the simplex) instead of
  summed, the weights and percentile chosen on the sets one may choose on (the far-OOD
  ``tuning`` part at >= 95% flagged, then the fewest held-out-source ``split_val`` flags). This
  is what outlier exposure in the gate's fit could reach at best, since it chooses with the
  outliers of the tuning part themselves.

Per variant and validation percentile it reports the share of each set the whole gate (image
checks or features) flags, and the ``frontier``: the held-out-source flags at the loosest
threshold that still flags 95% of the tuning part (not a usable threshold, which must come from
in-distribution validation scores, but the best trade-off a variant's score allows). It also
splits the held-out source's flags by whether an image carries a colour-disc sticker (the
dataset's visual review or ``skinfusion.data.audit.detect_colour_disc``). Choose on ``tuning`` and
``split_val``; report ``heldout`` and ``split_test``. Writes ``OUT/variants.json`` and
``OUT/variants.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.ood import DEFAULT_PERCENTILE, check_percentile
from experiments.common import add_set_arguments, run_report

logger = logging.getLogger(__name__)

FAR_GOAL = 0.95  # issue 28: at least this share of the realistic far-OOD set flagged
# name -> (layers, feature transform); every layer of every branch is one term of the sum
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "gap": (("gap",), "none"),
    "gap, sqrt": (("gap",), "sqrt"),
    "gap, log1p": (("gap",), "log1p"),
    "relu3 + gap": (("relu3", "gap"), "none"),
    "relu1..4 + gap": (("relu1", "relu2", "relu3", "relu4", "gap"), "none"),
}
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda a: a, "sqrt": lambda a: np.sqrt(np.maximum(a, 0.0)), "log1p": lambda a: np.log1p(np.maximum(a, 0.0))}
SETS = ("test", "held_out_source", "far_ood_tuning", "far_ood_heldout", "seborrheic_keratosis")


def _member_layers(model, name: str) -> list:
    """The layers called ``name`` in a branch: itself in a one-seed branch, ``m<k>_<name>`` of each
    member in a branch of several seeds (``train --seeds N``)."""
    own = [x for x in model.layers if x.name == name]
    found = [(int(mt[1]), x) for x in model.layers if (mt := re.fullmatch(rf"m(\d+)_{name}", x.name))]
    return own or [x for _, x in sorted(found, key=lambda t: t[0])]


def layer_heads(ens) -> tuple[list, list[str]]:
    """Per branch, a model from its input to the global average of each ``reluK`` output and ``gap``.

    In a branch of several seeds each ``reluK`` is its members' pooled maps side by side, as its
    ``gap`` (the gate's embedding) is.
    """
    import keras

    names = [n for n in ("relu1", "relu2", "relu3", "relu4") if all(_member_layers(m, n) for m in ens.models)]
    heads = []
    for m in ens.models:
        outs = []
        for n in names:
            pooled = [keras.layers.GlobalAveragePooling2D()(x.output) for x in _member_layers(m, n)]
            outs.append(pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled))
        heads.append(keras.Model(m.input, [*outs, m.get_layer("gap").output]))
    return heads, [*names, "gap"]


def embed_layers(ens, heads: list, names: list[str], images: np.ndarray) -> dict[str, list[np.ndarray]]:
    """``{layer: [per-branch n × d]}`` of RGB uint8 images at ``ens.load_size`` (BatchNorm in inference
    mode; sliding-window crops averaged per image, as the gate averages them)."""
    from colorspaces.pipeline import mean_over_windows

    parts: list[list[list[np.ndarray]]] = []
    for i in range(0, len(images), 128):
        inputs = ens.preprocess.branch_inputs(np.asarray(images[np.arange(i, min(len(images), i + 128))]))
        parts.append([[mean_over_windows(np.asarray(a, np.float64), k) for a in h(x, training=False)]
                      for h, (x, k) in zip(heads, inputs)])
    if not parts:
        return {n: [np.zeros((0, 0)) for _ in heads] for n in names}
    return {n: [np.concatenate([p[j][li] for p in parts]) for j in range(len(heads))] for li, n in enumerate(names)}


def disc_ids(data: str, items: Sequence[tuple[str, str]]) -> set[str]:
    """Ids of the images that carry a colour disc: the dataset's visual review, or the audit's detector."""
    from colorspaces.image import read_image
    from skinfusion.data.audit import detect_colour_disc

    found: set[str] = set()
    meta = Path(data) / "metadata.csv"
    if meta.is_file():
        with open(meta, newline="") as fh:
            found = {r["image_id"] for r in csv.DictReader(fh) if "colour_disc" in (r.get("artefact_visual_review") or "")}
    for _, path in items:
        if Path(path).stem not in found and detect_colour_disc(read_image(path))[0]:
            found.add(Path(path).stem)
    return found


def _terms(emb: dict[str, list[np.ndarray]], layers: Sequence[str], transform: str) -> list[np.ndarray]:
    return [TRANSFORMS[transform](E) for layer in layers for E in emb[layer]]


def _rate(flags: np.ndarray) -> float:
    return round(float(np.mean(flags)), 4) if len(flags) else float("nan")


def evaluate(fit: dict[str, dict], sets: dict[str, dict], percentiles: Sequence[float]) -> dict[str, Any]:
    """Per variant: the share flagged per set and percentile, and the frontier (see the module docstring).

    ``fit``: ``{"train"|"val": embeddings}``; ``sets``: ``{name: {"emb", "checks", "groups"}}``.
    """
    from ensemble.ood import fit_gate

    out: dict[str, Any] = {}

    def rates(score: Callable[[str], np.ndarray], cut: float) -> dict[str, float]:
        r = {}
        for name, s in sets.items():
            flagged = (score(name) > cut) | s["checks"]
            if name == "held_out_source":
                for part in ("split_val", "split_test"):
                    r[f"held_out_{part}"] = _rate(flagged[s["groups"] == part])
            else:
                r[name] = _rate(flagged)
        return r

    def frontier(score: Callable[[str], np.ndarray]) -> dict[str, float]:
        far = sets["far_ood_tuning"]
        misses = np.sort(score("far_ood_tuning")[~far["checks"]])
        allowed = int(np.floor((1 - FAR_GOAL) * len(far["checks"])))
        cut = misses[allowed] - 1e-9 if allowed < len(misses) else -np.inf
        return {"val_flagged": _rate(score("val") > cut), **rates(score, cut)}

    for name, (layers, transform) in VARIANTS.items():
        gate = fit_gate(_terms(fit["train"], layers, transform), _terms(fit["val"], layers, transform))
        cache = {k: gate.score(_terms(s["emb"], layers, transform)) for k, s in sets.items()}
        cache["val"] = gate.val_scores

        def score(k: str, cache=cache) -> np.ndarray:
            return cache[k]

        out[name] = {"by_percentile": {f"{q:g}": rates(score, float(np.percentile(gate.val_scores, q)))
                                       for q in percentiles}, "frontier": frontier(score)}
    # Branch weights instead of an equal sum: chosen on the tuning part and split_val only.
    base = fit_gate(fit["train"]["gap"], fit["val"]["gap"])
    z = {k: (base.distances(s["emb"]["gap"]) - base.dist_mean) / base.dist_std for k, s in sets.items()}
    z["val"] = (base.distances(fit["val"]["gap"]) - base.dist_mean) / base.dist_std
    best = None
    for w in _simplex(z["val"].shape[1], 10):
        for q in percentiles:
            cut = float(np.percentile(z["val"] @ w, q))
            r = rates(lambda k, w=w: z[k] @ w, cut)
            if r["far_ood_tuning"] >= FAR_GOAL and (best is None or r["held_out_split_val"] < best[2]["held_out_split_val"]):
                best = (w, q, r)
    out["weights"] = ({"weights": [round(float(x), 2) for x in best[0]], "percentile": best[1], "chosen": best[2]}
                      if best else {"weights": None, "note": f"no weights flag {FAR_GOAL:.0%} of the tuning part"})
    return out


def _simplex(k: int, steps: int) -> list[np.ndarray]:
    """Every weight vector of ``k`` non-negative multiples of ``1 / steps`` that sum to one."""
    return [np.array(c, np.float64) / steps for c in _compositions(k, steps)]


def _compositions(k: int, n: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [(i, *c) for i in range(n + 1) for c in _compositions(k - 1, n - i)]


def run_variants(run: str, data: str, per_kind: int = 30, percentiles: Sequence[float] = (DEFAULT_PERCENTILE,)) -> dict[str, Any]:
    """Embed the sets once and evaluate every variant (the report of the module docstring, as a dict)."""
    from ensemble import load_ensemble
    from experiments.ood_rules import _sets, read_in_chunks
    from skinfusion.data.cache import cached_images

    ens = load_ensemble(run)
    heads, names = layer_heads(ens)
    fit_paths, set_items = _sets(run, data, per_kind)
    fit = {k: embed_layers(ens, heads, names, cached_images(p, ens.load_size, desc=k)[0]) for k, p in fit_paths.items()}
    sets: dict[str, dict] = {}
    for name in SETS:
        items = set_items.get(name, [])
        if not items:
            continue
        logger.info("embedding %s (%d images)", name, len(items))
        chunks = [(g, c, embed_layers(ens, heads, names, batch)) for g, c, batch in read_in_chunks(items, ens.load_size)]
        sets[name] = {"emb": {n: [np.concatenate([e[n][j] for _, _, e in chunks]) for j in range(len(heads))]
                              for n in names},
                      "checks": np.concatenate([c for _, c, _ in chunks]),
                      "groups": np.array([g for gs, _, _ in chunks for g in gs])}
    if "held_out_source" not in sets:
        raise SystemExit(f"{run}: no held-out source; train it with `python -m experiments.loso train`")
    result: dict[str, Any] = {"run": str(Path(run).resolve()), "layers": names, "far_goal": FAR_GOAL,
                              "variants": evaluate(fit, sets, percentiles)}
    # Which held-out images the default gate flags: with a colour-disc sticker or without.
    from ensemble.ood import fit_gate

    gate = fit_gate(fit["train"]["gap"], fit["val"]["gap"])
    held = sets["held_out_source"]
    discs = disc_ids(data, set_items["held_out_source"])
    has_disc = np.array([Path(p).stem in discs for _, p in set_items["held_out_source"]])
    score = gate.score(held["emb"]["gap"])
    result["held_out_by_disc"] = {
        f"{q:g}": {part: {kind: {"n": int(m.sum()), "flagged": _rate((score > cut)[m] | held["checks"][m])}
                          for kind, m in (("colour_disc", sel & has_disc), ("no_disc", sel & ~has_disc))}
                   for part in ("split_val", "split_test") for sel in [held["groups"] == part]}
        for q in percentiles for cut in [float(np.percentile(gate.val_scores, q))]}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    cols = ["test", "held_out_split_val", "held_out_split_test", "far_ood_tuning", "far_ood_heldout",
            "seborrheic_keratosis"]
    head = "| variant | percentile | " + " | ".join(cols) + " |"
    lines = [f"OOD gate variants on {result['run']}: share flagged by the whole gate (image checks or features)", "",
             head, "|---|---|" + "---:|" * len(cols)]
    for name, v in result["variants"].items():
        if name == "weights":
            continue
        for q, r in v["by_percentile"].items():
            lines.append(f"| {name} | {q} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")
        f = v["frontier"]
        lines.append(f"| {name} | frontier (val {f['val_flagged']:.4f}) | "
                     + " | ".join(f"{f.get(c, float('nan')):.3f}" for c in cols) + " |")
    w = result["variants"]["weights"]
    if w.get("weights"):
        r = w["chosen"]
        lines.append(f"| weights {w['weights']} (chosen on tuning, split_val) | {w['percentile']:g} | "
                     + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")
    lines += ["", "Held-out source flagged by the default gate, by colour-disc sticker", "",
              "| percentile | part | colour disc (n) | flagged | no disc (n) | flagged |", "|---|---|---:|---:|---:|---:|"]
    for q, parts in result["held_out_by_disc"].items():
        for part, r in parts.items():
            lines.append(f"| {q} | {part} | {r['colour_disc']['n']} | {r['colour_disc']['flagged']:.3f} | "
                         f"{r['no_disc']['n']} | {r['no_disc']['flagged']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``OUT/variants.json`` and ``OUT/variants.md`` and print the tables."""
    p = argparse.ArgumentParser(prog="python -m experiments.ood_variants", description=__doc__.splitlines()[0])
    add_set_arguments(p, "a fused leave-one-source-out run")
    p.add_argument("--percentiles", type=float, nargs="+", default=[99.5, 99.8, 99.9], metavar="P",
                   help="validation percentiles of the threshold (50-100; default 99.5 99.8 99.9)")
    args = p.parse_args(argv)
    for q in args.percentiles:
        try:
            check_percentile(q)
        except ValueError:
            p.error(f"--percentiles takes validation percentiles from 50 to 100, got {q:g}")
    return run_report(args, p, lambda: run_variants(args.run, args.data, args.per_kind, args.percentiles), "variants", markdown)


if __name__ == "__main__":
    sys.exit(main())
