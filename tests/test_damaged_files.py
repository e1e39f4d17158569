"""Damaged files a run reads back: each is refused with an error that names it and says what to do.

Runs are built without training from the committed 0.1.0 bundle (tests/fixtures/legacy-0.1.0):
its branches become ``RUN/branches`` and its mean bundle ``RUN/ensemble`` (the manifest's branch
paths, ``../branches/VIEW``, resolve there). Every case checks the exception type and message;
the CLI cases also check exit status 2 and that no traceback is printed, and the fuse cases
that no manifest was written or changed.
"""

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ensemble.bundle import load_ensemble, save_ensemble
from ensemble.fusion import make_fusion
from skinfusion.cli import evaluate_main, fuse_main, main, predict_main, train_main
from skinfusion.data.index import Record
from skinfusion.data.splits import load_split, save_split
from skinfusion.workflows import fusing
from skinfusion.workflows.fusing import fuse_run
from skinfusion.workflows.runsplit import prepare_split

from helpers import rehash_manifest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
VIEWS3 = ("rgb", "hsv", "fft")
IMAGE = str(FIXTURE / "images" / "gen0.png")


def _make_run(root: Path, fused: bool = True, n: int = 30) -> Path:
    """RUN/branches from the fixture, RUN/ensemble from its mean bundle, made-up validation
    predictions for fuse, and a valid split (train/val/test) for evaluate."""
    run = root / "run"
    shutil.copytree(FIXTURE / "branches", run / "branches")
    if fused:
        shutil.copytree(FIXTURE / "ensemble-mean", run / "ensemble")
    y = (np.arange(n) % 3 == 0).astype(int)
    P = np.clip(0.3 + 0.3 * y[:, None] + np.random.default_rng(0).normal(0, 0.2, (n, 3)), 0.01, 0.99)
    for j, view in enumerate(VIEWS3):
        rows = "".join(f"v{i:03d},{y[i]},{P[i, j]:.6f}\n" for i in range(n))
        (run / "branches" / view / "val_predictions.csv").write_text("image_id,label,melanoma_proba\n" + rows)
    records = [Record(f"img{i:02d}", "", i % 2, f"g{i:02d}", "A") for i in range(12)]
    assign = {r.image_id: ("train", "train", "val", "test")[i % 4] for i, r in enumerate(records)}
    counts = {s: {"images": sum(v == s for v in assign.values())} for s in ("train", "val", "test")}
    save_split(run, records, assign, {"data_dir": str(root / "data"), "dataset_fingerprint": "f" * 16,
                                      "split_seed": 0, "limit": None, "counts": counts})
    return run


@pytest.fixture
def run(tmp_path):
    return _make_run(tmp_path)


def _snapshot(run: Path) -> dict[str, bytes]:
    ens = run / "ensemble"
    return {p.name: p.read_bytes() for p in sorted(ens.iterdir())} if ens.is_dir() else {}


def _cli_error(capsys, rc: int, *patterns: str) -> str:
    """Assert exit 2, a one-line ``skinfusion: error:`` naming what ``patterns`` match, and no traceback."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = next(li for li in err.splitlines() if li.startswith("skinfusion: error:"))
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    return line


def test_the_undamaged_run_loads_fuses_and_splits(run):
    # the baseline every case below damages: it works
    assert load_ensemble(run).views == list(VIEWS3)
    before = _snapshot(run)
    fuse_run(str(run), "mean", VIEWS3)
    assert _snapshot(run)["manifest.json"] != before["manifest.json"]
    assert load_ensemble(run).views == list(VIEWS3)
    assign, info = load_split(run)
    assert sorted(set(assign.values())) == ["test", "train", "val"] and info["dataset_fingerprint"] == "f" * 16


# ------------------------------------------------------------ a damaged model.keras (Major 2)
def _rezip(data: bytes, change: dict) -> bytes:
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            content = change.get(name, src.read(name))
            if content is not None:
                z.writestr(name, content)
    return out.getvalue()


MODEL_DAMAGE = {
    # what keras.models.load_model raised on each: ValueError "File not found" (the file is
    # there), BadZipFile, ValueError, TypeError.
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: b"not a keras archive\n" * 40,
    "bad-crc": lambda b: b[: len(b) // 2] + bytes(1000) + b[len(b) // 2 + 1000:],
    "no-weights": lambda b: _rezip(b, {"model.weights.h5": None}),
    "config-a-list": lambda b: _rezip(b, {"config.json": b"[]"}),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
@pytest.mark.parametrize("fused", [True, False], ids=["refused", "new"])
def test_fuse_refuses_to_sign_a_damaged_model(tmp_path, damage, fused, monkeypatch):
    # refused before any fitting (which takes minutes with --folds), not only when signing
    monkeypatch.setattr(fusing, "choose_threshold", lambda *a: pytest.fail("fitted before checking the branches"))
    run = _make_run(tmp_path, fused=fused)
    model = run / "branches" / "hsv" / "model.keras"
    model.write_bytes(MODEL_DAMAGE[damage](model.read_bytes()))
    before = _snapshot(run)
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(model))}: .*; retrain this branch "
                                         rf"\(skinfusion train --view hsv --run {re.escape(str(run))}\)"):
        fuse_run(str(run), "mean", VIEWS3)
    assert _snapshot(run) == before, "no manifest or fusion file was written or changed"
    assert (run / "ensemble").is_dir() == fused


def test_save_ensemble_itself_refuses_a_damaged_model(run):
    model = run / "branches" / "fft" / "model.keras"
    model.write_bytes(model.read_bytes()[:500])
    fusion = make_fusion("mean").fit(np.random.default_rng(0).random((20, 3)), np.arange(20) % 2)
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(model))}: not a Keras archive"):
        save_ensemble(run / "other", fusion, "mean", 0.5, [run / "branches" / v for v in VIEWS3])
    assert not (run / "other").exists()


def test_fuse_cli_on_a_truncated_model_exits_2_without_a_traceback(run, capsys):
    model = run / "branches" / "rgb" / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    before = _snapshot(run)
    rc = fuse_main(["--run", str(run), "-q"])
    _cli_error(capsys, rc, rf"cannot load {re.escape(str(model))}", r"skinfusion train --view rgb --run")
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_a_signed_damaged_model_is_reported_as_cannot_load_not_file_not_found(run, damage):
    # a bundle signed by an older fuse, which hashed whatever was there
    model = run / "branches" / "hsv" / "model.keras"
    model.write_bytes(MODEL_DAMAGE[damage](model.read_bytes()))
    rehash_manifest(run / "ensemble")
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(model))}: .*retrain this branch") as info:
        load_ensemble(run)
    assert "File not found" not in str(info.value)


def test_predict_cli_on_a_signed_damaged_model(run, capsys):
    model = run / "branches" / "hsv" / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    rehash_manifest(run / "ensemble")
    _cli_error(capsys, predict_main(["--run", str(run), IMAGE]), r"cannot load .*hsv/model\.keras", r"retrain")


# ------------------------------------------------------------ a damaged manifest.json (Major 3)
def _edit(change):
    def write(path: Path) -> None:
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps(change(manifest)))
    return write


def _set(key, value):
    return _edit(lambda m: {**m, key: value})


def _drop(key):
    return _edit(lambda m: {k: v for k, v in m.items() if k != key})


def _branch0(**changes):
    return _edit(lambda m: {**m, "branches": [{**m["branches"][0], **changes}, *m["branches"][1:]]})


MANIFEST_DAMAGE = {
    "a-list": (lambda p: p.write_text("[]"), r"holds a JSON list where an object is expected"),
    "not-json": (lambda p: p.write_text("{\n"), r"not valid JSON"),
    "empty": (lambda p: p.write_text(""), r"not valid JSON"),
    "not-utf8": (lambda p: p.write_bytes(b"\xff\xfe{}"), r"not valid JSON"),
    "no-branches": (_drop("branches"), r"lacks 'branches'"),
    "no-fusion": (_drop("fusion"), r"lacks 'fusion'"),
    "branches-a-number": (_set("branches", 3), r"'branches' must be a non-empty list"),
    "branches-empty": (_set("branches", []), r"'branches' must be a non-empty list"),
    "branch-a-number": (_set("branches", [3]), r"branches\[0\] must hold"),
    "branch-without-files": (_branch0(files={}), r"branches\[0\] must hold"),
    "branch-path-a-number": (_branch0(path=3), r"branches\[0\] must hold"),
    "threshold-a-string": (_set("threshold", "x"), r"'threshold' must be a number in \[0, 1\], got 'x'"),
    "threshold-out-of-range": (_set("threshold", 2.5), r"'threshold' must be a number"),
    "threshold-null": (_set("threshold", None), r"'threshold' must be a number"),
    "image-size-a-string": (_set("image_size", "16"), r"'image_size' must be a whole number"),
    "load-size-zero": (_set("load_size", 0), r"'load_size' must be a whole number"),
    "fusion-a-list": (_set("fusion", []), r"'fusion' must hold 'file' and 'sha256'"),
    "method-a-list": (_set("method", ["mean"]), r"unknown fusion method \['mean'\]"),
    "method-unknown": (_set("method", "median"), r"unknown fusion method 'median'"),
    "format-version": (_set("format_version", 99), r"bundle format 99 is not supported"),
    "versions-a-number": (_set("versions", {"keras": 3}), r"'versions' must map"),
    "metadata-a-string": (_set("metadata", "age"), r"'metadata' must be a list"),
    "branch-order-differs": (_set("branch_order", ["hsv", "rgb", "fft"]), r"'branch_order'"),
    "validation-metrics-a-list": (_set("validation_metrics", []), r"'validation_metrics'"),
    "fingerprint-a-number": (_set("dataset_fingerprint", 7), r"'dataset_fingerprint'"),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_a_damaged_manifest_names_itself_and_says_re_run_fuse(run, case):
    damage, reason = MANIFEST_DAMAGE[case]
    manifest = run / "ensemble" / "manifest.json"
    damage(manifest)
    with pytest.raises(ValueError) as info:
        load_ensemble(run)
    message = str(info.value)
    assert message.startswith(f"{manifest}: "), message
    assert re.search(reason, message), message
    assert f"re-run `skinfusion fuse --run {run}`" in message


@pytest.mark.parametrize("case", ["a-list", "not-json", "no-branches", "threshold-a-string", "branches-a-number"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_on_a_damaged_manifest_exits_2_without_a_traceback(run, case, command, capsys):
    MANIFEST_DAMAGE[case][0](run / "ensemble" / "manifest.json")
    argv = ["--run", str(run), IMAGE] if command == "predict" else ["--run", str(run), "-q"]
    rc = {"predict": predict_main, "evaluate": evaluate_main}[command](argv)
    _cli_error(capsys, rc, re.escape(str(run / "ensemble" / "manifest.json")), r"skinfusion fuse --run")


# ------------------------------------------------------------ a damaged branch config.json / metadata.json
def _json_edit(change):
    def write(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return write


BRANCH_DAMAGE = {
    "config-a-list": ("config.json", lambda p: p.write_text("[]"), r"holds a JSON list"),
    "config-not-json": ("config.json", lambda p: p.write_text("{"), r"not valid JSON"),
    "config-not-utf8": ("config.json", lambda p: p.write_bytes(b"\xff{}"), r"not valid JSON"),
    "config-unknown-key": ("config.json", _json_edit(lambda c: {**c, "colour": 1}), r"unknown branch config keys \['colour'\]"),
    "config-wrong-type": ("config.json", _json_edit(lambda c: {**c, "epochs": "two"}), r"'epochs' must be int"),
    "config-bad-value": ("config.json", _json_edit(lambda c: {**c, "dropout": 3.0}), r"dropout must be in"),
    "metadata-a-list": ("metadata.json", lambda p: p.write_text("[]"), r"holds a JSON list"),
    "metadata-not-json": ("metadata.json", lambda p: p.write_text("not json"), r"not valid JSON"),
    "metadata-no-format": ("metadata.json", _json_edit(lambda m: {k: v for k, v in m.items() if k != "format_version"}),
                           r"branch format version None is not supported"),
    "metadata-split-seed-a-list": ("metadata.json", _json_edit(lambda m: {**m, "split_seed": [1]}), r"'split_seed' must be of type int"),
    "metadata-fingerprint-a-number": ("metadata.json", _json_edit(lambda m: {**m, "dataset_fingerprint": 5}),
                                      r"'dataset_fingerprint' must be of type str"),
}


@pytest.mark.parametrize("case", BRANCH_DAMAGE)
def test_fuse_refuses_a_damaged_branch_file_and_says_retrain(run, case):
    name, damage, reason = BRANCH_DAMAGE[case]
    path = run / "branches" / "hsv" / name
    damage(path)
    before = _snapshot(run)
    with pytest.raises(ValueError) as info:
        fuse_run(str(run), "mean", VIEWS3)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(reason, message), message
    assert message.endswith(f"retrain this branch (skinfusion train --view hsv --run {run})"), message
    assert _snapshot(run) == before


@pytest.mark.parametrize("case", BRANCH_DAMAGE)
def test_loading_a_signed_damaged_branch_file_names_it(run, case):
    name, damage, reason = BRANCH_DAMAGE[case]
    path = run / "branches" / "hsv" / name
    damage(path)
    rehash_manifest(run / "ensemble")
    with pytest.raises(ValueError) as info:
        load_ensemble(run)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and re.search(reason, message), message
    assert f"then re-run `skinfusion fuse --run {run}`" in message


@pytest.mark.parametrize("case", ["config-a-list", "config-unknown-key", "metadata-not-json", "metadata-split-seed-a-list"])
def test_fuse_cli_on_a_damaged_branch_file(run, case, capsys):
    name, damage, _ = BRANCH_DAMAGE[case]
    damage(run / "branches" / "rgb" / name)
    _cli_error(capsys, fuse_main(["--run", str(run), "-q"]), re.escape(str(run / "branches" / "rgb" / name)),
               r"skinfusion train --view rgb")


@pytest.mark.parametrize("content", ["image_id,label,melanoma_proba\nv000,melanoma,high\n", "id;p\nv000;0.5\n",
                                     "image_id,label\nv000\n"])
def test_fuse_refuses_damaged_validation_predictions(run, content):
    path = run / "branches" / "fft" / "val_predictions.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: damaged .*retrain this branch"):
        fuse_run(str(run), "mean", VIEWS3)


def test_a_damaged_checkpoint_state_names_the_file(tmp_path):
    from models import BranchConfig
    from models.train import _BestKeeper

    keeper = _BestKeeper(BranchConfig(view="rgb", image_size=16), tmp_path)
    for content, reason in (("[]", "holds a JSON list"), ("{", "not valid JSON"), ('{"epoch": 1}', "lacks 'best'")):
        (tmp_path / "state.json").write_text(content)
        with pytest.raises(ValueError, match=rf"state\.json: damaged, {reason}.*train without --resume"):
            keeper.restore()
    state = {k: 0 for k in ("epoch", "best", "best_epoch", "wait", "stopped", "history", "seconds")}
    for config, reason in (([], "'config' is not an object"), ({"epochs": "two"}, "its config is invalid")):
        (tmp_path / "state.json").write_text(json.dumps({**state, "config": config}))
        with pytest.raises(ValueError, match=rf"state\.json: damaged, {reason}.*train without --resume"):
            keeper.restore()
    config = BranchConfig(view="rgb", image_size=16).to_dict()
    for files, reason in (({"last": "../x.keras", "best": "b.h5"}, "damaged, 'files' must name two files"),
                          ([], "damaged, 'files' must name two files"),
                          ({"last": "last-0001.keras", "best": "b.h5"}, "last-0001.keras: missing from the checkpoint")):
        (tmp_path / "state.json").write_text(json.dumps({**state, "config": config, "files": files}))
        with pytest.raises(ValueError, match=rf"{reason}.*train without --resume"):
            keeper.restore()


# ------------------------------------------------------------ run directories (misleading messages)
def test_a_missing_run_is_not_described_as_a_missing_manifest(tmp_path, capsys):
    nope = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(nope))}: no such run directory") as info:
        load_ensemble(nope)
    assert "manifest" not in str(info.value)
    for command, argv in ((predict_main, [IMAGE]), (evaluate_main, ["-q"])):
        line = _cli_error(capsys, command(["--run", str(nope), *argv]), rf"{re.escape(str(nope))}: no such run directory")
        assert "manifest" not in line
    (tmp_path / "run.txt").write_text("a file")
    with pytest.raises(FileNotFoundError, match="run.txt: not a run directory"):
        load_ensemble(tmp_path / "run.txt")


def test_a_run_without_an_ensemble_says_run_fuse_first(tmp_path, capsys):
    run = _make_run(tmp_path, fused=False)
    expected = f"no ensemble in {run}; run `skinfusion fuse --run {run}` first"
    with pytest.raises(FileNotFoundError) as info:
        load_ensemble(run)
    assert str(info.value) == expected
    (run / "ensemble").mkdir()  # an ensemble folder without its manifest (an interrupted fuse) is no ensemble
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_ensemble(run)
    for command, argv in ((predict_main, [IMAGE]), (evaluate_main, ["-q"])):
        _cli_error(capsys, command(["--run", str(run), *argv]), re.escape(expected))


def test_a_retrained_branch_says_re_run_fuse_to_re_sign(run):
    # retraining rewrites a branch's files: valid, but not what the manifest signed
    meta = run / "branches" / "rgb" / "metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "created": "2030-01-01T00:00:00+00:00"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(meta))}: SHA-256 differs .*if you retrained a branch, "
                                         rf"re-run `skinfusion fuse --run {re.escape(str(run))}` to re-sign the bundle"):
        load_ensemble(run)
    fuse_run(str(run), "mean", VIEWS3)  # what the hint says to do
    assert load_ensemble(run).views == list(VIEWS3)


def test_the_re_fuse_hint_repeats_the_bundles_settings(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "branches", run / "branches")
    shutil.copytree(FIXTURE / "ensemble-stack", run / "ensemble")
    (run / "branches" / "rgb" / "config.json").write_text((run / "branches" / "rgb" / "config.json").read_text() + "\n")
    with pytest.raises(ValueError, match=rf"re-run `skinfusion fuse --run {re.escape(str(run))} --method stack` to re-sign"):
        load_ensemble(run)


# ------------------------------------------------------------ a damaged splits.csv / split.json
HEADER = "image_id,label,group_id,source,split\n"
SPLITS_DAMAGE = {
    "empty": (b"", r"the file is empty"),
    "header-only": (HEADER.encode(), r"the train, val, test splits have no images"),
    "no-split-column": (b"image_id,label,group_id,source\nimg00,0,g00,A\n", r"lacks column\(s\) split"),
    "unknown-split": (f"{HEADER}img00,0,g00,A,train\nimg01,1,g01,A,validation\n".encode(),
                      r"line 3: unknown split 'validation' \(expected one of train, val, test\)"),
    "garbage": (bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)), r"damaged"),
    "nul-bytes": (b"\x00\x01garbage\n", r"lacks column"),
    "not-utf8": (f"{HEADER}img00,0,g00,A,train\n".encode() + "caf\u00e9,1,g01,A,val\n".encode("latin-1"),
                 r"not UTF-8 text"),
    "utf16": (f"{HEADER}img00,0,g00,A,train\n".encode("utf-16"), r"not UTF-8 text"),
    "short-row": (f"{HEADER}img00,0,g00\n".encode(), r"line 2 does not have the header's 5 fields"),
    "long-row": (f"{HEADER}img00,0,g00,A,train,extra\n".encode(), r"line 2 does not have the header's 5 fields"),
    "bad-label": (f"{HEADER}img00,melanoma,g00,A,train\n".encode(), r"line 2: expected an image id and a label 0 or 1"),
    "twice": (f"{HEADER}img00,0,g00,A,train\nimg00,0,g00,A,test\n".encode(), r"line 3: image 'img00' is listed twice"),
    "no-test": (f"{HEADER}img00,0,g00,A,train\nimg01,1,g01,A,val\n".encode(), r"the test split has no images"),
}


@pytest.mark.parametrize("case", SPLITS_DAMAGE)
def test_a_damaged_splits_csv_is_refused(run, case):
    content, reason = SPLITS_DAMAGE[case]
    (run / "splits.csv").write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_split(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'splits.csv'}: damaged"), message
    assert re.search(reason, message) and message.endswith("the run's split is damaged; start a new --run"), message


def test_a_splits_csv_that_lost_whole_rows_disagrees_with_split_json(run):
    path = run / "splits.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # cut at a line end: still valid CSV
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: damaged, it holds .* but split\.json recorded"):
        load_split(run)


SPLIT_JSON_DAMAGE = {
    "a-list": ("[]", r"holds a JSON list"),
    "not-json": ("{", r"not valid JSON"),
    "no-fingerprint": (json.dumps({"data_dir": "/x"}), r"lacks 'dataset_fingerprint'"),
    "fingerprint-a-number": (json.dumps({"data_dir": "/x", "dataset_fingerprint": 3}), r"'dataset_fingerprint' must be"),
    "data-dir-a-list": (json.dumps({"data_dir": [], "dataset_fingerprint": "f"}), r"'data_dir' must be"),
    "seed-a-string": (json.dumps({"data_dir": "/x", "dataset_fingerprint": "f", "split_seed": "0"}), r"'split_seed'"),
    "counts-a-number": (json.dumps({"data_dir": "/x", "dataset_fingerprint": "f", "counts": 3}), r"'counts'"),
}


@pytest.mark.parametrize("case", SPLIT_JSON_DAMAGE)
def test_a_damaged_split_json_is_refused(run, case):
    content, reason = SPLIT_JSON_DAMAGE[case]
    (run / "split.json").write_text(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'split.json'))}: damaged, {reason}.*start a new --run"):
        load_split(run)


def test_a_missing_split_json_is_refused(run):
    (run / "split.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"split\.json: missing; the run's split is damaged; start a new --run"):
        load_split(run)


@pytest.mark.parametrize("case", ["empty", "garbage", "unknown-split", "no-test", "header-only"])
def test_evaluate_on_a_damaged_split_exits_2_instead_of_scoring_0_images(run, case, capsys):
    (run / "splits.csv").write_bytes(SPLITS_DAMAGE[case][0])
    line = _cli_error(capsys, evaluate_main(["--run", str(run), "-q"]), re.escape(str(run / "splits.csv")),
                      r"start a new --run")
    assert "0 images" not in line
    assert not (run / "metrics.json").exists()


def test_verify_split_on_a_damaged_split_exits_2(run, capsys):
    (run / "split.json").write_text("[]")
    _cli_error(capsys, main(["verify-split", "--run", str(run), "--no-hash", "-q"]), re.escape(str(run / "split.json")))


# ------------------------------------------------------------ a saved split that no longer fits its dataset
@pytest.fixture
def split_run(tmp_path):
    from skinfusion.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_images=80, size=16, seed=4)
    run = tmp_path / "run"
    prepare_split(str(data), str(run))
    return data, run


def _edit_rows(run: Path, change) -> None:
    lines = (run / "splits.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    change(rows)
    (run / "splits.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")


def _move_within_counts(rows):
    # swap the splits of one image of a multi-image group and an image of another split: the
    # counts stay, the group crosses
    groups = [r[2] for r in rows]
    a = next(i for i, r in enumerate(rows) if groups.count(r[2]) > 1)
    b = next(i for i, r in enumerate(rows) if r[4] != rows[a][4] and r[2] != rows[a][2])
    rows[a][4], rows[b][4] = rows[b][4], rows[a][4]


@pytest.mark.parametrize("change, reason", [
    (lambda rows: rows[0].__setitem__(0, "NOT_AN_IMAGE"), r"1 image ids are not in the dataset \(e\.g\. 'NOT_AN_IMAGE'\)"),
    (lambda rows: rows[0].__setitem__(1, str(1 - int(rows[0][1]))), r"1 labels differ from the dataset's"),
    (_move_within_counts, r"group .* crosses splits"),
], ids=["unknown-id", "relabelled", "group-crosses"])
def test_reusing_a_split_that_no_longer_fits_the_dataset_is_refused(split_run, change, reason, capsys):
    data, run = split_run
    _edit_rows(run, change)
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / 'splits.csv'))}: damaged, {reason}.*start a new --run"):
        prepare_split(str(data), str(run))
    rc = train_main(["--view", "rgb", "--data", str(data), "--run", str(run), "--image-size", "16", "--epochs", "1", "-q"])
    _cli_error(capsys, rc, re.escape(str(run / "splits.csv")), reason)
    assert not (run / "branches" / "rgb" / "model.keras").exists()
