"""experiments.seeds (what averaging several seeds per view gains, from LOSO scores, no training) and loso --set."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from experiments.loso import main as loso_main
from experiments.seeds import compare_seeds, main, markdown

VIEWS = ("rgb", "hsv", "fft")


def _write_run(run: Path, labels: np.ndarray, roles: list[str], noise_seed: int, noise: float = 1.5,
               views: tuple[str, ...] = VIEWS) -> Path:
    """A scores.csv whose every view is the label's signal plus this seed's own noise."""
    rng = np.random.default_rng(noise_seed)
    run.mkdir(parents=True)
    with open(run / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "label", "source", "role", *views])
        for i, (y, role) in enumerate(zip(labels, roles)):
            logits = y + noise * rng.standard_normal(len(views))
            w.writerow([f"img{i:04d}", int(y), "SRC", role, *(1 / (1 + np.exp(-logits)))])
    return run


@pytest.fixture
def three_seeds(tmp_path):
    rng = np.random.default_rng(7)
    n = 600
    labels = (rng.random(n) < 0.3).astype(int)
    roles = list(rng.choice(["holdout_val", "holdout_test", "indist_test"], n))
    return [_write_run(tmp_path / f"s{s}", labels, roles, noise_seed=100 + s) for s in range(3)]


def test_averaging_seeds_with_independent_noise_raises_the_auc(three_seeds):
    r = compare_seeds(three_seeds, n_boot=200)
    assert r["views"] == list(VIEWS) and set(r["roles"]) == {"holdout_val", "holdout_test", "indist_test"}
    for role, e in r["roles"].items():
        # Nine noisy copies of the signal separate the classes better than three.
        assert e["all_seeds_fused"]["auc"] > max(s["auc"] for s in e["per_seed_fused"])
        d = e["delta_vs_seed0"]
        assert d["delta"] == pytest.approx(e["all_seeds_fused"]["auc"] - e["per_seed_fused"][0]["auc"], abs=2e-4)
        assert 0 < d["lo"] <= d["delta"] <= d["hi"]
        for v in VIEWS:
            assert e["per_view_all_seeds"][v]["auc"] > e["per_view_seed0"][v]["auc"]
    assert "| holdout_test |" in markdown(r)


def test_the_same_seed_twice_gains_nothing(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random(200) < 0.5).astype(int)
    roles = ["holdout_test"] * 200
    runs = [_write_run(tmp_path / name, labels, roles, noise_seed=5) for name in ("a", "b")]
    d = compare_seeds(runs, n_boot=50)["roles"]["holdout_test"]["delta_vs_seed0"]
    assert d == {"delta": 0.0, "lo": 0.0, "hi": 0.0}


def test_runs_of_different_splits_are_refused(tmp_path, capsys):
    labels = np.array([0, 1] * 50)
    a = _write_run(tmp_path / "a", labels, ["holdout_test"] * 100, 1)
    b = _write_run(tmp_path / "b", labels, ["holdout_val"] * 100, 2)
    with pytest.raises(ValueError, match="roles differ"):
        compare_seeds([a, b])
    assert main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "scores.csv: missing" in capsys.readouterr().err
    (tmp_path / "e" / "scores.csv").mkdir(parents=True)
    assert main([str(a), str(tmp_path / "e")]) == 2
    assert "scores.csv: is a directory" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "scores.csv").write_text("no,columns\n1,2\n")
    assert main([str(a), str(tmp_path / "c")]) == 2
    assert "not a scores.csv" in capsys.readouterr().err
    text = (a / "scores.csv").read_text().splitlines()
    text[1] = ",".join(text[1].split(",")[:4] + ["oops"] * 3)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "scores.csv").write_text("\n".join(text) + "\n")
    assert main([str(a), str(tmp_path / "d")]) == 2
    assert "damaged" in capsys.readouterr().err


@pytest.mark.parametrize("damage, reason", [
    (lambda lines: lines[:2] + [",".join(lines[2].split(",")[:5])] + lines[3:], "a missing cell"),
    (lambda lines: lines[:3] + [lines[3] + ",0.5"] + lines[4:], "more cells than the header"),
    (lambda lines: lines[:2] + [",".join("2" if i == 1 else c for i, c in enumerate(lines[2].split(",")))]
     + lines[3:], "label '2'"),
    (lambda lines: lines[:2] + [",".join(lines[2].split(",")[:-1] + ["1.5"])] + lines[3:], "score '1.5'"),
    (lambda lines: [], "not a scores.csv"),
])
def test_a_damaged_scores_csv_is_refused_by_line(tmp_path, capsys, damage, reason):
    """Every reader (seeds, loso compare) gets a named refusal, never a traceback."""
    labels = np.array([0, 1] * 20)
    roles = ["holdout_test"] * 40
    a = _write_run(tmp_path / "a", labels, roles, 1)
    b = _write_run(tmp_path / "b", labels, roles, 2)
    lines = damage((b / "scores.csv").read_text().splitlines())
    (b / "scores.csv").write_text("\n".join(lines) + ("\n" if lines else ""))
    for command in (lambda: main([str(a), str(b)]), lambda: loso_main(["compare", str(a), str(b)])):
        assert command() == 2
        err = capsys.readouterr().err
        assert str(b / "scores.csv") in err and reason in err, err
        assert "Traceback" not in err


def test_command_line_writes_the_table(three_seeds, tmp_path, capsys):
    assert main([*map(str, three_seeds), "--out", str(tmp_path / "out"), "--boot", "20"]) == 0
    assert "3 seeds fused" in capsys.readouterr().out
    assert (tmp_path / "out" / "seeds.md").read_text().count("\n") == 5


def test_loso_set_values_may_name_each_branch_view():
    from experiments.loso import _parse_set, branch_configs

    configs = branch_configs(_parse_set(["epochs=12", "seed=1", "init_from=runs/r/pretrain/{view}"]), ["rgb", "fft"])
    assert [c.init_from for c in configs] == ["runs/r/pretrain/rgb", "runs/r/pretrain/fft"]
    assert {c.epochs for c in configs} == {12} and {c.seed for c in configs} == {1}


def test_loso_set_may_override_one_view_only():
    from experiments.loso import _parse_set, branch_configs

    configs = branch_configs(_parse_set(["color_constancy@rgb=shades_of_gray", "color_constancy@hsv=shades_of_gray",
                                         "epochs=12", "epochs@fft=5"]), ["rgb", "hsv", "fft"])
    assert [c.color_constancy for c in configs] == ["shades_of_gray", "shades_of_gray", "none"]
    assert [c.epochs for c in configs] == [12, 12, 5]  # the view's own value wins over the shared one
    with pytest.raises(SystemExit, match="KEY@VIEW=VALUE"):
        _parse_set(["epochs@nosuchview=3"])


def test_loso_compare_gives_each_run_its_paired_difference_from_the_reference(three_seeds, tmp_path, capsys):
    from experiments.loso import compare

    rng = np.random.default_rng(7)
    labels = (rng.random(600) < 0.3).astype(int)
    roles = list(rng.choice(["holdout_val", "holdout_test", "indist_test"], 600))
    better = _write_run(tmp_path / "better", labels, roles, noise_seed=5, noise=0.3)  # far less noise: a real gain
    table = compare([three_seeds[0], better], n_boot=200)
    rows = {(r.split("|")[1].strip(), r.split("|")[3].strip()): r for r in table.splitlines()[2:]}
    assert len(rows) == 6 and "(reference)" in rows[("s0", "holdout_test")]
    delta = rows[("better", "holdout_test")].split("|")[6].split()
    assert float(delta[0]) > 0.05 and float(delta[1].strip("(")) > 0  # the paired CI excludes no change
    self_delta = compare([three_seeds[0], three_seeds[0]], n_boot=50).splitlines()[3]
    assert "+0.000 (+0.000 to +0.000)" in self_delta
    # A run with more views (a lever that adds a branch) fuses its own: the table says which.
    wider = _write_run(tmp_path / "wider", labels, roles, noise_seed=6, views=(*VIEWS, "rgb_sog", "lab"))
    row = next(r for r in compare([three_seeds[0], wider], n_boot=50).splitlines() if r.startswith("| wider"))
    assert row.split("|")[2].strip() == "rgb,hsv,fft,rgb_sog"  # the default views it has; lab is an option
    other = _write_run(tmp_path / "other", labels, list(reversed(roles)), noise_seed=1)
    with pytest.raises(ValueError, match="roles differ"):
        compare([three_seeds[0], other])
    assert loso_main(["compare", str(three_seeds[0]), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    damaged = _write_run(tmp_path / "damaged", labels, roles, noise_seed=2)
    text = (damaged / "scores.csv").read_text().splitlines()
    text[1] = ",".join(text[1].split(",")[:4] + ["oops"] * 3)
    (damaged / "scores.csv").write_text("\n".join(text) + "\n")
    assert loso_main(["compare", str(three_seeds[0]), str(damaged)]) == 2
    assert f"{damaged / 'scores.csv'}: line 2 is damaged" in capsys.readouterr().err


def test_compare_can_fuse_chosen_views_in_every_run(three_seeds, capsys):
    """`loso compare --views rgb` compares one branch across runs, paired, instead of the fused default."""
    from experiments.loso import compare

    assert loso_main(["compare", str(three_seeds[0]), str(three_seeds[1]), "--views", "rgb"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| s")]
    assert rows and all(r.split("|")[2].strip() == "rgb" for r in rows)
    fused = compare(three_seeds[:2], n_boot=50)
    assert compare(three_seeds[:2], n_boot=50, views=["rgb"]) != fused  # one branch is not the fused AUC
    with pytest.raises(ValueError, match="has no lab scores"):
        compare(three_seeds[:2], n_boot=50, views=["lab"])
    for bad in ("nope", "rgb,rgb", ","):
        with pytest.raises(SystemExit):
            loso_main(["compare", str(three_seeds[0]), str(three_seeds[1]), "--views", bad])


def test_loso_tta_scores_a_turned_or_mirrored_image_the_same():
    """``loso train --tta``: each image's score is its mean over the 8 symmetries; without it, it is not."""
    from colorspaces.crops import dihedral
    from experiments.loso import branch_scores
    from models import BranchConfig, build_branch

    config = BranchConfig(view="fft", image_size=16, base_filters=4, seed=3)
    model = build_branch(config)
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    turned = dihedral(images, 5)
    plain, plain_turned = branch_scores(model, config, images), branch_scores(model, config, turned)
    with_tta, with_tta_turned = branch_scores(model, config, images, tta=True), branch_scores(model, config, turned, tta=True)
    assert np.allclose(with_tta, with_tta_turned, atol=1e-5)
    assert not np.allclose(plain, plain_turned, atol=1e-5), "an untrained branch is not symmetric by itself"
    assert with_tta.shape == (6,) and np.all((with_tta > 0) & (with_tta < 1))
