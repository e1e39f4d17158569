"""Subgroup AUCs (age band, sex, site) and risk–coverage, on generated labels and probabilities;
then once through ``skinfusion evaluate`` on a fused run built without training (the committed
16-px branches of tests/fixtures/legacy-0.1.0, as tests/test_data_messages.py does)."""

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from skinfusion.cli import evaluate_main
from skinfusion.data.synthetic import make_synthetic_dataset
from skinfusion.workflows import evaluation
from skinfusion.workflows.coverage import (
    accept_order,
    gate_row,
    risk_coverage,
    scored_risk_coverage,
    write_risk_coverage_csv,
    write_risk_coverage_png,
)
from skinfusion.workflows.fusing import fuse_run
from skinfusion.workflows.subgroups import (
    SUBGROUP_COLUMNS,
    age_band,
    sex_group,
    site_group,
    subgroup_report,
    write_subgroups_csv,
)
from tests.helpers import fixture_branches_on_split
from skinfusion.workflows.tables import (
    format_risk_coverage_table,
    format_subgroup_table,
)

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"


def _meta(n, **fields):
    """``n`` metadata dicts; each keyword is one value for all, or a list of n values."""
    cols = {f: (v if isinstance(v, list) else [v] * n) for f, v in fields.items()}
    return [{f: cols.get(f, [""] * n)[i] for f in ("age", "sex", "site")} for i in range(n)]


# --- subgroups ------------------------------------------------------------------------------

def test_a_perfectly_ranked_subgroup_scores_one_and_a_random_one_about_a_half():
    rng = np.random.default_rng(0)
    y_f = rng.integers(0, 2, 200)
    p_f = np.clip(0.5 * y_f + rng.uniform(0, 0.45, 200), 0, 1)  # every melanoma above every nevus
    y_m = rng.integers(0, 2, 3000)
    p_m = rng.uniform(0, 1, 3000)  # no relation to the label
    rep = subgroup_report(np.r_[y_f, y_m], np.r_[p_f, p_m],
                          _meta(3200, sex=["female"] * 200 + ["male"] * 3000), n_boot=50)
    female, male = rep["groups"]["sex"]["female"], rep["groups"]["sex"]["male"]
    assert female["auc"] == 1.0 and female["note"] == ""
    assert female["n"] == 200 and female["n_melanoma"] == int(y_f.sum()) and female["n_nevus"] == 200 - y_f.sum()
    assert abs(male["auc"] - 0.5) < 0.04
    assert male["auc_ci95"][0] < 0.5 < male["auc_ci95"][1]
    assert list(rep["groups"]["sex"]) == ["female", "male"]  # nobody of unknown sex: no unknown row


def test_a_subgroup_with_three_melanomas_or_three_nevi_is_too_few_never_a_number(tmp_path):
    rng = np.random.default_rng(1)
    y = np.r_[[1] * 3 + [0] * 40, [1] * 40 + [0] * 3, [1] * 20 + [0] * 20]
    p = rng.uniform(0, 1, len(y))
    site = ["palms"] * 43 + ["nails"] * 43 + ["back"] * 40
    rep = subgroup_report(y, p, _meta(len(y), site=site), n_boot=20)
    rows = rep["groups"]["site"]
    assert rows["palms"]["note"] == "too few melanomas (n=3)" and np.isnan(rows["palms"]["auc"])
    assert all(np.isnan(v) for v in rows["palms"]["auc_ci95"])
    assert rows["nails"]["note"] == "too few nevi (n=3)" and np.isnan(rows["nails"]["auc"])
    assert rows["back"]["note"] == "" and 0 <= rows["back"]["auc"] <= 1
    table = format_subgroup_table(rep)
    palms = next(ln for ln in table.splitlines() if " palms " in ln)
    assert palms.endswith("too few melanomas (n=3)")
    write_subgroups_csv(tmp_path / "s.csv", rep)
    with open(tmp_path / "s.csv", newline="") as fh:
        by_group = {r["group"]: r for r in csv.DictReader(fh)}
    assert by_group["palms"]["auc"] == "" and by_group["palms"]["auc_ci95_low"] == ""
    assert by_group["palms"]["note"] == "too few melanomas (n=3)"
    assert float(by_group["back"]["auc"]) == pytest.approx(rows["back"]["auc"], abs=1e-4)


@pytest.mark.parametrize("age, band", [
    (29, "<30"), (30, "30-44"), (44, "30-44"), (44.5, "30-44"), (45, "45-59"), (59, "45-59"), (60, "60-74"),
    (74, "60-74"), (75, "75+"), (85.0, "75+"), ("0", "<30"), (" 45 ", "45-59"),
    ("", "unknown"), ("NA", "unknown"), ("sixty", "unknown"), (-1, "unknown"), (130, "unknown"), (None, "unknown"),
])
def test_age_bands_split_at_30_45_60_75(age, band):
    assert age_band(age) == band


def test_unknown_values_go_to_unknown_listed_last_and_unreadable_ones_are_named(caplog):
    assert [sex_group(v) for v in ("Female", " MALE ", "F", "", "unknown", None)] == \
           ["female", "male", "unknown", "unknown", "unknown", "unknown"]
    assert [site_group(v) for v in ("Back", "", "N/A", "head, neck")] == ["back", "unknown", "unknown", "head, neck"]
    y = np.array([1, 0] * 30)
    meta = _meta(60, age=["50", "F", ""] * 20, sex=["M", "female", "NA"] * 20, site=["back", "", "face"] * 20)
    with caplog.at_level(logging.WARNING):
        rep = subgroup_report(y, np.linspace(0, 1, 60), meta, n_boot=10)
    assert list(rep["groups"]["age"]) == ["45-59", "unknown"] and rep["groups"]["age"]["unknown"]["n"] == 40
    assert list(rep["groups"]["sex"]) == ["female", "unknown"] and rep["groups"]["sex"]["unknown"]["n"] == 40
    assert list(rep["groups"]["site"]) == ["back", "face", "unknown"]
    text = caplog.text
    assert "age: 20 values not understood ('F')" in text and "sex: 20 values not understood ('M')" in text


def test_a_field_no_image_records_has_no_rows_rather_than_one_unknown_row():
    rep = subgroup_report([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], _meta(4, age="40"), n_boot=10)
    assert rep["groups"]["sex"] == {} and rep["groups"]["site"] == {}
    assert "(not recorded)" in format_subgroup_table(rep)
    with pytest.raises(ValueError, match="3 labels, 4 probabilities, 4 metadata rows"):
        subgroup_report([0, 1, 0], [0.1, 0.9, 0.2, 0.8], _meta(4), n_boot=10)


def test_subgroups_csv_round_trips_site_names_with_commas_and_quotes(tmp_path):
    sites = ["head, neck", 'palms "soles"', "upper extremity"]
    y = np.tile([1, 0], 45)
    rep = subgroup_report(y, np.random.default_rng(2).uniform(0, 1, 90), _meta(90, site=sites * 30), n_boot=10)
    write_subgroups_csv(tmp_path / "subgroups.csv", rep)
    with open(tmp_path / "subgroups.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUBGROUP_COLUMNS
    assert [r["group"] for r in rows] == sorted(sites)
    assert all(r["field"] == "site" and r["n"] == "30" and r["n_melanoma"] == "15" for r in rows)
    for r in rows:
        assert float(r["auc"]) == pytest.approx(rep["groups"]["site"][r["group"]]["auc"], abs=1e-4)


# --- risk-coverage --------------------------------------------------------------------------

def _noisy(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.4).astype(int)
    return y, np.clip(0.3 + 0.35 * y + rng.normal(0, 0.22, n), 0, 1)


def test_a_score_that_ranks_the_wrong_predictions_last_raises_the_auc_as_coverage_falls():
    y, p = _noisy(600, 3)
    wrong = (p >= 0.5).astype(int) != y
    score = -wrong.astype(float) + np.random.default_rng(4).normal(0, 0.01, len(y))  # right ones first
    res = risk_coverage(y, p, score, 0.5, n_boot=20)
    rows = {r["coverage"]: r for r in res["curves"]["in_distribution"]}
    assert list(rows) == [1.0, 0.95, 0.9, 0.8, 0.7, 0.5]
    assert rows[1.0]["n"] == 600 and rows[0.5]["n"] == 300
    assert rows[1.0]["error_rate"] == pytest.approx(wrong.mean())
    assert rows[0.5]["error_rate"] == 0.0 < rows[1.0]["error_rate"]
    assert rows[0.5]["auc"] > rows[1.0]["auc"] + 0.05
    assert res["aurc"]["in_distribution"] < wrong.mean()
    assert res["risk"].startswith("error rate") and res["n_score_missing"] == 0
    table = format_risk_coverage_table(res)
    assert table.splitlines()[0].split()[:4] == ["accepted", "by", "coverage", "n"]
    assert len(table.splitlines()) == 1 + 12 + 1


def test_a_random_score_does_not_systematically_raise_the_auc():
    gains = []
    for seed in range(30):
        y, p = _noisy(400, 100 + seed)
        score = np.random.default_rng(200 + seed).uniform(size=len(y))
        rows = {r["coverage"]: r for r in risk_coverage(y, p, score, 0.5, n_boot=1)["curves"]["in_distribution"]}
        gains.append(rows[0.5]["auc"] - rows[1.0]["auc"])
    gains = np.array(gains)
    assert abs(gains.mean()) < 0.015
    assert 0.2 < (gains > 0).mean() < 0.8


def test_the_confidence_baseline_keeps_the_images_farthest_from_the_threshold():
    y, p = _noisy(200, 5)
    res = risk_coverage(y, p, np.zeros(len(y)), 0.4, coverages=(0.5,), n_boot=1)
    kept = accept_order(np.abs(p - 0.4))[:100]
    rest = np.setdiff1d(np.arange(200), kept)
    assert np.abs(p[kept] - 0.4).min() >= np.abs(p[rest] - 0.4).max()
    assert res["curves"]["confidence"][0]["n_melanoma"] == int(y[kept].sum())


def test_ties_are_broken_at_random_not_by_input_order_and_unscored_images_come_last():
    # Records sorted melanoma-first and a score that cannot tell them apart: an input-order
    # tie-break would keep only melanomas at 50% coverage.
    y = np.r_[np.ones(50, int), np.zeros(50, int)]
    res = risk_coverage(y, np.linspace(0, 1, 100), np.zeros(100), 0.5, coverages=(0.5,), n_boot=1, minimum=1)
    assert 15 < res["curves"]["in_distribution"][0]["n_melanoma"] < 35
    order = accept_order([0.2, np.nan, 0.9, 0.5])
    assert list(order) == [2, 3, 0, 1]
    res = risk_coverage([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [1, np.nan, 2, 3], 0.5, n_boot=1)
    assert res["n_score_missing"] == 1


def test_risk_coverage_refuses_mismatched_arrays_and_bad_coverages():
    with pytest.raises(ValueError, match="4 labels, 4 probabilities, 3 scores"):
        risk_coverage([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [1, 2, 3], 0.5)
    with pytest.raises(ValueError, match=r"coverages must be in \(0, 1\], got \[0.0, 1.5\]"):
        risk_coverage([0, 1], [0.1, 0.9], [1, 2], 0.5, coverages=(0.0, 1.5, 0.5))


def test_without_an_in_distribution_score_risk_coverage_is_skipped_with_one_line(caplog):
    records = [SimpleNamespace(label=k % 2) for k in range(20)]
    fused = np.full(20, 0.5)
    with caplog.at_level(logging.INFO):
        assert scored_risk_coverage(SimpleNamespace(records=records, fused=fused), 0.5, 10) is None
        assert scored_risk_coverage(SimpleNamespace(records=records, fused=fused, in_distribution_score=None),
                                    0.5, 10) is None
        # a bundle without a gate scores every image NaN: no ranking to speak of
        assert scored_risk_coverage(SimpleNamespace(records=records, fused=fused, in_distribution_score=np.full(20, np.nan),
                                                    out_of_distribution=np.full(20, np.nan)), 0.5, 10) is None
    assert caplog.text.count("risk-coverage skipped") == 3


def test_the_gate_verdict_is_the_row_of_the_images_it_passed(tmp_path):
    y, p = _noisy(300, 8)
    flagged = np.select([np.arange(300) % 10 == 0, np.arange(300) % 10 == 1], [1.0, np.nan], 0.0)
    row = gate_row(y, p, flagged, 0.5, n_boot=10)
    kept = flagged == 0  # no verdict (NaN) is not a pass
    assert row["coverage"] == pytest.approx(0.8) and row["n"] == 240 and row["n_melanoma"] == int(y[kept].sum())
    assert row["error_rate"] == pytest.approx((((p >= 0.5).astype(int)) != y)[kept].mean())
    assert gate_row(y, p, np.full(300, np.nan), 0.5, n_boot=10) is None
    with pytest.raises(ValueError, match="300 labels, 299 verdicts"):
        gate_row(y, p, flagged[1:], 0.5, n_boot=10)
    scored = SimpleNamespace(records=[SimpleNamespace(label=int(v)) for v in y], fused=p,
                             in_distribution_score=np.random.default_rng(9).uniform(size=300), out_of_distribution=flagged)
    res = scored_risk_coverage(scored, 0.5, n_boot=10)
    assert res["gate"]["n"] == 240
    write_risk_coverage_csv(tmp_path / "rc.csv", res)
    with open(tmp_path / "rc.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert (last["ranking"], last["coverage"], last["n"]) == ("gate_verdict", "0.800", "240")
    assert format_risk_coverage_table(res).splitlines()[-2].startswith("gate_verdict")
    write_risk_coverage_png(tmp_path / "rc.png", res, y, p, scored.in_distribution_score)
    assert (tmp_path / "rc.png").read_bytes().startswith(b"\x89PNG")


def test_risk_coverage_csv_and_png_are_written(tmp_path):
    y, p = _noisy(300, 6)
    score = np.random.default_rng(7).uniform(size=300)
    res = risk_coverage(y, p, score, 0.5, n_boot=20)
    write_risk_coverage_csv(tmp_path / "rc.csv", res)
    with open(tmp_path / "rc.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["ranking"], r["coverage"]) for r in rows[:2]] == [("in_distribution", "1.000"), ("in_distribution", "0.950")]
    assert len(rows) == 12 and rows[-1]["ranking"] == "confidence"
    assert float(rows[0]["auc"]) == pytest.approx(res["curves"]["in_distribution"][0]["auc"], abs=1e-4)
    write_risk_coverage_png(tmp_path / "rc.png", res, y, p, score)
    data = (tmp_path / "rc.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


# --- through skinfusion evaluate ------------------------------------------------------------

@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    """A SYNTHETIC dataset with age/sex/site (one site name holding a comma), its run split, the
    legacy branches and a mean fusion."""
    root = tmp_path_factory.mktemp("subgroups")
    data = make_synthetic_dataset(root / "data", n_images=120, melanoma_fraction=0.4, size=32, seed=8)
    with open(data / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "group_id", "age", "sex", "site"])
        for k, r in enumerate(rows):
            w.writerow([r["image_id"], r["group_id"], [25, 40, 55, 70, 80, ""][k % 6], ["male", "female", ""][k % 3],
                        ["back", "head, neck", ""][k % 3]])
    run = root / "run"
    fixture_branches_on_split(data, run, FIXTURE)
    fuse_run(str(run), "mean", ("rgb", "hsv", "fft"))
    return run


class _WithScore:
    """A ``Scored`` that also carries an in-distribution score, whether or not ``Scored`` has the field."""

    def __init__(self, scored):
        self._scored = scored
        self.in_distribution_score = np.random.default_rng(0).uniform(size=len(scored.records))
        self.out_of_distribution = (self.in_distribution_score < 0.2).astype(float)

    def __getattr__(self, name):
        return getattr(self._scored, name)


def test_evaluate_writes_prints_and_reports_subgroups_and_risk_coverage(fused_run, tmp_path, monkeypatch, capsys):
    real = evaluation.score_records
    monkeypatch.setattr(evaluation, "score_records", lambda *a, **k: _WithScore(real(*a, **k)))
    assert evaluate_main(["--run", str(fused_run), "--out", str(tmp_path), "--no-audit", "--bootstrap", "100", "-q"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    groups = metrics["subgroups"]["groups"]
    assert metrics["subgroups"]["min_per_class"] == 10 and set(groups) == {"age", "sex", "site"}
    assert list(groups["site"]) == ["back", "head, neck", "unknown"]
    assert sum(r["n"] for r in groups["age"].values()) == metrics["n_images"]
    assert all(r["auc"] is None and r["note"].startswith("too few") for r in groups["site"].values())
    with open(tmp_path / "subgroups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert ("site", "head, neck") in {(r["field"], r["group"]) for r in rows}
    assert len(rows) == sum(len(g) for g in groups.values())
    rc = metrics["risk_coverage"]
    assert rc["curves"]["in_distribution"][0]["n"] == metrics["n_images"] and "confidence" in rc["curves"]
    assert 0 < rc["gate"]["n"] < metrics["n_images"]
    assert (tmp_path / "risk_coverage.csv").is_file() and (tmp_path / "risk_coverage.png").stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert "Fused AUC per subgroup" in page and "head, neck" in page and 'href="risk_coverage.png"' in page
    out = capsys.readouterr().out
    assert "Fused AUC per subgroup (not scored with fewer than 10 melanomas or nevi):" in out
    assert "Risk-coverage:" in out and "subgroups.csv, risk_coverage.csv" in out


def test_evaluate_without_an_in_distribution_score_writes_no_risk_coverage(fused_run, tmp_path, monkeypatch):
    # As a bundle from before the gate existed scores: no in-distribution score at all.
    real = evaluation.score_records
    monkeypatch.setattr(evaluation, "score_records", lambda *a, **k: SimpleNamespace(
        **{**vars(real(*a, **k)), "in_distribution_score": None, "out_of_distribution": None}))
    m = evaluation.evaluate(str(fused_run), out_dir=str(tmp_path),
                            options=evaluation.EvaluateOptions(n_boot=100, audit=False, plots=False))
    assert m["risk_coverage"] is None and not (tmp_path / "risk_coverage.csv").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["risk_coverage"] is None
    assert (tmp_path / "subgroups.csv").is_file() and m["subgroups"]["groups"]["sex"]
