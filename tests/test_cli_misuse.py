"""The CLI misuse corpus: every way a user can misuse a command or hand it a damaged file, with one defined outcome.

Generated at test time, like the bad-image corpus of ``test_bad_input.py``: a small SYNTHETIC
dataset, a run made of the committed 0.1.0 bundle (``tests/fixtures/legacy-0.1.0``, so nothing
is trained), and damaged copies of their files. Every case runs ``skinfusion.cli.main(argv)`` in
this process and checks its exit status, that stderr names the file or flag at fault, that no
traceback is printed and that no temporary file (``*.tmp``, ``*.partial``) is left behind. The
two Ctrl-C cases run a real process and send it SIGINT. The "Reliability" section of docs/architecture.md
lists these cases; a test below keeps the two in step.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import cv2
import pytest

from helpers import rehash_manifest
from skinfusion.cli import main
from skinfusion.data.synthetic import make_synthetic_dataset
from skinfusion.workflows.runsplit import prepare_split

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
RELIABILITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"  # the metrics.json schema
LEFTOVER = re.compile(r"\.(tmp|partial)$")
# a train case that gets past its checks by mistake trains a tiny branch, not a real one
QUICK = ("--image-size", "16", "--base-filters", "4", "--epochs", "1", "-q")


# ------------------------------------------------------------------------------ the workspace
def _write_val_predictions(run: Path) -> None:
    """Made-up validation probabilities for the run's validation images, so `fuse` has something to fit."""
    with open(run / "splits.csv", newline="") as fh:
        val = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    for j, view in enumerate(("rgb", "hsv", "fft")):
        rows = [(r["image_id"], r["label"], f"{0.2 + 0.5 * int(r['label']) + 0.01 * ((7 * i + j) % 10):.6f}")
                for i, r in enumerate(val)]
        with open(run / "branches" / view / "val_predictions.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([("image_id", "label", "melanoma_proba"), *rows])


def _make_run(data: Path, run: Path, bundle: str) -> None:
    prepare_split(str(data), str(run))
    shutil.copytree(FIXTURE / "branches", run / "branches")
    shutil.copytree(FIXTURE / bundle, run / "ensemble")
    _write_val_predictions(run)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """``data/`` (80 synthetic images), ``run/`` (the 0.1.0 mean bundle on data's split) and
    ``metarun/`` (the 0.1.0 age/sex stacking bundle), built once and copied for every case."""
    root = tmp_path_factory.mktemp("misuse-template")
    data = make_synthetic_dataset(root / "data", n_images=80, size=24, seed=1, melanoma_fraction=0.4)
    _make_run(data, root / "run", "ensemble-mean")
    _make_run(data, root / "metarun", "ensemble-stackmeta")
    return root


def _workspace(template: Path, tmp_path: Path) -> SimpleNamespace:
    for name in ("data", "run", "metarun"):
        shutil.copytree(template / name, tmp_path / name)
    # the split records where its data was; the copy must point at its own copy
    for run in ("run", "metarun"):
        info = json.loads((tmp_path / run / "split.json").read_text())
        (tmp_path / run / "split.json").write_text(json.dumps({**info, "data_dir": str(tmp_path / "data")}))
    return SimpleNamespace(tmp=str(tmp_path), data=str(tmp_path / "data"), run=str(tmp_path / "run"),
                           metarun=str(tmp_path / "metarun"),
                           img=str(sorted((tmp_path / "data" / "images").glob("*.jpg"))[0]))


# --------------------------------------------------------------- how a case damages the workspace
Setup = Callable[[Path], None]


def write(rel: str, content: str | bytes) -> Setup:
    """Write ``content`` to ``rel`` (text as UTF-8), making its folder."""
    def setup(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def mkdir(rel: str) -> Setup:
    return lambda root: (root / rel).mkdir(parents=True, exist_ok=True)


def remove(rel: str) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def truncate(rel: str) -> Setup:
    """Cut the file to half its size, as an interrupted copy would."""
    def setup(root: Path) -> None:
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def edit_json(rel: str, change: Callable) -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return setup


def edit_text(rel: str, change: Callable[[str], str], encoding: str = "utf-8") -> Setup:
    def setup(root: Path) -> None:
        path = root / rel
        path.write_bytes(change(path.read_text(encoding="utf-8")).encode(encoding))
    return setup


def resign(run: str) -> Setup:
    """Re-sign the bundle's hashes, as if `fuse` had signed the files as they now are."""
    return lambda root: rehash_manifest(root / run / "ensemble")


def copy(src: str, dst: str) -> Setup:
    def setup(root: Path) -> None:
        s, d = root / src, root / dst
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        shutil.copytree(s, d) if s.is_dir() else shutil.copyfile(s, d)
    return setup


def move(src: str, dst: str) -> Setup:
    return lambda root: (root / src).rename(root / dst)


def steps(*setups: Setup) -> Setup:
    def setup(root: Path) -> None:
        for s in setups:
            s(root)
    return setup


def _labels(change_row: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    """A labels.csv editor: ``change_row`` maps each data row's cells (image_id, label, source)."""
    def change(text: str) -> str:
        header, *rows = text.splitlines()
        return "\n".join([header, *(",".join(change_row(r.split(","))) for r in rows)]) + "\n"
    return change


def _without_last_rows(n: int) -> Callable[[str], str]:
    return lambda text: "\n".join(text.splitlines()[:-n]) + "\n"


def _rename_ids(folder: str, old: str, new: str) -> Setup:
    """Rename a labels.csv dataset's images and ids: the same pictures under other names."""
    def setup(root: Path) -> None:
        for f in (root / folder / "images").iterdir():
            f.rename(f.with_name(f.name.replace(old, new)))
        for name in ("labels.csv", "metadata.csv"):
            path = root / folder / name
            path.write_text(path.read_text().replace(old, new))
    return setup


def _to_webp(rel: str) -> Setup:
    """Re-encode an image as .webp, beside the listed .jpg that it replaces."""
    def setup(root: Path) -> None:
        path = root / rel
        assert cv2.imwrite(str(path.with_suffix(".webp")), cv2.imread(str(path)))
        path.unlink()
    return setup


def _without_key(key: str) -> Callable[[dict], dict]:
    return lambda m: {k: v for k, v in m.items() if k != key}


# ------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """One misuse: the command line (``{data}``, ``{run}``, ``{metarun}``, ``{tmp}``, ``{img}`` are
    filled in), the exit status, a regex stderr must match (paths filled in, escaped), how the
    workspace is damaged first, a regex stderr must not match, and one stdout must match."""

    id: str
    argv: tuple[str, ...]
    code: int
    stderr: str
    setup: Setup | None = None
    not_stderr: str | None = None
    stdout: str | None = None


def C(id, argv, code, stderr, setup=None, not_stderr=None, stdout=None) -> Case:
    return Case(id, tuple(argv.split()), code, stderr, setup, not_stderr, stdout)


TRAIN = "train --view rgb --data {data} --run {tmp}/new " + " ".join(QUICK)
EVAL = "evaluate --run {run} --no-plots --no-audit --bootstrap 100 -q"
PREDICT = "predict --run {run} {img}"
META_PREDICT = "predict --run {metarun} {img} --metadata {tmp}/meta.csv"

CASES = [
    # --- the command line itself
    C("no-command", "", 2, r"skinfusion: error: no command given.*usage: skinfusion COMMAND"),
    C("unknown-command", "tran --run {run}", 2, r"unknown command 'tran'"),
    C("missing-required-flag", "train --view rgb --data {data}", 2, r"the following arguments are required: --run"),
    C("unknown-flag", "predict --run {run} {img} --outt x.csv", 2, r"unrecognized arguments: --outt"),
    # --- flag values
    C("learning-rate-negative", TRAIN + " --learning-rate -1", 2, r"--learning-rate -1.*\(0, 10\)"),
    C("workers-negative", TRAIN + " --workers -3", 2, r"argument --workers: must be at least 1, got -3"),
    C("epochs-zero", TRAIN.replace("--epochs 1", "--epochs 0"), 2, r"--epochs 0: epochs must be >= 1"),
    C("dropout-one", TRAIN + " --dropout 1", 2, r"--dropout 1.*dropout must be in \[0, 1\)"),
    C("view-unknown", "train --view xyz --data {data} --run {tmp}/new", 2, r"argument --view: invalid choice: 'xyz'"),
    C("limit-too-small", TRAIN + " --limit 10", 2, r"--limit must be at least 40"),
    C("audit-without-exclude", TRAIN + " --audit {tmp}/a.csv", 2, r"--audit is only used with --exclude-artefacts"),
    C("bootstrap-one", EVAL.replace("--bootstrap 100", "--bootstrap 1"), 2, r"argument --bootstrap: .*at least 100"),
    C("batch-size-zero", PREDICT + " --batch-size 0", 2, r"argument --batch-size: must be at least 1"),
    C("melanoma-fraction-1.5", "synth --out {tmp}/syn --melanoma-fraction 1.5", 2,
      r"--melanoma-fraction must be strictly between 0 and 1, got 1.5"),
    C("n-images-zero", "synth --out {tmp}/syn --n-images 0", 2, r"argument --n-images: must be at least 1"),
    C("atypical-rate-2", "synth --out {tmp}/syn --atypical-rate 2", 2, r"--atypical-rate must be from 0 to 1"),
    C("synth-size-too-small", "synth --out {tmp}/syn --size 4", 2, r"argument --size: must be at least 16"),
    C("fuse-views-unknown", "fuse --run {run} --views rgb,xyz", 2, r"--views takes comma-separated names from"),
    C("fuse-views-duplicate", "fuse --run {run} --views rgb,rgb", 2, r"--views names a branch twice"),
    C("fuse-folds-with-mean", "fuse --run {run} --folds 3", 2, r"--folds only applies to --method select or stack"),
    C("fuse-folds-one", "fuse --run {run} --method stack --folds 1", 2, r"--folds must be at least 2, got 1"),
    C("fuse-metadata-with-mean", "fuse --run {run} --metadata age", 2, r"metadata fusion needs --method stack"),
    C("fuse-metadata-unknown-field", "fuse --run {run} --method stack --metadata height", 2, r"height.*age"),
    C("bench-n-images-zero", "bench --run {run} --n-images 0", 2, r"argument --n-images: must be at least 1"),
    # --- --config values of the wrong type or shape
    C("config-epochs-float", TRAIN + " --config {tmp}/c.json", 2, r"--config {tmp}/c\.json: .*'epochs' must be int, got 1\.5",
      write("c.json", '{"epochs": 1.5}')),
    C("config-epochs-text", TRAIN + " --config {tmp}/c.json", 2, r"--config {tmp}/c\.json: .*'epochs' must be int, got 'two'",
      write("c.json", '{"epochs": "two"}')),
    C("config-augment-text", TRAIN + " --config {tmp}/c.json", 2, r"--config {tmp}/c\.json: .*'augment' must be bool, got 'no'",
      write("c.json", '{"augment": "no"}')),
    C("config-unknown-key", TRAIN + " --config {tmp}/c.json", 2, r"--config {tmp}/c\.json: .*unknown branch config keys \['epoch'\]",
      write("c.json", '{"epoch": 3}')),
    C("config-out-of-range", TRAIN + " --config {tmp}/c.json", 2, r"--config {tmp}/c\.json: .*learning_rate must be in",
      write("c.json", '{"learning_rate": 0}')),
    C("config-not-json", TRAIN + " --config {tmp}/c.json", 2, r"{tmp}/c\.json: .*JSON", write("c.json", "epochs: 3\n")),
    C("config-a-list", TRAIN + " --config {tmp}/c.json", 2, r"{tmp}/c\.json: .*object", write("c.json", "[3]")),
    C("config-utf16", TRAIN + " --config {tmp}/c.json", 2, r"{tmp}/c\.json: .*UTF-8",
      write("c.json", '{"epochs": 2}'.encode("utf-16"))),
    C("config-missing", TRAIN + " --config {tmp}/none.json", 2, r"{tmp}/none\.json: config file not found"),
    # --- paths where something else is expected
    C("train-run-is-a-file", TRAIN.replace("{tmp}/new", "{tmp}/run.txt"), 2,
      r"--run {tmp}/run\.txt: exists and is not a directory", write("run.txt", "a file")),
    C("predict-directory-as-image", "predict --run {run} {data}/images", 2,
      r"{data}/images is a directory; .*--input"),
    C("predict-out-is-a-directory", PREDICT + " --out {tmp}", 2, r"--out {tmp} is a directory"),
    C("predict-out-in-missing-folder", PREDICT + " --out {tmp}/no/p.csv", 2, r"--out {tmp}/no/p\.csv: folder .* does not exist"),
    C("predict-input-missing", "predict --run {run} --input {tmp}/nowhere", 2, r"--input {tmp}/nowhere: no such folder or list file"),
    C("predict-input-is-an-image", "predict --run {run} --input {img}", 2, r"--input {img} is an image"),
    C("predict-no-images", "predict --run {run}", 2, r"no images given"),
    C("synth-out-is-a-file", "synth --out {tmp}/syn.txt", 2, r"--out {tmp}/syn\.txt: exists and is not a directory",
      write("syn.txt", "a file")),
    C("evaluate-out-is-a-file", EVAL + " --out {tmp}/o.txt", 2, r"--out {tmp}/o\.txt: exists and is not a directory",
      write("o.txt", "a file")),
    C("evaluate-isic-csv-is-a-directory", EVAL + " --isic-csv {tmp}", 2, r"--isic-csv {tmp}: is a directory"),
    C("audit-out-is-a-directory", "audit --data {data} --no-hash --out {tmp}", 2, r"--out {tmp}: is a directory"),
    C("audit-out-in-missing-folder", "audit --data {data} --no-hash --out {tmp}/no/a.csv -q", 0, r"",
      stdout=r"wrote {tmp}/no/a\.csv"),
    C("bench-out-is-a-directory", "bench --run {run} --out {tmp}", 2, r"--out {tmp} is a directory"),
    C("bench-out-in-missing-folder", "bench --run {run} --out {tmp}/no/b.json", 2, r"--out {tmp}/no/b\.json: folder"),
    C("bench-run-without-branches", "bench --run {tmp}/empty", 2, r"{tmp}/empty has no fused ensemble", mkdir("empty")),
    # --- runs that are missing or not what the command needs
    C("fuse-run-missing", "fuse --run {tmp}/nope", 2, r"--run {tmp}/nope: no such run directory"),
    C("fuse-run-is-a-file", "fuse --run {tmp}/run.txt", 2, r"{tmp}/run\.txt", write("run.txt", "a file")),
    C("predict-run-missing", "predict --run {tmp}/nope {img}", 2, r"{tmp}/nope: no such run directory",
      not_stderr=r"no manifest"),
    C("evaluate-run-missing", "evaluate --run {tmp}/nope", 2, r"{tmp}/nope: no such run directory", not_stderr=r"no manifest"),
    C("predict-run-not-fused", "predict --run {run} {img}", 2, r"{run}.*skinfusion fuse", remove("run/ensemble")),
    C("fuse-branch-missing", "fuse --run {run}", 2, r"{run}/branches/hsv.*skinfusion train", remove("run/branches/hsv")),
    C("fuse-branch-of-another-view", "fuse --run {run}", 2, r"{run}/branches/rgb: holds a 'hsv' branch",
      copy("run/branches/hsv", "run/branches/rgb")),
    C("fuse-branches-on-different-splits", "fuse --run {run}", 2, r"retrain them in one run",
      edit_text("run/branches/fft/val_predictions.csv", _without_last_rows(1))),
    # --- damaged bundle files
    C("manifest-a-list", PREDICT, 2, r"{run}/ensemble/manifest\.json: damaged", write("run/ensemble/manifest.json", "[]")),
    C("manifest-not-json", PREDICT, 2, r"{run}/ensemble/manifest\.json: damaged, not valid JSON",
      write("run/ensemble/manifest.json", "{\n")),
    C("manifest-missing-key", PREDICT, 2, r"{run}/ensemble/manifest\.json: .*'branches'",
      edit_json("run/ensemble/manifest.json", _without_key("branches"))),
    C("manifest-empty", PREDICT, 2, r"{run}/ensemble/manifest\.json", write("run/ensemble/manifest.json", "")),
    C("fuse-truncated-model", "fuse --run {run}", 2, r"cannot load {run}/branches/rgb/model\.keras",
      truncate("run/branches/rgb/model.keras")),
    C("predict-truncated-model-signed", PREDICT, 2, r"cannot load .*branches/rgb/model\.keras",
      steps(truncate("run/branches/rgb/model.keras"), resign("run"))),
    C("predict-retrained-branch", PREDICT, 2, r"branches/rgb/model\.keras: SHA-256 differs.*skinfusion fuse",
      copy("run/branches/hsv/model.keras", "run/branches/rgb/model.keras")),
    C("predict-tampered-fusion", PREDICT, 2, r"{run}/ensemble/fusion\.joblib: SHA-256 differs",
      write("run/ensemble/fusion.joblib", b"\x80\x04not a pickle")),
    C("predict-bundle-file-missing", PREDICT, 2, r"branches/rgb/config\.json.*missing", remove("run/branches/rgb/config.json")),
    C("branch-metadata-a-list", "fuse --run {run}", 2, r"{run}/branches/rgb/metadata\.json: damaged",
      write("run/branches/rgb/metadata.json", "[]")),
    C("branch-metadata-not-json", "fuse --run {run}", 2, r"{run}/branches/rgb/metadata\.json: damaged",
      write("run/branches/rgb/metadata.json", "{")),
    C("branch-config-a-list", "fuse --run {run}", 2, r"{run}/branches/rgb/config\.json",
      write("run/branches/rgb/config.json", "[]")),
    C("val-predictions-damaged", "fuse --run {run}", 2, r"{run}/branches/rgb/val_predictions\.csv",
      write("run/branches/rgb/val_predictions.csv", "image_id,label,melanoma_proba\nSYN_000001,melanoma,high\n")),
    C("val-predictions-no-columns", "fuse --run {run}", 2, r"{run}/branches/rgb/val_predictions\.csv",
      write("run/branches/rgb/val_predictions.csv", "id;p\nSYN_000001;0.5\n")),
    # --- damaged split files
    C("split-json-a-list", EVAL, 2, r"{run}/split\.json: damaged", write("run/split.json", "[]")),
    C("split-json-not-json", EVAL, 2, r"{run}/split\.json: damaged", write("run/split.json", "{")),
    C("splits-csv-garbage", EVAL, 2, r"{run}/splits\.csv", write("run/splits.csv", "\x00\x01garbage\n"),
      not_stderr=r"0 images"),
    C("splits-csv-truncated", EVAL, 2, r"{run}/splits\.csv", truncate("run/splits.csv")),
    C("splits-csv-missing", EVAL, 2, r"{run}/splits\.csv", remove("run/splits.csv")),
    C("train-split-of-another-dataset", TRAIN.replace("{tmp}/new", "{run}"), 2, r"use a new --run",
      edit_text("data/labels.csv", _without_last_rows(3))),
    C("verify-split-json-without-data", "verify-split --run {run} --no-hash", 2, r"split\.json names no data folder; pass --data",
      edit_json("run/split.json", _without_key("data_dir"))),
    C("verify-pairs-missing", "verify-split --run {run} --no-hash --pairs {tmp}/pairs.csv", 2,
      r"{tmp}/pairs\.csv: no such near-duplicate list"),
    C("verify-pairs-bad-columns", "verify-split --run {run} --no-hash --pairs {tmp}/pairs.csv", 2,
      r"{tmp}/pairs\.csv: needs columns image_id_a,image_id_b", write("pairs.csv", "a;b\nx;y\n")),
    # --- datasets
    C("data-missing", TRAIN.replace("{data}", "{tmp}/nodata"), 2, r"{tmp}/nodata"),
    C("resume-damaged-checkpoint", TRAIN + " --resume", 2, r"{tmp}/new/branches/rgb/\.checkpoint/state\.json: damaged",
      write("new/branches/rgb/.checkpoint/state.json", "[]")),
    C("one-class-dataset", TRAIN, 2, r"{data}.*(one class|only|melanoma)",
      edit_text("data/labels.csv", _labels(lambda r: [r[0], "nevus", *r[2:]])), not_stderr=r"use more images"),
    C("labels-ids-with-suffix", "audit --data {data} --no-hash --out {tmp}/a.csv -q", 0, r"",
      edit_text("data/labels.csv", _labels(lambda r: [r[0] + ".jpg", *r[1:]])), stdout=r"81 images, 0 unreadable, 0 missing"),
    C("dataset-webp-image", "audit --data {data} --no-hash --out {tmp}/a.csv -q", 0, r"", _to_webp("data/images/SYN_000001.jpg"),
      stdout=r"81 images, 0 unreadable, 0 missing"),
    C("labels-missing-images", "audit --data {data} --no-hash --out {tmp}/a.csv", 2, r"looked for {data}/images/IMG_\d+\.jpg",
      edit_text("data/labels.csv", _labels(lambda r: [r[0].replace("SYN", "IMG"), *r[1:]]))),
    C("labels-utf16", TRAIN, 2, r"{data}/labels\.csv", edit_text("data/labels.csv", lambda t: t, "utf-16")),
    C("labels-all-unknown", TRAIN, 2, r"{data}/labels\.csv.*(melanoma|nevus)",
      edit_text("data/labels.csv", _labels(lambda r: [r[0], {"melanoma": "malignant", "nevus": "benign"}[r[1]], *r[2:]]))),
    C("evaluate-data-missing", EVAL + " --data {tmp}/nodata", 2, r"{tmp}/nodata"),
    C("evaluate-data-overlaps-training", EVAL + " --data {tmp}/copy", 0,
      r"of {tmp}/copy are in this run's training or validation split",
      steps(copy("data", "copy"), edit_text("copy/labels.csv", _without_last_rows(5)))),
    C("evaluate-data-renamed-copy", EVAL + " --data {tmp}/copy", 0,
      r"of {tmp}/copy are in this run's training or validation split \(0 by image id, \d+ more by identical content",
      steps(copy("data", "copy"), _rename_ids("copy", "SYN_", "CPY_"))),
    C("evaluate-dataset-moved", EVAL, 2, r"{data}: .*--data-root", move("data", "moved")),
    C("evaluate-data-root", EVAL + " --data-root {tmp}/moved", 0, r"", move("data", "moved"),
      stdout=r"test split: \d+ images"),
    C("evaluate-data-root-other-data", EVAL + " --data-root {tmp}/moved", 2, r"--data-root {tmp}/moved does not hold",
      steps(move("data", "moved"), edit_text("moved/labels.csv", _without_last_rows(3)))),
    C("evaluate-audit-missing", "evaluate --run {run} --no-plots --bootstrap 100 -q --audit {tmp}/a.csv", 2,
      r"{tmp}/a\.csv: audit file not found"),
    C("labels-without-label-column", "audit --data {data} --no-hash --out {tmp}/a.csv", 2, r"{data}/labels\.csv: .*label",
      edit_text("data/labels.csv", lambda t: t.replace("image_id,label,source", "image_id,diagnosis,source", 1))),
    C("labels-duplicate-id", "audit --data {data} --no-hash --out {tmp}/a.csv", 2,
      r"{data}/labels\.csv: image_id SYN_000001 is listed twice",
      edit_text("data/labels.csv", lambda t: t + "SYN_000001,nevus,synthetic\n")),
    C("dataset-metadata-csv-not-utf8", "audit --data {data} --no-hash --out {tmp}/a.csv", 2, r"{data}/metadata\.csv",
      edit_text("data/metadata.csv", lambda t: t, "utf-16")),
    C("split-json-missing", EVAL, 2, r"{run}/split\.json", remove("run/split.json")),
    C("fusion-file-missing", PREDICT, 2, r"{run}/ensemble/fusion\.joblib.*missing", remove("run/ensemble/fusion.joblib")),
    C("fuse-run-without-branches", "fuse --run {tmp}/empty", 2, r"{tmp}/empty/branches/rgb.*skinfusion train", mkdir("empty")),
    C("cache-dir-is-a-file", TRAIN + " --cache-dir {tmp}/cache.txt", 2, r"--cache-dir {tmp}/cache\.txt",
      write("cache.txt", "a file")),
    C("evaluate-audit-bad-columns", "evaluate --run {run} --no-plots --bootstrap 100 -q --audit {tmp}/a.csv", 2,
      r"{tmp}/a\.csv: not an audit CSV", write("a.csv", "image,flag\nSYN_000001,1\n")),
    C("verify-pairs-utf16", "verify-split --run {run} --no-hash --pairs {tmp}/pairs.csv", 2, r"{tmp}/pairs\.csv",
      write("pairs.csv", "image_id_a,image_id_b\nSYN_000001,SYN_000002\n".encode("utf-16"))),
    # --- predict --input lists and --metadata files
    C("predict-input-list-not-text", "predict --run {run} --input {tmp}/list.txt", 2, r"--input {tmp}/list\.txt",
      write("list.txt", "a.jpg\n".encode("utf-16"))),
    C("predict-metadata-utf16", META_PREDICT, 2, r"{tmp}/meta\.csv",
      write("meta.csv", "image_id,age,sex\nSYN_000000,40,male\n".encode("utf-16"))),
    C("predict-list-with-missing-entries", "predict --run {run} --input {tmp}/list.txt --out {tmp}/p.csv", 1,
      r"{tmp}/gone\.jpg.*(no such|missing)", write("list.txt", "data/images/SYN_000001.jpg\ngone.jpg\n")),
    C("predict-metadata-without-key-column", META_PREDICT, 2, r"--metadata {tmp}/meta\.csv: needs an image_id or a path column",
      write("meta.csv", "name,age,sex\nSYN_000000,40,male\n")),
    C("predict-metadata-lacks-a-field", META_PREDICT, 2, r"--metadata {tmp}/meta\.csv: .*lacks \['sex'\]",
      write("meta.csv", "image_id,age\nSYN_000000,40\n")),
    C("predict-metadata-missing-file", META_PREDICT, 2, r"--metadata {tmp}/meta\.csv: no such file"),
    C("predict-metadata-not-given", "predict --run {metarun} {img}", 2, r"--metadata CSV"),
    C("predict-metadata-unparseable", META_PREDICT, 0,
      r"--metadata {tmp}/meta\.csv: age: .*'sixty'.*unknown.*\n.*--metadata {tmp}/meta\.csv: sex: .*'F'.*unknown",
      write("meta.csv", "image_id,age,sex\nSYN_000000,sixty,F\n")),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def _fill(text: str, ws: SimpleNamespace, escape: bool) -> str:
    values = {k: (re.escape(v) if escape else v) for k, v in vars(ws).items()}
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], text)


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if LEFTOVER.search(p.name)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_misuse_has_its_defined_outcome(case, template, tmp_path, capsys):
    import ensemble

    ws = _workspace(template, tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    argv = [_fill(a, ws, escape=False) for a in case.argv]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse reports a bad flag by exiting 2
        code = exc.code
    except Exception as exc:  # an escaped exception is what the user would see as a traceback
        pytest.fail(f"{case.id}: {' '.join(argv)} raised {type(exc).__name__}: {exc}")
    finally:
        ensemble.clear_cache()
    out, err = capsys.readouterr()
    problems = []
    if code != case.code:
        problems.append(f"exit {code}, expected {case.code}")
    if not re.search(_fill(case.stderr, ws, escape=True), err, re.DOTALL):
        problems.append(f"stderr does not match {case.stderr!r}")
    if case.not_stderr and re.search(case.not_stderr, err):
        problems.append(f"stderr still says {case.not_stderr!r}")
    if case.stdout and not re.search(_fill(case.stdout, ws, escape=True), out):
        problems.append(f"stdout does not match {case.stdout!r}")
    if "Traceback" in err + out:
        problems.append("a traceback was printed")
    if _leftovers(tmp_path):
        problems.append(f"temporary files left behind: {_leftovers(tmp_path)}")
    assert not problems, f"{case.id}: {'; '.join(problems)}\n--- stderr:\n{err[-3000:]}\n--- stdout:\n{out[-1500:]}"


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"skinfusion {version('skinfusion')}"


# ------------------------------------------------------------------------------ Ctrl-C, for real
def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "SKINFUSION_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _interrupt(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> tuple[int, str]:
    """Send SIGINT once ``ready()`` holds, as Ctrl-C would; return the exit status and stderr."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"{what} ended before it could be interrupted:\n{proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"{what} never got going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_during_train_exits_130_says_resume_and_leaves_no_temporary_file(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_images=80, size=24, seed=1, melanoma_fraction=0.4)
    run = tmp_path / "run"
    state = run / "branches" / "rgb" / ".checkpoint" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "skinfusion", "train", "--view", "rgb", "--data", str(data),
                             "--run", str(run), "--image-size", "16", "--base-filters", "4", "--epochs", "500",
                             "--patience", "500", "--cache-dir", str(tmp_path / "cache")],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, err = _interrupt(proc, lambda: state.is_file(), "train")
    assert code == 130, err
    assert re.search(r"interrupted after epoch \d+ of 500 \(rgb\); rerun with --resume", err), err
    assert "Traceback" not in err
    assert not _leftovers(tmp_path)
    assert json.loads(state.read_text())["epoch"] >= 1, "the checkpoint to resume from is kept"
    assert not (run / "branches" / "rgb" / "model.keras").exists()


def test_ctrl_c_during_predict_exits_130_and_leaves_no_file(template, tmp_path):
    ws = _workspace(template, tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{ws.img}\n" * 20000)
    out = tmp_path / "p.csv"
    proc = subprocess.Popen([sys.executable, "-m", "skinfusion", "predict", "--run", ws.run, "--input", str(listing),
                             "--out", str(out), "--batch-size", "1"],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def writing() -> bool:  # its temporary file exists: the ensemble is loaded and scoring has begun
        return any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())

    code, err = _interrupt(proc, writing, "predict")
    assert code == 130, err
    assert re.search(rf"interrupted; {re.escape(str(out))} was not written", err), err
    assert "Traceback" not in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_an_error_that_follows_ctrl_c_is_reported_as_the_interrupt(capsys):
    """TensorFlow can turn the KeyboardInterrupt raised inside its C++ callbacks into another error
    (seen: SystemError, then AttributeError '_type_spec'); after Ctrl-C it is still an interrupt."""
    from skinfusion.cli.common import run_guarded

    def body(_):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise AttributeError("'EagerTensor' object has no attribute '_type_spec'") from None
        return 0

    before = signal.getsignal(signal.SIGINT)
    assert run_guarded(body, None, "rerun it") == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun it" in err and "_type_spec" not in err
    assert signal.getsignal(signal.SIGINT) is before, "the previous Ctrl-C handler is put back"
    with pytest.raises(AttributeError):  # without Ctrl-C, a bug keeps its traceback
        run_guarded(lambda _: {}.nosuch, None)


# --------------------------------------------------------------------------------- the docs
def test_the_docs_list_this_corpus():
    text = RELIABILITY_DOC.read_text(encoding="utf-8")
    found = re.search(r"^## Reliability\n(.*?)(?=^## |\Z)", text, re.S | re.M)  # up to the next section, or the end
    assert found, f"{RELIABILITY_DOC.name} has no '## Reliability' section"
    section = found.group(1)
    assert f"**{len(CASES)} cases**" in section
    missing = [c.id for c in CASES if f"`{c.id}`" not in section]
    assert not missing, f"docs/architecture.md Reliability lacks the CLI cases {missing}"


def test_help_texts_that_were_misleading():
    from skinfusion.cli import train
    from skinfusion.data.layouts import LAYOUTS

    help_text = train.parser().format_help()
    assert re.search(r"--learning-rate X\s+initial learning rate of the optimizer \(Adam or SGD\)", help_text)
    assert all(lay.name in " ".join(help_text.split()) for lay in LAYOUTS)


def test_the_docs_document_every_metrics_json_key():
    import numpy as np

    from skinfusion.data.index import Record
    from skinfusion.workflows.evaluation import Evaluator, RunInfo, Scored

    y = [0, 1, 0, 1, 0, 1]
    records = [Record(image_id=f"i{i}", path=f"i{i}.jpg", label=lab, group_id=f"g{i}", source="s")
               for i, lab in enumerate(y)]
    P = np.array([[0.2, 0.3], [0.7, 0.6], [0.4, 0.1], [0.9, 0.8], [0.3, 0.5], [0.6, 0.4]])
    scored = Scored(records, P, P.mean(axis=1))
    metrics = Evaluator(["rgb", "hsv"], 0.5, {"rgb": 0.5, "hsv": 0.5}, n_boot=10).evaluate(
        scored, RunInfo("run", "test split", "mean"), {"colour_disc": {"i0"}, "ink": set()})
    text = CLI_DOC.read_text(encoding="utf-8")
    schema = text[text.index("### `metrics.json` schema"):]
    schema = schema[: schema.index("```", schema.index("```") + 3)]
    keys = set(metrics) | set(metrics["fused"]) | set(metrics["fused"]["confusion_matrix"])
    keys |= {k for row in metrics["per_source"].values() for k in row if k not in ("rgb", "hsv", "fused")}
    keys |= {k for row in metrics["per_subset"].values() for k in row if k not in ("rgb", "hsv", "fused")}
    missing = sorted(k for k in keys if not re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", schema))
    assert not missing, f"docs/cli.md's metrics.json schema does not document {missing}"
