"""End to end on a tiny SYNTHETIC dataset: train, fuse, evaluate, predict, and the bundle's guarantees."""

import csv
import json
import shutil

import numpy as np
import pytest

import ensemble
from colorspaces import ImageError, MissingImageError, read_image
from skinfusion.cli import evaluate_main, fuse_main, main, predict_main, train_main

from helpers import write_rgb

pytestmark = pytest.mark.slow


def _test_paths(run, data, n=None):
    with open(run / "splits.csv", newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh) if r["split"] == "test"]
    return [str(data / "images" / f"{i}.jpg") for i in ids[:n]]


def test_run_layout_and_metadata(trained_run):
    for view in ("rgb", "hsv", "fft"):
        b = trained_run / "branches" / view
        for name in ("model.keras", "config.json", "metadata.json", "val_predictions.csv", "skipped.csv"):
            assert (b / name).is_file(), name
        meta = json.loads((b / "metadata.json").read_text())
        assert meta["view"] == view and meta["input_size"] == [32, 32, 3]
        assert meta["split_seed"] == 0 and len(meta["dataset_fingerprint"]) == 16
        assert 0.0 <= meta["validation_metrics"]["auc"] <= 1.0
        assert json.loads((b / "config.json").read_text())["image_size"] == 32
    manifest = json.loads((trained_run / "ensemble" / "manifest.json").read_text())
    assert manifest["branch_order"] == ["rgb", "hsv", "fft"] and manifest["method"] == "mean"
    assert 0.0 < manifest["threshold"] < 1.0
    with open(trained_run / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    side = {}
    for r in rows:
        assert side.setdefault(r["group_id"], r["split"]) == r["split"]


def test_branches_learned_and_evaluate_writes_metrics(trained_run, capsys, tmp_path):
    isic = tmp_path / "isic.csv"
    assert evaluate_main(["--run", str(trained_run), "--bootstrap", "200", "--isic-csv", str(isic)]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "AUC per source" in out
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["scope"] == "test split" and m["n_images"] > 20
    assert set(m["members"]) == {"rgb", "hsv", "fft"}
    for report in [*m["members"].values(), m["fused"]]:
        lo, hi = report["auc_ci95"]
        assert lo <= report["auc"] <= hi
    # The synthetic classes (no look-alikes here) differ in size, colour and border: a working
    # pipeline separates them, a broken one (wrong labels, views or thresholds) gives ~0.5.
    assert m["fused"]["auc"] > 0.85
    assert m["per_source"]["synthetic"]["fused"]["auc"] == pytest.approx(m["fused"]["auc"])
    with open(trained_run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image_id", "label", "source", "rgb", "hsv", "fft", "fused"]
    assert len(rows) == m["n_images"]
    with open(isic, newline="") as fh:
        isic_rows = list(csv.DictReader(fh))
    assert list(isic_rows[0]) == ["image", "MEL", "NV"]
    assert [r["image"] for r in isic_rows] == [r["image_id"] for r in rows]
    assert all(abs(float(r["MEL"]) + float(r["NV"]) - 1) < 1e-5 for r in isic_rows)
    assert all(float(a["MEL"]) == pytest.approx(float(b["fused"]), abs=1e-6) for a, b in zip(isic_rows, rows))
    for name in ("roc.png", "pr.png", "reliability.png"):
        assert (trained_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (trained_run / "report.html").read_text()
    assert 'href="roc.png"' in page and "AUC per source" in page and f"{m['fused']['auc']:.3f}" in page
    fused_report = m["fused"]
    for key in ("average_precision", "brier", "ece", "confusion_matrix", "sensitivity_at_specificity", "specificity_at_sensitivity"):
        assert key in fused_report
    assert sum(fused_report["confusion_matrix"].values()) == m["n_images"]
    fused = np.array([float(r["fused"]) for r in rows])
    members = np.array([[float(r[v]) for v in ("rgb", "hsv", "fft")] for r in rows])
    np.testing.assert_allclose(fused, members.mean(axis=1), atol=1e-5)


def test_predict_path_array_and_pil_agree(trained_run, synthetic_data):
    from PIL import Image

    ensemble.clear_cache()
    path = _test_paths(trained_run, synthetic_data, 1)[0]
    p_path = ensemble.predict(path, run=trained_run)
    arr = read_image(path)
    assert isinstance(p_path, float) and 0.0 <= p_path <= 1.0
    assert ensemble.predict(arr, run=trained_run) == pytest.approx(p_path, abs=1e-7)
    assert ensemble.predict(Image.fromarray(arr), run=trained_run) == pytest.approx(p_path, abs=1e-7)


def test_fused_prediction_is_batch_independent(trained_run, synthetic_data):
    paths = _test_paths(trained_run, synthetic_data, 33)
    alone = ensemble.predict(paths[0], run=trained_run)
    batch = ensemble.predict_proba(paths, run=trained_run)
    assert batch.shape == (33,)
    assert abs(batch[0] - alone) <= 1e-5
    # order is preserved: reversing the input reverses the output
    np.testing.assert_allclose(ensemble.predict_proba(paths[::-1], run=trained_run), batch[::-1], atol=1e-5)


def test_fusion_is_fitted_on_validation_ids_and_bundle_reproduces_it(trained_run):
    with open(trained_run / "splits.csv", newline="") as fh:
        val_ids = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == "val"}
    preds = {}
    for view in ("rgb", "hsv", "fft"):
        with open(trained_run / "branches" / view / "val_predictions.csv", newline="") as fh:
            preds[view] = {r["image_id"]: float(r["melanoma_proba"]) for r in csv.DictReader(fh)}
        assert set(preds[view]) == val_ids
    manifest = json.loads((trained_run / "ensemble" / "manifest.json").read_text())
    assert manifest["n_validation"] == len(val_ids)
    ensemble.clear_cache()
    ens = ensemble.load(trained_run)
    ids = sorted(val_ids)
    P = np.array([[preds[v][i] for v in ens.views] for i in ids])
    with open(trained_run / "splits.csv", newline="") as fh:
        y = np.array([int(r["label"]) for r in sorted(csv.DictReader(fh), key=lambda r: r["image_id"]) if r["split"] == "val"])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, ens.fuse(P)) == pytest.approx(manifest["validation_metrics"]["fused"]["auc"], abs=1e-9)
    # the saved val probabilities are what the loaded branches produce on those images
    data = json.loads((trained_run / "split.json").read_text())["data_dir"]
    first = [f"{data}/images/{i}.jpg" for i in ids[:5]]
    np.testing.assert_allclose(ens.member_proba(first), P[:5], atol=1e-5)


def test_bundle_is_loaded_once(trained_run):
    ensemble.clear_cache()
    assert ensemble.load(trained_run) is ensemble.load(str(trained_run))


def test_predict_errors_name_the_image(trained_run, tmp_path):
    with pytest.raises(MissingImageError, match="missing.jpg"):
        ensemble.predict(tmp_path / "missing.jpg", run=trained_run)
    with pytest.raises(ImageError, match="dtype"):
        ensemble.predict(np.zeros((8, 8, 3), np.float64), run=trained_run)
    with pytest.raises(TypeError, match="sequence of images"):
        ensemble.predict_proba("one.jpg", run=trained_run)


def test_predict_without_run_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("SKINFUSION_RUN", raising=False)
    with pytest.raises(ValueError, match="SKINFUSION_RUN"):
        ensemble.predict(np.zeros((8, 8, 3), np.uint8))


def test_stack_fusion_and_tampered_bundle_is_refused(trained_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert fuse_main(["--run", str(run), "--method", "stack", "-q"]) == 0
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    assert manifest["method"] == "stack"
    p = ensemble.predict(np.full((20, 20, 3), 120, np.uint8), run=run)
    assert 0.0 <= p <= 1.0
    with open(run / "ensemble" / "fusion.joblib", "ab") as fh:
        fh.write(b"tampered")
    ensemble.clear_cache()
    with pytest.raises(ValueError, match="fusion.joblib: SHA-256 differs"):
        ensemble.load(run)


def test_cli_predict_prints_csv_and_flags_bad_files(trained_run, synthetic_data, tmp_path, capsys):
    paths = _test_paths(trained_run, synthetic_data, 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    rc = predict_main(["--run", str(trained_run), *paths, str(bad)])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert rc == 1 and lines[0] == "path,melanoma_proba,in_distribution_score,out_of_distribution,ood_reason"
    assert len(lines) == 3
    cells = lines[1].split(",")
    assert cells[0] == paths[0] and 0 <= float(cells[1]) <= 1
    # The run was fused with a gate: every image gets a score and a verdict.
    assert 0 <= float(cells[2]) <= 1 and cells[3] in ("0", "1")
    assert "bad.jpg" in captured.err


def test_run_refuses_other_data_and_cli_reports_errors(trained_run, tmp_path, capsys):
    from skinfusion.data.synthetic import make_synthetic_dataset

    other = make_synthetic_dataset(tmp_path / "other", n_images=60, size=32, seed=9)
    rc = train_main(["--view", "rgb", "--data", str(other), "--run", str(trained_run), "--epochs", "1", "-q"])
    assert rc == 2 and "fingerprint" in capsys.readouterr().err
    assert main(["fuse", "--run", str(tmp_path / "missing"), "-q"]) == 2
    assert "missing: no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["fuse", "--run", str(tmp_path / "empty"), "-q"]) == 2
    assert "lacks model.keras" in capsys.readouterr().err
    assert main(["nosuch"]) == 2


def test_evaluate_on_another_folder(trained_run, tmp_path):
    from skinfusion.data.synthetic import make_synthetic_dataset

    other = make_synthetic_dataset(tmp_path / "clinic", n_images=80, size=64, seed=11)
    assert evaluate_main(["--run", str(trained_run), "--data", str(other), "--bootstrap", "100", "-q"]) == 0
    m = json.loads((trained_run / "eval-clinic" / "metrics.json").read_text())
    assert m["n_images"] == 80 and m["scope"].startswith("all images of")


def _add_disc_image(data, image_id="DISC_NEVUS"):
    """Copy a nevus and draw an orange sticker disc cut off by the image edge."""
    import cv2

    img = read_image(data / "images" / "SYN_000000.jpg").copy()
    h, w = img.shape[:2]
    cv2.circle(img, (w - 4, h // 4), w // 5, (245, 140, 20), -1)
    write_rgb(data / "images" / f"{image_id}.jpg", img)
    with open(data / "labels.csv", "a") as fh:
        fh.write(f"{image_id},nevus,synthetic\n")
    with open(data / "metadata.csv", "a") as fh:
        fh.write(f"{image_id},{image_id}\n")


def test_audit_cli_flags_a_disc_and_training_can_exclude_it(tmp_path, capsys):
    from skinfusion.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", n_images=120, size=64, seed=4, atypical_rate=0.0)
    _add_disc_image(data)
    (data / "images" / "SYN_000005.jpg").write_bytes(b"corrupt")
    out = tmp_path / "audit.csv"
    rc = main(["audit", "--data", str(data), "--out", str(out), "-q"])
    assert rc == 1  # one unreadable image
    printed = capsys.readouterr().out
    assert "1 unreadable" in printed and "colour disc" in printed
    with open(out, newline="") as fh:
        rows = {r["image_id"]: r for r in csv.DictReader(fh)}
    assert rows["DISC_NEVUS"]["colour_disc"] == "True"
    assert rows["SYN_000005"]["readable"] == "False" and "cannot decode" in rows["SYN_000005"]["error"]
    assert sum(r["colour_disc"] == "True" for r in rows.values()) <= 2
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["per_class"]["nevus"]["colour_disc"]["count"] >= 1 and summary["n_unreadable"] == 1

    run = tmp_path / "run"
    rc = train_main(["--view", "rgb", "--data", str(data), "--run", str(run), "--image-size", "32",
                     "--epochs", "1", "--exclude-artefacts", "--audit", str(out), "-q"])
    with open(run / "splits.csv", newline="") as fh:
        split_of = {r["image_id"]: r["split"] for r in csv.DictReader(fh)}
    assert rc == (1 if split_of["SYN_000005"] in ("train", "val") else 0)  # 1: an unreadable image was skipped
    flagged = {i for i, r in rows.items() if r["colour_disc"] == "True" or r["ink"] == "True"}
    meta = json.loads((run / "branches" / "rgb" / "metadata.json").read_text())
    assert split_of["DISC_NEVUS"] == "train"  # seeded split; the exclusion below must bite
    assert meta["excluded_from_training"] == sum(split_of[i] == "train" for i in flagged) >= 1
    assert meta["skipped_images"] == (1 if split_of["SYN_000005"] in ("train", "val") else 0)


def test_evaluate_reports_artefact_subsets_from_an_audit_file(trained_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    with open(trained_run / "splits.csv", newline="") as fh:
        test = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    disc = {r["image_id"] for r in test if r["label"] == "0"}
    disc = set(sorted(disc)[:3])
    ink = {next(r["image_id"] for r in test if r["label"] == "1")}
    audit = tmp_path / "audit.csv"
    with open(audit, "w", newline="") as fh:  # spreadsheet spelling of booleans on purpose
        fh.write("image_id,colour_disc,ink\n")
        for r in test:
            fh.write(f"{r['image_id']},{'TRUE' if r['image_id'] in disc else 'FALSE'},{'1' if r['image_id'] in ink else '0'}\n")
    out = tmp_path / "eval"
    assert evaluate_main(["--run", str(trained_run), "--out", str(out), "--audit", str(audit),
                          "--bootstrap", "100", "--no-plots", "-q"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    sub = m["per_subset"]
    assert sub["colour_disc"]["n"] == 3 and sub["colour_disc"]["n_melanoma"] == 0
    assert sub["ink"]["n"] == 1 and sub["artefact-free"]["n"] == m["n_images"] - 4
    with open(out / "predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["image_id"] not in disc | ink]
    expected = roc_auc_score([int(r["label"]) for r in rows], [float(r["fused"]) for r in rows])
    assert sub["artefact-free"]["fused"]["auc"] == pytest.approx(expected)
    assert sub["colour_disc"]["fused"]["auc"] is None  # one class only: undefined, written as null


def test_verify_split_cli_finds_a_planted_crossing_pair(trained_run, tmp_path, capsys):
    with open(trained_run / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    a = next(r["image_id"] for r in rows if r["split"] == "train")
    b = next(r["image_id"] for r in rows if r["split"] == "test")
    assert main(["verify-split", "--run", str(trained_run), "--no-hash", "-q"]) == 0
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image_id_a,image_id_b\n{a},{b}\n")
    assert main(["verify-split", "--run", str(trained_run), "--no-hash", "--pairs", str(pairs), "-q"]) == 1
    out = capsys.readouterr().out
    assert a in out and b in out and "1 problems" in out


def test_evaluate_split_val_scores_the_validation_images_per_source(trained_run, capsys, tmp_path):
    assert evaluate_main(["--run", str(trained_run), "--split", "val", "--bootstrap", "200", "--no-plots",
                          "--no-audit"]) == 0
    captured = capsys.readouterr()
    assert "not reporting one" in captured.err  # the validation images chose epochs and thresholds
    assert captured.out.startswith("validation split:")
    out = trained_run / "eval-val"
    m = json.loads((out / "metrics.json").read_text())
    with open(trained_run / "splits.csv", newline="") as fh:
        val_ids = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == "val"}
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert m["scope"] == "validation split" and {r["image_id"] for r in rows} == val_ids
    assert "per_source" in m and m["n_images"] == len(val_ids)
    # The bundle's scores of these images are the ones training saved for them (val_predictions.csv).
    with open(trained_run / "branches" / "rgb" / "val_predictions.csv", newline="") as fh:
        saved = {r["image_id"]: float(r["melanoma_proba"]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose([float(r["rgb"]) for r in rows], [saved[r["image_id"]] for r in rows], atol=1e-4)
    assert not (trained_run / "metrics.json").exists() or json.loads(
        (trained_run / "metrics.json").read_text())["scope"] == "test split"  # the test results stay apart
    assert evaluate_main(["--run", str(trained_run), "--split", "val", "--data", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err
