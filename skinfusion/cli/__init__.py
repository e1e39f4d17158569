"""The ``skinfusion`` command line: thin ``main(argv) -> int`` functions over the pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

# TensorFlow's C++ start-up chatter (including a harmless cuInit error on CPU-only machines)
# drowns the progress lines; Python exceptions still surface. Users can override it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VIEW_NAMES = ("rgb", "hsv", "fft")
EXIT_OK, EXIT_ERROR, EXIT_SKIPPED = 0, 2, 1

logger = logging.getLogger("skinfusion")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings, errors and results")


def _run_guarded(fn, args) -> int:
    try:
        return fn(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"skinfusion: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


# ---------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion train``."""
    p = argparse.ArgumentParser(prog="skinfusion train", description="Train one branch (or all three) on a run's split.")
    p.add_argument("--view", required=True, choices=[*VIEW_NAMES, "all"], help="which view's branch to train; 'all' trains rgb, hsv, fft in turn")
    p.add_argument("--data", required=True, help="dataset folder: labels.csv + images/ (+ optional metadata.csv with group_id)")
    p.add_argument("--run", required=True, help="run directory; its split (splits.csv) is made on first use and reused")
    p.add_argument("--config", help="JSON file of branch config defaults; explicit flags override it")
    p.add_argument("--image-size", type=int, help="square input side in pixels (default 96)")
    p.add_argument("--base-filters", type=int, help="filters of the first conv layer, doubled per layer (default 16)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 30)")
    p.add_argument("--patience", type=int, help="early-stopping patience on validation AUC (default 8)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 32)")
    p.add_argument("--learning-rate", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--dropout", type=float, help="dropout before the output layer (default 0.3)")
    p.add_argument("--class-weight", choices=["balanced", "none"],
                   help="class-imbalance handling by loss weights (default none; pair balanced with --sampling none)")
    p.add_argument("--sampling", choices=["none", "undersample", "oversample"],
                   help="per-epoch class balancing by resampling (default oversample: every nevus, melanomas drawn "
                        "with replacement to the same count)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="disable random flips and 90° rotations")
    p.add_argument("--rotate-degrees", type=float, help="augmentation: random rotation by up to +/- this many degrees (default 0, off)")
    p.add_argument("--scale-jitter", type=float, help="augmentation: random zoom by a factor in 1 +/- this (default 0, off)")
    p.add_argument("--color-jitter", type=float,
                   help="augmentation: brightness +/- 64j levels, contrast x(1 +/- j), hue +/- 30j OpenCV units (default 0, off)")
    p.add_argument("--color-constancy", choices=["none", "shades_of_gray"],
                   help="preprocessing before the view, in training and inference (default none)")
    p.add_argument("--crop-scale", type=float,
                   help="sliding-window crops: resize to image-size x this (1-2), train on random image-size windows, "
                        "average a grid of windows at inference (default 1, off)")
    p.add_argument("--crop-stride", type=int,
                   help="pixels between the inference windows (default 0: (load - image size) // 2, a 3x3 grid)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="adam, or sgd with Nesterov momentum 0.9 (default adam)")
    p.add_argument("--weight-decay", type=float,
                   help="decoupled weight decay: each step scales every weight by 1 - this x learning rate "
                        "(Adam becomes AdamW; default 0, off)")
    p.add_argument("--lr-schedule", choices=["none", "cosine", "plateau"],
                   help="cosine decay over the epochs, or halve on a 2-epoch validation-AUC plateau (default cosine)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the run's split, used only when the split is created (default 0)")
    p.add_argument("--exclude-artefacts", action="store_true",
                   help="drop images flagged with a colour disc or ink from training (validation and test keep them)")
    p.add_argument("--audit", metavar="FILE",
                   help="audit CSV from `skinfusion audit` for --exclude-artefacts (default: audit the data now, saved as RUN/audit.csv)")
    p.add_argument("--dedup-split", action="store_true",
                   help="when the run's split is created, also group images whose perceptual hashes are near-identical")
    p.add_argument("--limit", type=int, help="use a stratified, grouped subset of about N images (quick runs; fixed at split creation)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    p.add_argument("--jobs", type=int,
                   help="with --view all: branches trained at once, each in its own process with cores/N TensorFlow "
                        "threads (default: one process per branch, which measured fastest on 2 cores; 1 = one after "
                        "another in this process, less memory; see the README's Performance section)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: each branch resumes from its last completed epoch "
                        "(checkpointed in RUN/branches/<view>/.checkpoint); finished branches are kept")
    p.add_argument("--cache-dir", help="where decoded, resized images are cached between branches and runs "
                                       "(default $SKINFUSION_CACHE or ~/.cache/skinfusion)")
    _common(p)
    return p


def _train(args) -> int:
    from skinfusion.workflows.training import read_config_file, train_branches
    from models import BranchConfig

    base = read_config_file(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BranchConfig)
                 if f.name != "view" and getattr(args, f.name, None) is not None}
    views = VIEW_NAMES if args.view == "all" else (args.view,)
    if args.limit is not None and args.limit < 40:
        raise ValueError(f"--limit must be at least 40 images to leave both classes in every split, got {args.limit}")
    exclude = None
    if args.exclude_artefacts:
        from skinfusion.workflows.auditing import audit_dataset, read_audit_flags

        audit_csv = args.audit
        if audit_csv is None:
            audit_csv = str(Path(args.run) / "audit.csv")
            if not Path(audit_csv).is_file():
                audit_dataset(args.data, audit_csv, workers=args.workers, hash_pairs=False)
        flags = read_audit_flags(audit_csv)
        exclude = flags["colour_disc"] | flags["ink"]
        print(f"excluding up to {len(exclude)} artefact-flagged images from training ({audit_csv})")
    elif args.audit:
        raise ValueError("--audit is only used with --exclude-artefacts")
    configs = [BranchConfig.from_dict({**base, **overrides, "view": view}) for view in views]
    jobs = args.jobs if args.jobs is not None else len(configs)
    summaries = train_branches(args.data, args.run, configs, jobs=jobs, split_seed=args.split_seed,
                               limit=args.limit, workers=args.workers, dedup=args.dedup_split,
                               exclude_ids=exclude, cache_dir=args.cache_dir, resume=args.resume)
    skipped = 0
    for summary in summaries:
        v = summary["validation"]
        print(f"{summary['view']}: validation AUC {v['auc']:.4f} [{v['auc_ci95'][0]:.3f}, {v['auc_ci95'][1]:.3f}], "
              f"trained in {summary['train_seconds']:.0f}s, peak RSS {summary['peak_rss_mb']:.0f} MB -> {summary['branch_dir']}")
        skipped += summary["skipped"]
    if skipped:
        print(f"warning: {skipped} unreadable images were skipped (see skipped.csv in each branch)", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def train_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion train``: train a branch and save it under ``RUN/branches/<view>/``."""
    args = train_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_train, args)


# ---------------------------------------------------------------- fuse
def fuse_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion fuse``."""
    p = argparse.ArgumentParser(prog="skinfusion fuse", description="Fit the fusion on the branches' validation probabilities.")
    p.add_argument("--run", required=True, help="run directory with trained branches")
    p.add_argument("--method", default="mean", choices=["mean", "stack"],
                   help="mean: average the branch probabilities; stack: logistic regression on their log-odds (default mean)")
    p.add_argument("--views", default=",".join(VIEW_NAMES), help="comma-separated branches to fuse, in order (default rgb,hsv,fft)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="stack only: fit the stacker on out-of-fold probabilities of the training split, training "
                        "each branch K more times (in RUN/oof/; resumable) instead of on the validation split "
                        "(default 0: fit on validation)")
    p.add_argument("--jobs", type=int, default=None,
                   help="with --folds: parallel training processes per fold (default one per branch)")
    p.add_argument("--metadata", default="", metavar="FIELDS",
                   help="stack only: also give the stacker these per-image metadata fields, comma-separated from "
                        "age, sex, site, read from the run's dataset (metadata.csv, isic-cli or HAM10000 columns); "
                        "unknown values are allowed. Every prediction then takes them (predict --metadata CSV, "
                        "predict(image, metadata={...})). Default: images only")
    _common(p)
    return p


def _fuse(args) -> int:
    from skinfusion.workflows.tables import format_table
    from skinfusion.workflows.fusing import fuse_run

    views = [v.strip() for v in args.views.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEW_NAMES]
    if bad or not views:
        raise ValueError(f"--views takes names from {list(VIEW_NAMES)}, got {args.views!r}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    result = fuse_run(args.run, args.method, views, folds=args.folds, jobs=args.jobs, metadata=args.metadata)
    with_meta = f" with metadata {', '.join(result['metadata'])}" if result["metadata"] else ""
    print(f"fusion '{args.method}'{with_meta} written to {result['ensemble_dir']}; threshold {result['threshold']:.4f} "
          "(chosen on validation)")
    fit = result.get("stack_fit", {})
    if fit.get("folds"):
        print(f"stacker fitted on {fit['n_images']} out-of-fold training images ({fit['folds']} folds); validation AUC "
              f"{fit['val_auc_oof_stacker']:.4f} vs {fit['val_auc_val_stacker_cv']:.4f} for a stacker fitted on "
              f"validation (cross-validated)")
    print("validation metrics (not a test result):")
    print(format_table(result["validation"]))
    return EXIT_OK


def fuse_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion fuse``: write ``RUN/ensemble/`` (manifest.json + fusion.joblib)."""
    args = fuse_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_fuse, args)


# ---------------------------------------------------------------- evaluate
def evaluate_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion evaluate``."""
    p = argparse.ArgumentParser(prog="skinfusion evaluate", description="Score the run's test split, or every image of another labelled folder.")
    p.add_argument("--run", required=True, help="run directory with a fused ensemble")
    p.add_argument("--data", help="score every image of this labelled folder instead of the test split")
    p.add_argument("--out", help="where to write metrics.json and predictions.csv (default RUN, or RUN/eval-<folder> with --data)")
    p.add_argument("--audit", metavar="FILE", help="audit CSV whose artefact flags define the subsets (default: detect on the scored images)")
    p.add_argument("--no-audit", dest="run_audit", action="store_false", help="skip the per-artefact-subset AUCs")
    p.add_argument("--isic-csv", metavar="FILE", help="also write the fused predictions in ISIC challenge format (image,MEL,NV)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the ROC/PR/reliability PNGs and report.html")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC 95%% CI (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    p.add_argument("--tta", action="store_true",
                   help="test-time averaging: score each image under its 8 rotations and flips and average (8x the compute)")
    _common(p)
    return p


def _evaluate(args) -> int:
    from skinfusion.workflows.evaluation import evaluate_run
    from skinfusion.workflows.tables import format_source_table, format_table

    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    m = evaluate_run(args.run, args.data, args.out, n_boot=args.bootstrap, workers=args.workers,
                     batch_size=args.batch_size, isic_csv=args.isic_csv, plots=args.plots,
                     audit_csv=args.audit, audit=args.run_audit, tta=args.tta)
    print(f"{m['scope']}: {m['n_images']} images, {m['fused']['n_melanoma']} melanoma; {m['method']} fusion"
          + (" with test-time averaging over 8 rotations/flips" if args.tta else ""))
    print(format_table({**m["members"], "fused": m["fused"]}))
    print("\nAUC per source:")
    print(format_source_table(m["per_source"], list(m["members"])))
    if m["per_subset"]:
        print("\nAUC per artefact subset (a shortcut shows up as a gap; spec = fused specificity on its nevi):")
        print(format_source_table(m["per_subset"], list(m["members"])))
        print("  " + ", ".join(f"{k}: spec {v['fused_specificity']:.3f}" for k, v in m["per_subset"].items() if v["n"]))
    print(f"\nwrote {m['out_dir']}/metrics.json, predictions.csv" + (", report.html and curve PNGs" if args.plots else ""))
    if args.isic_csv:
        print(f"wrote ISIC challenge CSV {args.isic_csv}")
    if m["n_skipped"]:
        print(f"warning: {m['n_skipped']} unreadable images skipped; see {m['out_dir']}/skipped.csv", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion evaluate``: write metrics.json and predictions.csv and print the results table."""
    args = evaluate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_evaluate, args)


# ---------------------------------------------------------------- predict
def predict_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion predict``."""
    p = argparse.ArgumentParser(
        prog="skinfusion predict",
        description="Fused melanoma probability per image, as path,melanoma_proba CSV (stdout, or --out). "
                    "Images are decoded, scored and written in streamed batches, so folders of any size fit in memory.")
    p.add_argument("--run", required=True, help="run directory with a fused ensemble")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--input", metavar="DIR_OR_LIST",
                   help="a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp files, in sorted order) "
                        "or a text file listing one image path per line (relative paths are relative to that file)")
    p.add_argument("--out", metavar="CSV", help="write path,melanoma_proba here instead of stdout (written to CSV.partial, "
                                                "renamed when complete); skipped files go to CSV.skipped.csv")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads, overlapped with inference (default 2)")
    p.add_argument("--tta", action="store_true", help="average each image over its 8 rotations and flips (8x the compute)")
    p.add_argument("--metadata", metavar="CSV",
                   help="for an ensemble fused with metadata (fuse --metadata): a CSV with an image_id column (the "
                        "file name without extension) or a path column, and the fused fields (age, sex, site); "
                        "empty cells and images it does not list are scored with those fields unknown")
    _common(p)
    return p


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _input_paths(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        return sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"--input {spec} is an image; give it as a positional argument, or give a folder or a list file")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [str(Path(ln) if Path(ln).is_absolute() else path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    raise FileNotFoundError(f"--input {spec}: no such folder or list file")


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, enabled: bool, label: str = "images"):
        import time

        self.total, self.enabled, self.label, self.done, self._t0 = total, enabled and total > 0, label, 0, time.perf_counter()
        self._tty, self._last_decile = sys.stderr.isatty(), -1

    def update(self, n: int, skipped: int) -> None:
        import time

        self.done += n
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
        frac = self.done / self.total
        if self._tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.label} ({rate:.0f}/s, {skipped} skipped)")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            print(f"{self.done}/{self.total} {self.label} ({rate:.0f}/s, {skipped} skipped)", file=sys.stderr, flush=True)


def _read_metadata_csv(spec: str, paths: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """path → metadata dict for ``predict --metadata``, matched by image_id (file stem) or path."""
    from skinfusion.data.index import read_csv_rows

    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--metadata {spec}: no such file")
    rows = read_csv_rows(path)
    columns = set(rows[0]) if rows else set()
    key = "image_id" if "image_id" in columns else "path" if "path" in columns else None
    if key is None:
        raise ValueError(f"--metadata {spec}: needs an image_id or a path column, has {sorted(columns)}")
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ValueError(f"--metadata {spec}: the ensemble fuses {list(fields)} but the CSV lacks {missing}")
    by_key = {r[key]: {f: r.get(f, "") for f in fields} for r in rows}
    out = {p: by_key.get(Path(p).stem if key == "image_id" else p) for p in paths}
    unmatched = sum(v is None for v in out.values())
    if unmatched:
        print(f"skinfusion: {unmatched} of {len(paths)} images are not in {spec}; scored with "
              f"{', '.join(fields)} unknown", file=sys.stderr)
    return {p: m for p, m in out.items() if m is not None}


def _predict(args) -> int:
    from ensemble import load

    paths = list(args.images) + (_input_paths(args.input) if args.input else [])
    if not paths:
        raise ValueError("no images given: pass image files and/or --input DIR_OR_LIST")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    ens = load(args.run)
    metadata = None
    if ens.metadata_fields:
        if not args.metadata:
            raise ValueError(f"{args.run}: this ensemble fuses metadata ({', '.join(ens.metadata_fields)}); pass "
                             "--metadata CSV with image_id (or path) and those columns")
        metadata = _read_metadata_csv(args.metadata, paths, ens.metadata_fields)
    elif args.metadata:
        print(f"skinfusion: {args.run} was fused without metadata; --metadata {args.metadata} is ignored", file=sys.stderr)
    out_path = Path(args.out) if args.out else None
    tmp = out_path.with_name(out_path.name + ".partial") if out_path else None
    fh = open(tmp, "w") if tmp else sys.stdout
    skipped: list[tuple[str, str]] = []
    progress = _Progress(len(paths), enabled=not args.quiet and (bool(out_path) or len(paths) > args.batch_size))
    try:
        fh.write("path,melanoma_proba\n")
        for batch in ens.iter_files(paths, batch_size=args.batch_size, workers=args.workers, tta=args.tta,
                                    metadata=metadata):
            fh.writelines(f"{p},{q:.6f}\n" for p, q in zip(batch.paths, batch.fused))
            for path, reason in batch.failures:
                print(f"skinfusion: skipped {reason}", file=sys.stderr)
            skipped += batch.failures
            progress.update(len(batch.paths) + len(batch.failures), len(skipped))
    finally:
        if tmp:
            fh.close()
    if out_path:
        os.replace(tmp, out_path)
        from skinfusion.data.index import write_skip_report

        report = out_path.with_name(out_path.name + ".skipped.csv")
        write_skip_report(report, skipped)
        print(f"scored {len(paths) - len(skipped)} images -> {out_path}; {len(skipped)} skipped"
              + (f" (listed in {report})" if skipped else ""), file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion predict``: fused melanoma probability per image; exit 1 if any image was unreadable."""
    args = predict_parser().parse_args(argv)
    _setup_logging(True)  # predict output is data; keep the log to warnings
    return _run_guarded(_predict, args)


# ---------------------------------------------------------------- verify-split
def verify_split_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion verify-split``."""
    p = argparse.ArgumentParser(prog="skinfusion verify-split",
                                description="Check a run's saved split: no lesion group and no near-duplicate pair may cross train/val/test.")
    p.add_argument("--run", required=True, help="run directory with splits.csv")
    p.add_argument("--data", help="dataset folder (default: the one recorded in RUN/split.json)")
    p.add_argument("--pairs", help="CSV of known near-duplicate pairs (image_id_a,image_id_b), checked as well")
    p.add_argument("--max-distance", type=int, default=18, help="perceptual-hash (phash) distance for near-duplicates (default 18)")
    p.add_argument("--no-hash", dest="hash", action="store_false", help="skip the perceptual-hash near-duplicate search")
    _common(p)
    return p


def _verify_split(args) -> int:
    from skinfusion.data.index import index_dataset
    from skinfusion.data.dedup import find_near_duplicates, read_near_duplicate_pairs
    from skinfusion.data.splits import load_split, verify_split

    assign, info = load_split(args.run)
    data = args.data or info.get("data_dir")
    if not data:
        raise ValueError(f"{args.run}: split.json names no data folder; pass --data")
    records = [r for r in index_dataset(data).records if r.image_id in assign]
    pairs = list(read_near_duplicate_pairs(args.pairs)) if args.pairs else []
    if args.hash:
        found = find_near_duplicates([r.path for r in records], max_distance=args.max_distance)
        pairs += [(records[i].image_id, records[j].image_id) for i, j, _ in found]
        print(f"perceptual hash: {len(found)} near-duplicate pairs within distance {args.max_distance}")
    problems = verify_split(records, assign, pairs)
    for line in problems:
        print(line)
    print(f"{len(records)} images, {len({r.group_id for r in records})} groups, {len(pairs)} near-duplicate pairs checked: "
          + ("OK, nothing crosses train/val/test" if not problems else f"{len(problems)} problems"))
    return EXIT_OK if not problems else EXIT_SKIPPED


def verify_split_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion verify-split``: exit 0 if the split is leakage-free, 1 if anything crosses."""
    args = verify_split_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_verify_split, args)


# ---------------------------------------------------------------- audit
def audit_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion audit``."""
    p = argparse.ArgumentParser(prog="skinfusion audit",
                                description="Artefact and bias audit: colour discs, ink, size and source mix per class, near-duplicates, corrupt files.")
    p.add_argument("--data", required=True, help="dataset folder (any supported layout)")
    p.add_argument("--out", help="audit CSV to write (default runs/audit-<folder>.csv); a .summary.json is written beside it")
    p.add_argument("--max-distance", type=int, default=18, help="perceptual-hash distance for near-duplicates (default 18)")
    p.add_argument("--no-hash", dest="hash", action="store_false", help="skip the near-duplicate search")
    p.add_argument("--workers", type=int, default=2, help="threads (default 2)")
    _common(p)
    return p


def _audit(args) -> int:
    from skinfusion.workflows.auditing import audit_dataset

    out = args.out or f"runs/audit-{Path(args.data).resolve().name}.csv"
    s = audit_dataset(args.data, out, workers=args.workers, hash_pairs=args.hash, max_distance=args.max_distance)
    print(f"{s['data_dir']} ({s['format']}): {s['n_images']} images, {s['n_unreadable']} unreadable, "
          f"{len(s['missing_files'])} missing, {s['near_duplicate_pairs']} near-duplicate pairs")
    if s["skipped_labels"]:
        print("other labels (not used): " + ", ".join(f"{k}={v}" for k, v in sorted(s["skipped_labels"].items())))
    print(f"\n{'class':10} {'n':>6} {'colour disc':>14} {'ink':>14}  top sizes / sources")
    for cls, c in s["per_class"].items():
        def rate(a):
            return f"{c[a]['count']} ({100 * (c[a]['rate'] or 0):.1f}%)"
        sizes = ", ".join(f"{k}:{v}" for k, v in sorted(c["sizes"].items(), key=lambda kv: -kv[1])[:3])
        sources = ", ".join(f"{k}:{v}" for k, v in sorted(c["sources"].items(), key=lambda kv: -kv[1])[:4])
        print(f"{cls:10} {c['n']:6d} {rate('colour_disc'):>14} {rate('ink'):>14}  {sizes} | {sources}")
    print(f"\nwrote {out} and {Path(out).with_suffix('.summary.json')}")
    return EXIT_SKIPPED if s["n_unreadable"] else EXIT_OK


def audit_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion audit``: write the audit CSV and summary; exit 1 if any image was unreadable."""
    args = audit_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_audit, args)


# ---------------------------------------------------------------- synth
def synth_parser() -> argparse.ArgumentParser:
    """Parser for ``skinfusion synth``."""
    p = argparse.ArgumentParser(prog="skinfusion synth", description="Write a small SYNTHETIC dermoscopy-like dataset (for offline demos and tests).")
    p.add_argument("--out", required=True, help="folder to write labels.csv, metadata.csv, images/ and README.txt")
    p.add_argument("--n-images", type=int, default=600, help="about how many images (default 600)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--melanoma-fraction", type=float, default=0.2, help="share of melanoma lesions (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--atypical-rate", type=float, default=0.12,
                   help="share of lesions drawn with the other class's look, so the task is not trivial (default 0.12)")
    _common(p)
    return p


def _synth(args) -> int:
    from skinfusion.data.synthetic import make_synthetic_dataset

    if Path(args.out, "labels.csv").is_file():
        print(f"{args.out} already holds a dataset; leaving it as it is")
        return EXIT_OK
    out = make_synthetic_dataset(args.out, args.n_images, args.melanoma_fraction, args.size, args.seed, args.atypical_rate)
    print(f"wrote SYNTHETIC dataset to {out} (not real dermoscopy; see its README.txt)")
    return EXIT_OK


def synth_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion synth``: write the synthetic demo dataset."""
    args = synth_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run_guarded(_synth, args)


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion bench``: speed and memory beside the naive per-image loop (see ``skinfusion.workflows.bench``)."""
    from skinfusion.workflows.bench import main as bench

    return bench(argv)


COMMANDS = {"train": train_main, "fuse": fuse_main, "evaluate": evaluate_main, "predict": predict_main,
            "verify-split": verify_split_main, "audit": audit_main, "synth": synth_main, "bench": bench_main}
USAGE = """usage: skinfusion COMMAND [options]   (skinfusion COMMAND --help for each)

commands:
  train      train the rgb, hsv or fft branch (or --view all) on a run's grouped split
  fuse       fit mean or stacking fusion on the branches' validation probabilities
  evaluate   score the test split (or another labelled folder): AUC with 95% CI, sens/spec
  predict    path,melanoma_proba for image files, folders or lists (streamed, --out CSV)
  audit      artefact and bias audit: colour discs, ink, size/source mix, near-duplicates
  verify-split  check that no lesion group or near-duplicate pair crosses a run's split
  synth      write a small SYNTHETIC dataset for offline demos
  bench      training/inference throughput, latency and peak RSS beside the naive per-image loop
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skinfusion`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_ERROR
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"skinfusion: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_ERROR
    return command(argv[1:])


