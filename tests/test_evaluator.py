"""The Evaluator on hand-made probabilities: the metrics.json schema, the subsets, and the result files."""

import csv
import json

import numpy as np
import pytest

from skinfusion.data.index import Record
from skinfusion.workflows.evaluation import METRICS_SCHEMA_VERSION, Evaluator, RunInfo, Scored

# docs/cli.md's "metrics.json schema (version 2)", in file order.
SCHEMA_KEYS = ["schema_version", "run", "scope", "method", "metadata", "n_images", "n_skipped", "members", "fused",
               "per_source", "per_dx_type", "per_subset", "inference_seconds", "tta"]


def _scored():
    labels = [1, 0, 0, 1, 0, 0, 1, 0]
    sources = ["A", "A", "A", "A", "B", "B", "B", "B"]
    records = [Record(f"i{k}", f"/x/i{k}.jpg", y, f"g{k}", s) for k, (y, s) in enumerate(zip(labels, sources))]
    rgb = np.array([0.9, 0.2, 0.3, 0.8, 0.1, 0.6, 0.7, 0.4])
    hsv = np.array([0.6, 0.5, 0.1, 0.9, 0.2, 0.3, 0.4, 0.7])
    P = np.stack([rgb, hsv], axis=1)
    return Scored(records, P, P.mean(axis=1), failures=[("/x/bad.jpg", "cannot decode")], seconds=1.23456)


def test_evaluate_builds_the_documented_schema_at_the_validation_thresholds():
    scored = _scored()
    ev = Evaluator(["rgb", "hsv"], threshold=0.5, branch_thresholds={"rgb": 0.5, "hsv": 0.45}, n_boot=20)
    m = ev.evaluate(scored, RunInfo("/runs/r", "test split", "mean", ("age",)))
    assert list(m) == SCHEMA_KEYS and m["schema_version"] == METRICS_SCHEMA_VERSION == 2
    assert (m["run"], m["scope"], m["method"], m["metadata"]) == ("/runs/r", "test split", "mean", ["age"])
    assert (m["n_images"], m["n_skipped"], m["inference_seconds"], m["tta"]) == (8, 1, 1.235, False)
    assert list(m["members"]) == ["rgb", "hsv"]
    assert m["members"]["hsv"]["threshold"] == 0.45 and m["fused"]["threshold"] == 0.5
    # rgb at 0.5: melanomas 0.9, 0.8, 0.7 found; nevus 0.6 is the one false positive.
    assert m["members"]["rgb"]["confusion_matrix"] == {"tn": 4, "fp": 1, "fn": 0, "tp": 3}
    assert list(m["per_source"]) == ["A", "B"]
    assert m["per_source"]["A"]["n"] == 4 and m["per_source"]["A"]["n_melanoma"] == 2
    assert m["per_source"]["A"]["rgb"]["auc"] == 1.0 and set(m["per_source"]["B"]) == {"n", "n_melanoma", "rgb", "hsv", "fused"}
    assert m["per_subset"] == {}


def test_per_subset_splits_artefact_free_from_each_artefact():
    scored = _scored()
    ev = Evaluator(["rgb", "hsv"], 0.5, {"rgb": 0.5, "hsv": 0.5}, n_boot=10)
    m = ev.evaluate(scored, RunInfo("r", "s", "mean"), {"colour_disc": {"i0", "i5"}, "ink": {"i5", "i6"}})
    sub = m["per_subset"]
    assert list(sub) == ["artefact-free", "colour_disc", "ink"]
    assert [sub[k]["n"] for k in sub] == [5, 2, 2]
    # colour_disc holds one nevus, i5, fused 0.45: below 0.5, so specificity 1.
    assert sub["colour_disc"]["fused_mean_proba_nevus"] == pytest.approx(0.45)
    assert sub["colour_disc"]["fused_specificity"] == 1.0
    assert sub["ink"]["rgb"]["auc"] == 1.0 and sub["ink"]["n_melanoma"] == 1


def test_write_round_trips_metrics_and_predictions(tmp_path):
    scored = _scored()
    ev = Evaluator(["rgb", "hsv"], 0.5, {"rgb": 0.5, "hsv": 0.5}, n_boot=10)
    m = ev.evaluate(scored, RunInfo("r", "s", "mean"))
    ev.write(tmp_path, m, scored)
    assert json.loads((tmp_path / "metrics.json").read_text())["fused"]["auc"] == pytest.approx(m["fused"]["auc"])
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image_id", "label", "source", "rgb", "hsv", "fused"]
    assert [r["image_id"] for r in rows] == [r.image_id for r in scored.records]
    np.testing.assert_allclose([float(r["fused"]) for r in rows], scored.fused, atol=1e-6)
    np.testing.assert_allclose([[float(r["rgb"]), float(r["hsv"])] for r in rows], scored.P, atol=1e-6)


def test_evaluator_validates_its_settings():
    with pytest.raises(ValueError, match="n_boot must be at least 1, got 0"):
        Evaluator(["rgb"], 0.5, {"rgb": 0.5}, n_boot=0)
    with pytest.raises(ValueError, match=r"no validation threshold for branch\(es\) \['fft'\]"):
        Evaluator(["rgb", "fft"], 0.5, {"rgb": 0.5})
