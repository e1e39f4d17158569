"""The image-size / width sweep: grid parsing, the one-standard-error choice, and a tiny real sweep."""

import json
import os

import pytest

from experiments.sweep import choose, main, parse_point


def test_grid_points_parse_and_bad_ones_are_named():
    assert parse_point("128x16") == (128, 16)
    assert parse_point(" 96X32 ") == (96, 32)
    for bad in ("128", "128x", "x16", "12.5x16", "8x16", "128x0"):
        with pytest.raises(ValueError, match=bad.strip().replace(".", r"\.")):
            parse_point(bad)


def _row(auc, se, cost):
    return {"val_auc": auc, "val_auc_se": se, "seconds_per_epoch": cost}


def test_one_standard_error_rule_takes_the_cheapest_point_near_the_best():
    best, near_cheap, far_cheaper = _row(0.88, 0.01, 100), _row(0.875, 0.012, 40), _row(0.86, 0.01, 10)
    assert choose([best, near_cheap, far_cheaper]) is near_cheap  # within one SE (of the best), cheaper
    assert choose([best, far_cheaper]) is best  # 0.02 below: outside one SE
    same_cost = _row(0.872, 0.01, 40)
    assert choose([best, same_cost, near_cheap]) is near_cheap  # equal cost: the higher validation AUC
    with pytest.raises(ValueError, match="no grid points"):
        choose([])


@pytest.mark.slow
def test_sweep_trains_each_point_as_configured_and_reuses_finished_points(synthetic_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--data", str(synthetic_data), "--out", str(out), "--view", "hsv", "--grid", "32x4", "32x8",
            "--epochs", "6"]
    assert main(args) == 0
    result = json.loads((out / "sweep-hsv.json").read_text())
    rows = result["rows"]
    assert [(r["image_size"], r["base_filters"]) for r in rows] == [(32, 4), (32, 8)]
    for r in rows:
        saved = json.loads((out / f"hsv-32px-{r['base_filters']}f" / "branches" / "hsv" / "config.json").read_text())
        assert (saved["image_size"], saved["base_filters"], saved["epochs"], saved["patience"], saved["lr_schedule"]) \
            == (32, r["base_filters"], 6, 6, "cosine")
        assert r["epochs"] == 6  # no early stop: every point gets the same budget
    # doubling the width roughly quadruples the conv weights
    assert 3.0 < rows[1]["parameters"] / rows[0]["parameters"] < 4.5
    # both points share one split
    splits = {(out / f"hsv-32px-{w}f" / "splits.csv").read_text() for w in (4, 8)}
    assert len(splits) == 1
    assert max(r["val_auc"] for r in rows) > 0.7, rows  # the synthetic lesions are learnable at 32 px
    assert result["chosen"] in rows
    assert "**(chosen)**" in capsys.readouterr().out
    model = out / "hsv-32px-4f" / "branches" / "hsv" / "model.keras"
    mtime = os.stat(model).st_mtime_ns
    assert main(args) == 0  # rerun: re-scores, does not retrain
    assert os.stat(model).st_mtime_ns == mtime
    assert json.loads((out / "sweep-hsv.json").read_text())["rows"][0]["val_auc"] == pytest.approx(rows[0]["val_auc"])


def test_sweep_refuses_a_bad_grid_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--grid", "128x16", "big"])
    assert "'big'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "missing: no such folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
