"""experiments.compare_runs: per source family, in-source runs' fused AUCs and paired differences."""

import csv

import numpy as np
import pytest

from experiments.compare_runs import compare, main


def _scored(run, labels, sources, noise, seed, split="val"):
    path = run / ("eval-val/predictions.csv" if split == "val" else "predictions.csv")
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "label", "source", "rgb", "fused"])
        for i, (y, src) in enumerate(zip(labels, sources)):
            p = 1 / (1 + np.exp(-(2 * y - 1 + noise[src] * rng.standard_normal())))
            w.writerow([f"img{i:04d}", y, src, p, p])
    return run


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 900
    labels = (rng.random(n) < 0.3).astype(int)
    sources = list(rng.choice(["HAM10000", "ISIC2017_train", "ISIC2017_val"], n, p=[0.6, 0.3, 0.1]))
    ref = _scored(tmp_path / "ref", labels, sources, {"HAM10000": 1.0, "ISIC2017_train": 3.0, "ISIC2017_val": 3.0}, 1)
    # Better on the ISIC 2017 images only, the same on HAM10000.
    lever = _scored(tmp_path / "lever", labels, sources, {"HAM10000": 1.0, "ISIC2017_train": 1.0, "ISIC2017_val": 1.0}, 2)
    return ref, lever, labels, sources


def _row(table, run, group):
    return next(r.split("|") for r in table.splitlines() if r.startswith(f"| {run} | {group} |"))


def test_the_paired_difference_shows_where_a_run_gained(runs):
    ref, lever, labels, sources = runs
    table = compare([ref, lever], "val", n_boot=200)
    isic = _row(table, "lever", "ISIC2017")[5].split()
    assert float(isic[0]) > 0.1 and float(isic[1].strip("(")) > 0  # the CI excludes no change
    ham = _row(table, "lever", "HAM10000")[5].split()
    assert abs(float(ham[0])) < 0.05 and float(ham[1].strip("(")) < 0 < float(ham[3].strip(")"))
    assert "(reference)" in _row(table, "ref", "all")[5]
    # The family's parts, as the README's proxy (ISIC2017_train) needs them; HAM10000 has one part.
    part = [y for y, s in zip(labels, sources) if s == "ISIC2017_train"]
    assert _row(table, "ref", "ISIC2017_train (part of ISIC2017)")[3].strip() == f"{len(part)} ({sum(part)})"
    family = [y for y, s in zip(labels, sources) if s.startswith("ISIC2017")]
    assert _row(table, "ref", "ISIC2017")[3].strip() == f"{len(family)} ({sum(family)})"
    assert not any("part of HAM10000" in r for r in table.splitlines())


def test_runs_of_other_images_a_missing_score_and_a_damaged_file_are_one_error_each(runs, tmp_path, capsys):
    ref, lever, labels, sources = runs
    other = _scored(tmp_path / "other", labels[::-1], sources, {s: 1.0 for s in set(sources)}, 3)
    with pytest.raises(ValueError, match="other images or labels"):
        compare([ref, other], "val")
    assert main([str(ref), str(lever), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert f"{ref / 'predictions.csv'}: missing" in err and "skinfusion evaluate" in err
    path = lever / "eval-val" / "predictions.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",oops"
    path.write_text("\n".join(lines) + "\n")
    assert main([str(ref), str(lever)]) == 2
    assert f"{path}: damaged" in capsys.readouterr().err


def test_out_writes_the_table(runs, tmp_path, capsys):
    ref, lever, _, _ = runs
    assert main([str(ref), str(lever), "--boot", "100", "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().strip() == capsys.readouterr().out.strip()
    assert main([str(ref), str(lever), "--out", str(tmp_path / "no-such-folder" / "t.md")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_file_with_no_scored_image_is_refused_not_an_empty_table(runs, tmp_path, capsys):
    ref, _, _, _ = runs
    empty = tmp_path / "empty" / "eval-val" / "predictions.csv"
    empty.parent.mkdir(parents=True)
    empty.write_text("image_id,label,source,rgb,fused\n")
    assert main([str(ref), str(tmp_path / "empty")]) == 2
    assert f"{empty}: holds no scored image" in capsys.readouterr().err
