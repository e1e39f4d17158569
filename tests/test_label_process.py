"""The nevus label process (issue 27) on tiny SYNTHETIC data: dx_type read from every layout that
records it, AUC per dx_type in evaluate, and the training options follow_up_weight and select_on."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ensemble.metrics import choose_threshold
from models import BranchConfig, build_branch
from models.sampling import epoch_order
from models import seeds as member_training
from models.train import training_batches
from skinfusion.cli import evaluate_main, train_main
from skinfusion.data.index import DX_TYPES, Record, dx_type_of
from skinfusion.data.layouts import index_dataset
from skinfusion.data.synthetic import make_synthetic_dataset
from skinfusion.workflows import training
from skinfusion.workflows.evaluation import Evaluator, RunInfo, Scored
from skinfusion.workflows.fusing import fuse_run
from skinfusion.workflows.labelprocess import selection_mask, training_records, training_weights
from skinfusion.workflows.runsplit import prepare_split
from skinfusion.workflows.tables import format_dx_type_table
from tests.helpers import fixture_branches_on_split, write_rgb

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
# As the datasets write them: HAM10000, the ISIC archive's diagnosis_confirm_type, blank.
SPELLINGS = ["histo", "follow_up", "", "consensus", "confocal", "serial imaging showing no change",
             "Histopathology", "single image expert consensus"]
EXPECTED = ["histopathology", "follow_up", "unknown", "consensus", "confocal", "follow_up",
            "histopathology", "consensus"]


def _tiny_image(path):
    write_rgb(path, np.full((16, 16, 3), 120, np.uint8))


def _add_dx_types(data: Path, dx_of) -> None:
    """Rewrite a synthetic dataset's metadata.csv with a dx_type column, ``dx_of(k, label)`` per row."""
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(data / "labels.csv", newline=""))}
    with open(data / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "group_id", "dx_type"])
        for k, r in enumerate(rows):
            w.writerow([r["image_id"], r["group_id"], dx_of(k, labels[r["image_id"]])])


def test_every_spelling_maps_to_the_one_vocabulary():
    assert [dx_type_of(s) for s in SPELLINGS] == EXPECTED
    assert set(EXPECTED) <= set(DX_TYPES) and dx_type_of("biopsy, probably") is None


def test_labels_csv_layout_reads_dx_type_from_metadata_csv_and_names_spellings_it_does_not_know(tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_images=24, melanoma_fraction=0.4, size=16, seed=1)
    _add_dx_types(data, lambda k, label: (SPELLINGS + ["biopsy??"])[k % 9])
    index = index_dataset(data, log=False)
    order = [r["image_id"] for r in csv.DictReader(open(data / "metadata.csv", newline=""))]
    got = {r.image_id: r.dx_type for r in index.records}
    assert [got[i] for i in order] == [(EXPECTED + ["unknown"])[k % 9] for k in range(len(order))]
    assert index.unread_dx_types == {"biopsy??": sum(1 for k in range(len(order)) if k % 9 == 8)}
    assert "dx_type not understood, counted as unknown: 'biopsy??'=" in index.summary()


def test_isic_cli_layout_reads_diagnosis_confirm_type(tmp_path):
    rows = [("ISIC_1", "melanoma", "histopathology"), ("ISIC_2", "nevus", "serial imaging showing no change"),
            ("ISIC_3", "nevus", "single image expert consensus"), ("ISIC_4", "nevus", "")]
    with open(tmp_path / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("isic_id", "diagnosis", "diagnosis_confirm_type"), *rows])
    for image_id, *_ in rows:
        _tiny_image(tmp_path / f"{image_id}.jpg")
    index = index_dataset(tmp_path, log=False)
    assert index.format == "isic-cli"
    assert {r.image_id: r.dx_type for r in index.records} == {
        "ISIC_1": "histopathology", "ISIC_2": "follow_up", "ISIC_3": "consensus", "ISIC_4": "unknown"}


def test_ham10000_layout_reads_dx_type_and_class_folders_have_none(tmp_path):
    ham = tmp_path / "ham"
    (ham / "HAM10000_images_part_1").mkdir(parents=True)
    rows = [("ISIC_1", "mel", "histo"), ("ISIC_2", "nv", "follow_up"), ("ISIC_3", "nv", "consensus"),
            ("ISIC_4", "nv", "confocal")]
    with open(ham / "HAM10000_metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("lesion_id", "image_id", "dx", "dx_type"),
                                  *[(f"HAM_{i}", i, dx, t) for i, dx, t in rows]])
    for image_id, *_ in rows:
        _tiny_image(ham / "HAM10000_images_part_1" / f"{image_id}.jpg")
    index = index_dataset(ham, log=False)
    assert index.format == "ham10000"
    assert [r.dx_type for r in index.records] == ["histopathology", "follow_up", "consensus", "confocal"]
    for cls in ("melanoma", "nevus"):
        (tmp_path / "folders" / cls).mkdir(parents=True)
        _tiny_image(tmp_path / "folders" / cls / f"{cls}.png")
    assert {r.dx_type for r in index_dataset(tmp_path / "folders", log=False).records} == {"unknown"}


def _scored(dx_types):
    labels = [1, 0, 1, 0, 1, 0, 0, 0, 0, 0]
    records = [Record(f"i{k}", "", y, f"g{k}", "A", dx_type=d) for k, (y, d) in enumerate(zip(labels, dx_types))]
    p = np.array([0.9, 0.2, 0.8, 0.3, 0.4, 0.6, 0.1, 0.2, 0.7, 0.3])
    return Scored(records, p[:, None], p)


def test_per_dx_type_scores_each_confirmation_and_says_why_a_nevi_only_group_has_no_auc():
    dx = ["histopathology"] * 6 + ["follow_up"] * 4
    ev = Evaluator(["rgb"], threshold=0.5, branch_thresholds={"rgb": 0.5}, n_boot=20)
    m = ev.evaluate(_scored(dx), RunInfo("r", "s", "mean"))
    rows = m["per_dx_type"]
    assert list(rows) == ["histopathology", "follow_up"] and list(m).index("per_dx_type") == list(m).index("per_source") + 1
    histo, fu = rows["histopathology"], rows["follow_up"]
    # histopathology: melanomas 0.9, 0.8, 0.4; nevi 0.2, 0.3, 0.6: 8 of 9 pairs ranked right.
    assert histo["fused"]["auc"] == pytest.approx(8 / 9) and histo["note"] == ""
    assert (histo["n"], histo["n_melanoma"], histo["n_nevus"]) == (6, 3, 3)
    assert histo["fused_sensitivity"] == pytest.approx(2 / 3) and histo["fused_specificity"] == pytest.approx(2 / 3)
    assert (fu["n_melanoma"], fu["n_nevus"]) == (0, 4) and math.isnan(fu["fused"]["auc"]) and math.isnan(fu["rgb"]["auc"])
    assert fu["note"] == "nevi only: AUC undefined; specificity shown"
    assert fu["fused_specificity"] == pytest.approx(3 / 4) and math.isnan(fu["fused_sensitivity"])
    table = format_dx_type_table(rows, ["rgb"])
    assert "nevi only: AUC undefined; specificity shown" in table and "nan" not in table
    assert ev.evaluate(_scored(["unknown"] * 10), RunInfo("r", "s", "mean"))["per_dx_type"] == {}


def _run_with_dx_types(tmp_path, select_on=None):
    """A fused run (the committed 16-px branches, hand-made validation scores) on SYNTHETIC data whose
    melanomas are biopsied and nevi biopsied, followed up or by consensus: the follow-up group is nevi only."""
    data = make_synthetic_dataset(tmp_path / "data", n_images=120, melanoma_fraction=0.4, size=32, seed=8)
    _add_dx_types(data, lambda k, label: "histo" if label == "melanoma" else ("histo", "follow_up", "consensus")[k % 3])
    run = tmp_path / "run"
    val, dirs = fixture_branches_on_split(data, run, FIXTURE)
    for bdir in dirs:
        if select_on:
            config = json.loads((bdir / "config.json").read_text())
            (bdir / "config.json").write_text(json.dumps({**config, "select_on": select_on}))
    return run, val


def test_evaluate_writes_prints_and_reports_auc_per_dx_type(tmp_path, capsys):
    run, _ = _run_with_dx_types(tmp_path)
    fuse_run(str(run), "mean", ("rgb", "hsv", "fft"))
    out = tmp_path / "eval"
    assert evaluate_main(["--run", str(run), "--out", str(out), "--no-audit", "--bootstrap", "100", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["per_dx_type"]
    assert set(rows) == {"histopathology", "follow_up", "consensus"}
    assert sum(r["n"] for r in rows.values()) == metrics["n_images"]
    assert rows["follow_up"]["n_melanoma"] == 0 and rows["follow_up"]["fused"]["auc"] is None
    assert rows["follow_up"]["note"].startswith("nevi only") and rows["follow_up"]["fused_specificity"] is not None
    assert rows["histopathology"]["fused"]["auc"] is not None and len(rows["histopathology"]["fused"]["auc_ci95"]) == 2
    printed = capsys.readouterr().out
    assert "AUC per diagnosis confirmation (dx_type" in printed and "nevi only: AUC undefined" in printed
    assert "AUC per diagnosis confirmation (dx_type)" in (out / "report.html").read_text()


def _records(dx_and_labels):
    return [Record(f"i{k}", "", y, f"g{k}", "A", dx_type=d) for k, (d, y) in enumerate(dx_and_labels)]


def test_follow_up_weight_zero_leaves_follow_up_images_out_of_every_sampled_epoch():
    recs = _records([("histopathology", 1)] * 4 + [("follow_up", 0)] * 6 + [("histopathology", 0)] * 5
                    + [("unknown", 0)] * 3)
    follow_up = {r.image_id for r in recs if r.dx_type == "follow_up"}
    kept, dropped = training_records(recs, BranchConfig(follow_up_weight=0.0))
    assert dropped == 6 and training_weights(kept, BranchConfig(follow_up_weight=0.0)) is None
    y = np.array([r.label for r in kept])
    for epoch in range(3):
        sampled = {kept[i].image_id for i in epoch_order(y, "oversample", np.random.default_rng([0, epoch]))}
        assert not sampled & follow_up
        assert sampled == {r.image_id for r in recs} - follow_up  # every other image is still visited
    assert training_records(recs, BranchConfig())[1] == 0


def test_a_follow_up_weight_between_scales_their_loss_in_the_training_batches():
    recs = _records([("histopathology", 1)] * 4 + [("follow_up", 0)] * 6 + [("consensus", 0)] * 6)
    config = BranchConfig(image_size=16, batch_size=4, epochs=1, follow_up_weight=0.25, augment=False)
    w = training_weights(recs, config)
    assert w.tolist() == [1.0] * 4 + [0.25] * 6 + [1.0] * 6
    images = np.zeros((len(recs), 16, 16, 3), np.uint8)
    y = np.array([r.label for r in recs])
    ds, steps = training_batches(images, y, config, {0: 1.0, 1: 1.0}, image_weights=w)
    weights = np.concatenate([np.asarray(sw) for _, _, sw in ds])
    # Oversampling visits each of the 12 nevi once (6 of them follow-up) and draws 12 melanomas.
    assert sorted(weights.tolist()) == [0.25] * 6 + [1.0] * 18


@pytest.mark.parametrize("select_on, expected", [
    ("all", [1, 1, 1, 1, 1, 1]), ("histopathology", [1, 1, 0, 0, 0, 0]), ("not_follow_up", [1, 1, 0, 1, 1, 0])])
def test_select_on_picks_the_validation_rows(select_on, expected):
    recs = _records([("histopathology", 1), ("histopathology", 0), ("follow_up", 0), ("unknown", 1),
                     ("unknown", 0), ("follow_up", 0)])
    assert selection_mask(recs, select_on).astype(int).tolist() == expected


def test_select_on_histopathology_is_refused_by_name_when_no_validation_melanoma_is_biopsied():
    recs = _records([("histopathology", 0), ("unknown", 1), ("follow_up", 0)])
    with pytest.raises(ValueError, match=r"--select-on histopathology: the validation split has 0 melanomas and 1 "
                                         r"nevi.*Use --select-on all, or not_follow_up"):
        selection_mask(recs, "histopathology")


def test_config_refuses_unknown_values_by_name():
    with pytest.raises(ValueError, match=r"select_on must be one of \('all', 'histopathology', 'not_follow_up'\)"):
        BranchConfig(select_on="biopsy")
    with pytest.raises(ValueError, match=r"follow_up_weight must be in \[0, 1\]"):
        BranchConfig(follow_up_weight=1.5)


def test_train_cli_refuses_a_bad_follow_up_weight_in_one_line(tmp_path, capsys):
    assert train_main(["--view", "rgb", "--data", str(tmp_path), "--run", str(tmp_path / "r"),
                       "--follow-up-weight", "-0.5"]) == 2
    err = capsys.readouterr().err
    assert "follow_up_weight must be in [0, 1]" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def dx_data(tmp_path_factory):
    """120 SYNTHETIC images: melanomas biopsied or unknown; nevi biopsied, followed up or unknown."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("dx") / "data", n_images=120, melanoma_fraction=0.4,
                                  size=16, seed=5)
    _add_dx_types(data, lambda k, label: ("histo", "follow_up", "")[k % 3] if label == "nevus" else ("histo", "")[k % 2])
    return data


@pytest.mark.parametrize("select_on, follow_up_weight", [("all", 1.0), ("histopathology", 0.0), ("not_follow_up", 0.5)])
def test_the_training_workflow_selects_on_those_validation_rows_and_records_it(dx_data, tmp_path, monkeypatch,
                                                                                select_on, follow_up_weight):
    seen = {}

    def fake_fit(config, train_images, y_train, val_images, y_val, **kwargs):
        # No training: record what the selection and the loss would see, return an untrained branch.
        seen.update(n_train=len(y_train), n_val=len(y_val), weights=kwargs["train_weights"])
        return build_branch(config), {"epochs_run": 0, "best_epoch": 0, "best_val_auc": math.nan,
                                      "class_weights": {}, "train_seconds": 0.0, "per_epoch": {}}

    # One seed: the workflow trains through models.seeds.fit_seeds, i.e. one fit_branch call.
    monkeypatch.setattr(member_training, "fit_branch", fake_fit)
    config = BranchConfig(image_size=16, select_on=select_on, follow_up_weight=follow_up_weight)
    run = tmp_path / "run"
    training.train_branch_run(training.TrainRequest(str(dx_data), str(run)), config)
    index, assign, _ = prepare_split(str(dx_data), str(run))
    split = {s: [r for r in index.records if assign[r.image_id] == s] for s in ("train", "val")}
    chosen = selection_mask(split["val"], select_on)
    assert seen["n_val"] == chosen.sum() and (select_on == "all") == chosen.all()
    n_follow_up = sum(r.dx_type == "follow_up" for r in split["train"])
    assert n_follow_up > 0 and seen["n_train"] == len(split["train"]) - (n_follow_up if follow_up_weight == 0 else 0)
    assert (seen["weights"] is None) == (follow_up_weight in (0.0, 1.0))
    bdir = run / "branches" / "rgb"
    meta = json.loads((bdir / "metadata.json").read_text())
    assert meta["label_process"]["select_on"] == select_on
    assert meta["label_process"]["n_validation_selecting"] == chosen.sum()
    assert meta["validation_metrics"]["n"] == len(split["val"])  # reported on every validation image
    saved = json.loads((bdir / "config.json").read_text())
    assert (saved["select_on"], saved["follow_up_weight"]) == (select_on, follow_up_weight)
    with open(bdir / "val_predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(split["val"])


@pytest.mark.parametrize("select_on", ["all", "histopathology"])
def test_fuse_chooses_its_thresholds_on_the_branches_select_on_images(tmp_path, select_on):
    run, val = _run_with_dx_types(tmp_path, select_on)
    # Melanomas mostly at 0.8, some at 0.6, biopsied nevi at 0.2, other nevi at 0.7: on every image the best threshold
    # is 0.8 (above the unbiopsied nevi), on the biopsied ones 0.6, so the two choices differ.
    for view in ("rgb", "hsv", "fft"):
        path = run / "branches" / view / "val_predictions.csv"
        lines = path.read_text().splitlines()
        dx = {r.image_id: r.dx_type for r in val}

        def score(k, i, y):
            return (0.6, 0.8, 0.8, 0.8)[k % 4] if y in ("1", "melanoma") else 0.2 if dx[i] == "histopathology" else 0.7
        path.write_text("\n".join([lines[0]] + [
            f"{i},{y},{score(k, i, y)}" for k, (i, y, _) in enumerate(line.split(",") for line in lines[1:])]) + "\n")
    result = fuse_run(str(run), "mean", ("rgb", "hsv", "fft"))
    rows = {}
    for view in ("rgb", "hsv", "fft"):
        with open(run / "branches" / view / "val_predictions.csv", newline="") as fh:
            rows[view] = {r["image_id"]: float(r["melanoma_proba"]) for r in csv.DictReader(fh)}
    ids = sorted(rows["rgb"])
    by_id = {r.image_id: r for r in val}
    y = np.array([by_id[i].label for i in ids])
    fused = np.array([np.mean([rows[v][i] for v in rows]) for i in ids])
    sel = selection_mask([by_id[i] for i in ids], select_on)
    assert (select_on == "all") == sel.all()
    assert result["threshold"] == pytest.approx(choose_threshold(y[sel], fused[sel]))
    if select_on != "all":  # the data tell the two choices apart, so this test fails without the hook
        assert choose_threshold(y[sel], fused[sel]) != pytest.approx(choose_threshold(y, fused))
    assert result["validation"]["fused"]["n"] == len(ids)  # reported on every validation image


def test_fuse_refuses_branches_trained_with_different_select_on(tmp_path):
    run, _ = _run_with_dx_types(tmp_path, "histopathology")
    config = json.loads((run / "branches" / "fft" / "config.json").read_text())
    (run / "branches" / "fft" / "config.json").write_text(json.dumps({**config, "select_on": "all"}))
    with pytest.raises(ValueError, match="different --select-on"):
        fuse_run(str(run), "mean", ("rgb", "hsv", "fft"))
