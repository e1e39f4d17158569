"""Evaluate a fused run's out-of-distribution gate: far-OOD, near-OOD, and the share flagged per source.

    python -m experiments.ood --run RUN --data DIR --out OUT [--holdout-ids FILE]
    python -m experiments.ood --checks-only --data DIR --out OUT

* ``--checks-only``: no model; the share of images each image-level check
  (``colorspaces.quality.image_checks``) flags, per source of ``DIR``, for the seborrheic
  keratoses, and per kind of both parts of the realistic far-OOD set (``experiments.farood``).

* **in-distribution**: the run's test split (images of ``DIR`` whose id the run's ``splits.csv``
  puts in ``test``); the gate never saw them (it is fitted on training images and thresholded on
  validation images).
* **realistic far-OOD**: the held-out part of ``experiments.farood`` (text, code, charts,
  screenshots, scenes, clinical-like skin, figures on white pages), per kind, with the share
  caught by the image-level checks and by the feature gate.
* **far-OOD**: about 100 images generated on the fly with a seed (``far_ood_images``): scikit-learn's
  sample photographs and random crops of them, rendered text, synthetic screenshots (rectangles,
  bars and text drawn with OpenCV), noise, uniform colours and grey photographs.
* **near-OOD**: the seborrheic keratoses listed in ``DIR/labels_seborrheic_keratosis.csv``
  (``image_id,label,source``; images in ``DIR/images/<id>.jpg``): dermoscopy of another lesion type.

Reported: AUROC of the gate's feature score (OOD = positive; an image failing an image-level check
counts as +inf) against the in-distribution test images, the false-positive rate at 95% true-positive
rate, and the share the gate flags (``out_of_distribution``) per set, per far-OOD kind, per source of
the test split and per source of the ``--holdout-ids`` images (one image id per line: a source held
out from training, e.g. by ``experiments.loso``). Prints a Markdown table; writes ``OUT/ood.json``
and ``OUT/ood.md``. A few minutes on 2 CPU cores for a run at 96 px.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from colorspaces.files import write_json_atomic
from experiments.common import run_experiment
from skinfusion.data.layouts import index_dataset
from skinfusion.data.splits import load_split

logger = logging.getLogger(__name__)

SK_FILE = "labels_seborrheic_keratosis.csv"
# Share of each far-OOD kind in the generated set.
KINDS = {"photo": 0.04, "photo_crop": 0.26, "text": 0.14, "screenshot": 0.14, "noise": 0.14, "uniform": 0.12,
         "grey": 0.16}
_WORDS = ("Invoice", "Total 42.00", "Hello world", "skinfusion", "Lorem ipsum", "OK", "Cancel", "2024-05-01")


def _side(rng: np.random.Generator) -> tuple[int, int]:
    """A plausible upload size: 96-480 px, aspect up to 16:9 (inside the image-level limits)."""
    h = int(rng.integers(96, 481))
    return h, int(min(3 * h - 1, round(h * rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))))


def _text(rng: np.random.Generator) -> np.ndarray:
    h, w = _side(rng)
    img = np.full((h, w, 3), rng.integers(150, 256, 3), np.uint8)
    for k in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 120, 3))
        org = (int(rng.integers(0, max(1, w // 3))), int((k + 1) * h / 8 + rng.integers(0, 10)))
        cv2.putText(img, str(rng.choice(_WORDS)), org, cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.5, 1.5)), colour,
                    int(rng.integers(1, 3)))
    return img


def _screenshot(rng: np.random.Generator) -> np.ndarray:
    h, w = _side(rng)
    img = np.full((h, w, 3), rng.integers(200, 256), np.uint8)
    cv2.rectangle(img, (0, 0), (w, h // 10), tuple(int(c) for c in rng.integers(30, 200, 3)), -1)  # title bar
    for _ in range(int(rng.integers(3, 9))):  # panels and buttons
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(h // 10, h - 20))
        x1, y1 = int(min(w, x0 + rng.integers(20, w // 2))), int(min(h, y0 + rng.integers(10, h // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, int(rng.choice([-1, 1, 2])))  # -1: filled
        cv2.putText(img, str(rng.choice(_WORDS)), (x0 + 3, min(h - 2, y0 + 14)), cv2.FONT_HERSHEY_PLAIN, 1.0,
                    (0, 0, 0), 1)
    return img


def far_ood_images(n: int = 100, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``n`` generated far-OOD RGB uint8 images as ``(kind, image)``, the kinds in ``KINDS`` proportions.

    The photographs are scikit-learn's two bundled sample images (no download).
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    counts = {k: round(share * n) for k, share in KINDS.items()}
    counts["photo_crop"] += n - sum(counts.values())
    out: list[tuple[str, np.ndarray]] = []
    for kind, count in counts.items():
        for i in range(count):
            photo = photos[i % len(photos)]
            if kind == "photo":
                img = photo
            elif kind in ("photo_crop", "grey"):
                h, w = _side(rng)
                h, w = min(h, photo.shape[0]), min(w, photo.shape[1])
                y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
                img = photo[y : y + h, x : x + w]
                if kind == "grey":
                    img = np.repeat(cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
            elif kind == "text":
                img = _text(rng)
            elif kind == "screenshot":
                img = _screenshot(rng)
            elif kind == "noise":
                img = rng.integers(0, 256, (*_side(rng), 3), dtype=np.uint8)
            else:  # uniform, with the faint noise of a camera
                img = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 1.0, (*_side(rng), 3)), 0, 255).astype(np.uint8)
            out.append((kind, np.ascontiguousarray(img)))
    return out


def _score(ens, images: Sequence[Any], batch_size: int) -> dict[str, np.ndarray]:
    """Per image: the feature score (+inf when an image-level check failed) and the gate's flag."""
    details = []
    for i in range(0, len(images), batch_size):
        details += ens.details(list(images[i : i + batch_size]), batch_size=batch_size)
    score = np.array([np.inf if set(d.ood_reasons) - {"atypical_features"} else d.ood_distance for d in details],
                     dtype=np.float64)
    return {"score": score, "flagged": np.array([bool(d.out_of_distribution) for d in details])}


def detection(ood_score: np.ndarray, ind_score: np.ndarray) -> dict[str, float]:
    """AUROC (OOD positive) and the in-distribution false-positive rate at 95% OOD true-positive rate."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(ood_score)), np.zeros(len(ind_score))]
    s = np.nan_to_num(np.r_[ood_score, ind_score], posinf=1e12)  # roc_auc_score refuses inf; order is kept
    cut = np.quantile(s[: len(ood_score)], 0.05, method="lower")  # flag >= cut catches >= 95% of OOD
    return {"auroc": float(roc_auc_score(y, s)), "fpr_at_95tpr": float((s[len(ood_score) :] >= cut).mean())}


def _by(groups: Sequence[str], flagged: np.ndarray) -> dict[str, dict[str, float]]:
    """``{group: {n, flagged}}``: the share flagged among the images of each group."""
    out = {}
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        out[g] = {"n": int(m.sum()), "flagged": float(flagged[m].mean())}
    return out


def _near_ood(data: Path) -> list[str]:
    path = data / SK_FILE
    if not path.is_file():
        logger.warning("%s: missing, so no near-OOD set", path)
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        paths = [str(data / "images" / f"{row['image_id']}.jpg") for row in csv.DictReader(fh)]
    return [p for p in paths if Path(p).is_file()]


def _share(flags: Sequence[bool]) -> dict[str, Any]:
    """``{n, flagged, ci95}``: the share of True with its Wilson 95% interval."""
    from scipy.stats import binomtest

    n, k = len(flags), int(np.sum(flags))
    if not n:
        return {"n": 0, "flagged": float("nan"), "ci95": [float("nan"), float("nan")]}
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return {"n": n, "flagged": k / n, "ci95": [float(ci.low), float(ci.high)]}


def check_rates(data: str, per_kind: int = 30) -> dict[str, Any]:
    """Image-level checks only (no model): the share flagged per source of ``data``, SK and far-OOD kind."""
    from colorspaces.image import read_image
    from colorspaces.quality import REASONS, image_checks
    from experiments.farood import PARTS, realistic_far_ood

    new = {"uniform_area", "text_like"}  # the checks added for issue 28

    def summary(groups: Sequence[str], reasons: Sequence[tuple[str, ...]]) -> dict[str, Any]:
        out = {}
        for g in sorted(set(groups)):
            rs = [r for x, r in zip(groups, reasons) if x == g]
            out[g] = {**_share([bool(r) for r in rs]), "new_checks": _share([bool(new & set(r)) for r in rs])["flagged"],
                      "per_reason": {k: sum(k in r for r in rs) for k in REASONS}}
        return out

    records = index_dataset(data, log=False).records
    logger.info("image-level checks on %d images of %s", len(records), data)
    result = {"dermoscopy": summary([r.source for r in records], [image_checks(read_image(r.path)) for r in records])}
    sk = _near_ood(Path(data))
    result["near_ood"] = summary(["seborrheic_keratosis"] * len(sk), [image_checks(read_image(p)) for p in sk])
    for part in PARTS:
        kinds, reasons = zip(*((k, image_checks(img)) for k, img in realistic_far_ood(part, per_kind)))
        result[f"far_ood_{part}"] = summary(kinds, reasons)
        result[f"far_ood_{part}"]["all"] = summary(["all"] * len(kinds), reasons)["all"]
    return result


def checks_markdown(result: dict[str, Any]) -> str:
    """``check_rates`` as a Markdown table: one row per group, with the 95% interval and the new checks' share."""
    lines = ["| set | group | n | flagged | 95% CI | by uniform_area/text_like |", "|---|---|---:|---:|---|---:|"]
    for name, groups in result.items():
        for g, r in groups.items():
            lines.append(f"| {name} | {g} | {r['n']} | {r['flagged']:.4f} | {r['ci95'][0]:.4f}-{r['ci95'][1]:.4f} | "
                         f"{r['new_checks']:.4f} |")
    return "\n".join(lines)


def evaluate_gate(run: str, data: str, holdout_ids: str | None = None, n_far: int = 100, seed: int = 0,
                  batch_size: int = 64, per_kind: int = 30) -> dict[str, Any]:
    """The gate's report on a fused run (see the module docstring)."""
    from ensemble import load_ensemble

    ens = load_ensemble(run)
    if ens.gate is None:
        raise SystemExit(f"{run}: this ensemble has no OOD gate; re-run `skinfusion fuse --run {run}` first")
    assign, _ = load_split(run)
    records = index_dataset(data, log=False).records
    ids = set() if not holdout_ids else {ln.strip() for ln in Path(holdout_ids).read_text().splitlines() if ln.strip()}
    # A held-out source's test images are not in-distribution: they are reported on their own.
    test = [r for r in records if assign.get(r.image_id) == "test" and r.image_id not in ids]
    if not test:
        raise SystemExit(f"{data}: none of its images is in the test split of {run}; is it the run's dataset?")
    logger.info("scoring %d in-distribution test images", len(test))
    ind = _score(ens, [r.path for r in test], batch_size)
    far = far_ood_images(n_far, seed)
    far_s = _score(ens, [img for _, img in far], batch_size)
    from experiments.farood import realistic_far_ood

    real = list(realistic_far_ood("heldout", per_kind))
    real_s = _score(ens, [img for _, img in real], batch_size)
    near_paths = _near_ood(Path(data))
    logger.info("scoring %d far-OOD and %d near-OOD images", len(far), len(near_paths))
    result: dict[str, Any] = {
        "run": str(Path(run).resolve()), "percentile": ens.gate.percentile, "threshold": ens.gate.threshold,
        "n_fit": ens.gate.n_fit, "n_val": len(ens.gate.val_scores),
        "val_pass_rate": float((ens.gate.val_scores <= ens.gate.threshold).mean()),
        "in_distribution_test": {"n": len(test), "flagged": float(ind["flagged"].mean()),
                                 "per_source": _by([r.source for r in test], ind["flagged"])},
        "far_ood": {"n": len(far), "flagged": float(far_s["flagged"].mean()), **detection(far_s["score"], ind["score"]),
                    "per_kind": _by([k for k, _ in far], far_s["flagged"])},
        "realistic_far_ood": {"n": len(real), "flagged": float(real_s["flagged"].mean()),
                              **detection(real_s["score"], ind["score"]),
                              "per_kind": _by([k for k, _ in real], real_s["flagged"])},
    }
    if near_paths:
        near = _score(ens, near_paths, batch_size)
        result["near_ood"] = {"n": len(near_paths), "flagged": float(near["flagged"].mean()),
                              **detection(near["score"], ind["score"])}
    sets = {"in_distribution_test": ind["score"], "far_ood": far_s["score"], "realistic_far_ood": real_s["score"]}
    if near_paths:
        sets["near_ood"] = near["score"]
    if holdout_ids:
        held = [r for r in records if r.image_id in ids]
        logger.info("scoring %d held-out images of %d listed", len(held), len(ids))
        h = _score(ens, [r.path for r in held], batch_size)
        result["holdout"] = {"n": len(held), "flagged": float(h["flagged"].mean()) if held else float("nan"),
                             "per_source": _by([r.source for r in held], h["flagged"])}
        sets["holdout"] = h["score"]
    # What other percentiles of the validation scores would flag: the default is chosen from this
    # table (a held-out source's dermoscopy must not be rejected wholesale).
    result["by_percentile"] = {
        f"{q:g}": {name: float((sc > np.percentile(ens.gate.val_scores, q)).mean()) for name, sc in sets.items()}
        for q in (90, 95, 97.5, 99, 99.5, 99.9)}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table: one row per image set, with AUROC and FPR@95%TPR where defined."""
    head = (f"OOD gate of {result['run']}: {result['percentile']:g}th percentile (threshold "
            f"{result['threshold']:.3f}; fitted on {result['n_fit']} training images, validation pass rate "
            f"{result['val_pass_rate']:.3f} of {result['n_val']})")
    lines = [head, "",
             "| set | n | flagged | AUROC | FPR@95%TPR |", "|---|---:|---:|---:|---:|"]

    def row(name: str, r: dict[str, Any]) -> None:
        auc = f"{r['auroc']:.3f}" if "auroc" in r else ""
        fpr = f"{r['fpr_at_95tpr']:.3f}" if "fpr_at_95tpr" in r else ""
        lines.append(f"| {name} | {r['n']} | {r['flagged']:.3f} | {auc} | {fpr} |")

    row("in-distribution test", result["in_distribution_test"])
    for src, r in result["in_distribution_test"]["per_source"].items():
        row(f"  test source {src}", r)
    row("far-OOD (generated)", result["far_ood"])
    for kind, r in result["far_ood"]["per_kind"].items():
        row(f"  far-OOD {kind}", r)
    row("realistic far-OOD (held-out part)", result["realistic_far_ood"])
    for kind, r in result["realistic_far_ood"]["per_kind"].items():
        row(f"  realistic {kind}", r)
    if "near_ood" in result:
        row("near-OOD (seborrheic keratosis)", result["near_ood"])
    if "holdout" in result:
        row("held-out ids", result["holdout"])
        for src, r in result["holdout"]["per_source"].items():
            row(f"  held-out source {src}", r)
    names = list(next(iter(result["by_percentile"].values())))
    lines += ["", "| validation percentile | " + " | ".join(f"{n} flagged" for n in names) + " |",
              "| ---: | " + " | ".join("---:" for _ in names) + " |"]
    for q, shares in result["by_percentile"].items():
        lines.append(f"| {q} | " + " | ".join(f"{shares[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate the gate of ``--run`` and write ``OUT/ood.json`` and ``OUT/ood.md``."""
    p = argparse.ArgumentParser(prog="python -m experiments.ood", description=__doc__.splitlines()[0])
    p.add_argument("--run", metavar="RUN", help="a run fused with an OOD gate (required without --checks-only)")
    p.add_argument("--checks-only", action="store_true", help="only the image-level checks, on every image of --data")
    p.add_argument("--per-kind", type=int, default=30, help="realistic far-OOD images per kind and part (default 30)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help=f"the run's dataset (test split) holding {SK_FILE} and images/ for the near-OOD set")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for ood.json and ood.md")
    p.add_argument("--holdout-ids", metavar="FILE", help="image ids (one per line) of a source held out from training")
    p.add_argument("--n-far", type=int, default=100, help="generated far-OOD images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the far-OOD images (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if not args.checks_only and not args.run:
        p.error("--run is required (or --checks-only)")
    return run_experiment(_run, args, p, tensorflow=not args.checks_only)


def _run(args: argparse.Namespace) -> int:
    """The checks or the whole gate; write ``OUT/<name>.json`` and ``.md`` and print the table."""
    out = Path(args.out)
    if args.checks_only:
        result = check_rates(args.data, args.per_kind)
        table, name = checks_markdown(result), "checks"
    else:
        result = evaluate_gate(args.run, args.data, args.holdout_ids, args.n_far, args.seed, args.batch_size,
                               args.per_kind)
        table, name = markdown(result), "ood"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
