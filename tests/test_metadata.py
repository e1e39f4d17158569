"""Metadata fusion (age, sex, site): encoding, the stacker, the dataset readers, and the whole path
fuse → evaluate → predict on a SYNTHETIC run whose metadata carries signal."""

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import ensemble
from ensemble.fusion import StackingFusion, make_fusion
from ensemble.metadata import MIN_SITE_COUNT, MetadataEncoder, parse_fields


def test_parse_fields():
    assert parse_fields("age, sex") == ("age", "sex")
    assert parse_fields(["site"]) == ("site",)
    assert parse_fields("") == () and parse_fields(None) == ()
    with pytest.raises(ValueError, match="unknown metadata field.*'weight'"):
        parse_fields("age,weight")
    with pytest.raises(ValueError, match="repeat"):
        parse_fields("age,age")


def test_encoder_columns_unknowns_and_site_vocabulary():
    fit_meta = [{"site": "back"}] * MIN_SITE_COUNT + [{"site": "ear"}] * (MIN_SITE_COUNT - 1)
    enc = MetadataEncoder(["age", "sex", "site"]).fit(fit_meta)
    assert enc.sites_ == ["back"]  # "ear" is too rare to get its own column
    assert enc.feature_names == ["age", "age_unknown", "sex_male", "sex_female", "site_back", "site_unknown"]
    X = enc.transform([
        {"age": "70", "sex": "Male", "site": "back"},
        {"age": 30.0, "sex": "female", "site": "ear"},       # rare site -> unknown
        {"age": "", "sex": "unknown", "site": "nan"},          # every spelling of unknown
        {"age": "abc", "sex": None},                           # unparseable age, missing site
        None,                                                  # nothing known
        {"age": 200},                                          # impossible age -> unknown
    ])
    np.testing.assert_allclose(X, [
        [1.0, 0, 1, 0, 1, 0],
        [-1.0, 0, 0, 1, 0, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 1],
    ])


def _meta_problem(rng, n):
    """Weakly informative members, strongly informative age."""
    y = (rng.random(n) < 0.3).astype(int)
    P = np.clip(0.5 + 0.08 * (y[:, None] - 0.3) + rng.normal(0, 0.15, (n, 3)), 0.01, 0.99)
    age = np.where(y == 1, rng.normal(68, 8, n), rng.normal(42, 8, n))
    meta = [{"age": float(a), "sex": "male" if rng.random() < 0.5 else "female"} for a in age]
    return P, y, meta


def test_stacker_uses_metadata_and_refuses_to_run_without_it(rng):
    P, y, meta = _meta_problem(rng, 1200)
    Pt, yt, meta_t = _meta_problem(rng, 1200)
    plain = StackingFusion().fit(P, y)
    with_meta = make_fusion("stack", "age,sex").fit(P, y, meta)
    auc_plain = roc_auc_score(yt, plain.predict_proba(Pt)[:, 1])
    auc_meta = roc_auc_score(yt, with_meta.predict_proba(Pt, meta_t)[:, 1])
    assert auc_meta > auc_plain + 0.1, (auc_plain, auc_meta)
    w = with_meta.weights(["rgb", "hsv", "fft"])
    assert w["age"] > 1.0 and abs(w["sex_male"] - w["sex_female"]) < 0.5  # sex carries no signal here
    with pytest.raises(ValueError, match=r"fuses metadata \(age, sex\)"):
        with_meta.predict_proba(Pt)
    with pytest.raises(ValueError, match="3 metadata entries for 1200 images"):
        with_meta.predict_proba(Pt, meta_t[:3])
    # unknown metadata is scored, not refused, and lands between the informative extremes
    p_unknown = with_meta.predict_proba(Pt[:1], [None])[0, 1]
    p_old = with_meta.predict_proba(Pt[:1], [{"age": 80}])[0, 1]
    p_young = with_meta.predict_proba(Pt[:1], [{"age": 25}])[0, 1]
    assert p_young < p_old and 0.0 < p_unknown < 1.0
    with pytest.raises(ValueError, match="needs --method stack"):
        make_fusion("mean", "age")
    with pytest.raises(ValueError, match="needs meta"):
        make_fusion("stack", "age").fit(P, y)
    with pytest.raises(ValueError, match="metadata entry 1 is a str"):
        with_meta.predict_proba(Pt[:2], [{"age": 50}, "age=50"])
    # None entries are allowed when fitting too (an image the dataset has no metadata for)
    make_fusion("stack", "age").fit(P, y, [None] * 3 + meta[3:])


def test_dataset_readers_keep_metadata(tmp_path):
    import cv2

    from skinfusion.data.layouts import index_dataset

    img = np.full((16, 16, 3), 120, np.uint8)
    # labels.csv + metadata.csv (this project's layout)
    a = tmp_path / "a"
    (a / "images").mkdir(parents=True)
    for i in ("x1", "x2"):
        cv2.imwrite(str(a / "images" / f"{i}.jpg"), img)
    (a / "labels.csv").write_text("image_id,label\nx1,melanoma\nx2,nevus\n")
    (a / "metadata.csv").write_text("image_id,group_id,age,sex,site\nx1,g1,65.0,male,back\nx2,g2,,female,\n")
    recs = {r.image_id: r for r in index_dataset(a).records}
    assert recs["x1"].metadata() == {"age": "65.0", "sex": "male", "site": "back"}
    assert recs["x2"].metadata() == {"age": "", "sex": "female", "site": ""}
    # one-image folders in the isic-cli layout (age_approx, anatom_site_general) and HAM10000's
    # (localization)
    for folder, csv_name, table, expected in [
        ("b", "metadata.csv", "isic_id,diagnosis,age_approx,sex,anatom_site_general\n"
                              "ISIC_1,melanoma,55,female,upper extremity\n",
         {"age": "55", "sex": "female", "site": "upper extremity"}),
        ("c", "HAM10000_metadata.csv", "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
                                       "HAM_1,ISIC_1,nv,histo,40.0,male,trunk\n",
         {"age": "40.0", "sex": "male", "site": "trunk"}),
    ]:
        d = tmp_path / folder
        d.mkdir()
        cv2.imwrite(str(d / "ISIC_1.jpg"), img)
        (d / csv_name).write_text(table)
        (r,) = index_dataset(d).records
        assert r.metadata() == expected, folder


@pytest.fixture(scope="module")
def meta_run(trained_run, synthetic_data, tmp_path_factory):
    """A copy of the trained SYNTHETIC run on a copy of its dataset whose metadata.csv has an
    age that separates the classes (about 25 years apart), sex without signal, and gaps."""
    root = tmp_path_factory.mktemp("meta")
    data, run = root / "data", root / "run"
    shutil.copytree(synthetic_data, data)
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval-*", "*.png", "report.html"))
    rng = np.random.default_rng(1)
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(data / "labels.csv"))}
    groups = {r["image_id"]: r["group_id"] for r in csv.DictReader(open(data / "metadata.csv"))}
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "group_id", "age", "sex", "site"])
        for i, (image_id, label) in enumerate(sorted(labels.items())):
            age = "" if i % 17 == 0 else f"{rng.normal(70 if label == 'melanoma' else 45, 6):.0f}"
            w.writerow([image_id, groups[image_id], age, ["male", "female", ""][i % 3], "back"])
    info = json.loads((run / "split.json").read_text())
    info["data_dir"] = str(data)
    (run / "split.json").write_text(json.dumps(info))
    return run, data


@pytest.mark.slow
def test_metadata_fusion_end_to_end(meta_run, tmp_path, capsys):
    from skinfusion.cli import evaluate_main, fuse_main, predict_main

    run, data = meta_run
    assert evaluate_main(["--run", str(run), "--bootstrap", "100", "--no-plots", "--no-audit", "-q"]) == 0
    image_only = json.loads((run / "metrics.json").read_text())
    assert image_only["metadata"] == []

    assert fuse_main(["--run", str(run), "--method", "mean", "--metadata", "age", "-q"]) == 2
    assert "needs --method stack" in capsys.readouterr().err
    assert fuse_main(["--run", str(run), "--method", "stack", "--metadata", "age,sex", "-q"]) == 0
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    assert manifest["metadata"] == ["age", "sex"]
    assert evaluate_main(["--run", str(run), "--bootstrap", "100", "--no-plots", "--no-audit", "-q"]) == 0
    with_meta = json.loads((run / "metrics.json").read_text())
    assert with_meta["metadata"] == ["age", "sex"]
    # The synthetic branches already separate almost perfectly, so the AUC has no room to rise;
    # what must show is that the stacker learned age's direction.
    ensemble.clear_cache()
    w = ensemble.load(run).fusion.weights(["rgb", "hsv", "fft"])
    assert w["age"] > 0.3, w  # 0.86 when written; an unused feature would sit near 0
    assert with_meta["fused"]["auc"] >= image_only["fused"]["auc"] - 0.02

    # Python API: metadata is required, and changes the answer the way age should
    ensemble.clear_cache()
    img = str(next((data / "images").glob("*.jpg")))
    with pytest.raises(ValueError, match=r"fuses metadata \(age, sex\)"):
        ensemble.predict(img, run=run)
    old = ensemble.predict(img, run=run, metadata={"age": 75, "sex": "male"})
    young = ensemble.predict(img, run=run, metadata={"age": 30, "sex": "male"})
    unknown = ensemble.predict(img, run=run, metadata={})
    assert young < old and 0.0 <= unknown <= 1.0
    batch = ensemble.predict_proba([img, img], run=run, metadata=[{"age": 75, "sex": "male"}, {"age": 30, "sex": "male"}])
    np.testing.assert_allclose(batch, [old, young], atol=1e-6)

    # CLI: predict without --metadata is refused with the fields named; with it, rows match by image_id
    assert predict_main(["--run", str(run), img, "-q"]) == 2
    assert "fuses metadata (age, sex)" in capsys.readouterr().err
    stem = img.rsplit("/", 1)[1][:-4]
    table = tmp_path / "meta.csv"
    table.write_text(f"image_id,age,sex\n{stem},75,male\n")
    out = tmp_path / "pred.csv"
    assert predict_main(["--run", str(run), img, "--metadata", str(table), "--out", str(out), "-q"]) == 0
    (row,) = list(csv.DictReader(open(out)))
    assert float(row["melanoma_proba"]) == pytest.approx(old, abs=1e-5)
    table.write_text("image_id,age\nx,1\n")
    assert predict_main(["--run", str(run), img, "--metadata", str(table), "-q"]) == 2
    assert "lacks ['sex']" in capsys.readouterr().err


@pytest.mark.slow
def test_manifest_and_fusion_must_agree_on_metadata(meta_run):
    from skinfusion.cli import fuse_main

    run, _ = meta_run
    assert fuse_main(["--run", str(run), "--method", "stack", "--metadata", "age", "-q"]) == 0
    path = run / "ensemble" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metadata"] = []  # the manifest is edited to hide that the stacker needs metadata
    path.write_text(json.dumps(manifest))
    ensemble.clear_cache()
    with pytest.raises(ValueError, match=r"fuses metadata \['age'\], but the manifest says \[\]"):
        ensemble.load(run)
