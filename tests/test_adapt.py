"""skinfusion adapt: label-shift prior estimation, class-balanced BatchNorm re-estimation, TENT, the adapted
bundle and the command, on generated data."""

from __future__ import annotations

import csv
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import separable_images
from sklearn.metrics import roc_auc_score

from ensemble.fusion import AverageFusion, StackingFusion
from ensemble.priors import (
    PriorNotSupported,
    balanced_weights,
    check_prior_estimate,
    calibration_offset,
    effective_prior,
    estimate_prior,
    likelihood_edge,
    prior_interval,
    prior_offset,
    shift_proba,
    shift_threshold,
    sigmoid,
)


def calibrated_scores(rng, n: int, prevalence: float, source_prior: float = 0.5, separation: float = 1.0):
    """Labels at ``prevalence`` and their exact posteriors under prior ``source_prior``.

    The score is N(+s, 1) for melanoma and N(-s, 1) for nevus, so the log-likelihood ratio is
    2 s z and the posterior at prior pi is sigmoid(2 s z + logit pi).
    """
    y = (rng.random(n) < prevalence).astype(int)
    z = rng.normal(np.where(y == 1, separation, -separation), 1.0)
    return y, sigmoid(2 * separation * z + np.log(source_prior / (1 - source_prior)))


# ---------------------------------------------------------------- label shift (ensemble.priors)
@pytest.mark.parametrize(("source_prior", "prevalence"), [(0.5, 0.2), (0.3, 0.6)])
def test_em_recovers_a_known_prevalence(rng, source_prior, prevalence):
    y, p = calibrated_scores(rng, 2000, prevalence, source_prior)
    est = estimate_prior(p, source_prior)
    assert est.converged
    assert abs(est.prior - y.mean()) < 0.03
    # the naive estimate (the mean probability) is far off: the test measures what EM adds
    assert abs(p.mean() - y.mean()) > 0.05
    # the adjusted posteriors are calibrated for the new population
    assert abs(est.posteriors.mean() - est.prior) < 1e-4


def test_em_is_stable_when_nothing_shifted(rng):
    _, p = calibrated_scores(rng, 4000, 0.5)
    assert abs(estimate_prior(p, 0.5).prior - 0.5) < 0.03


def test_em_on_probabilities_that_all_lean_one_way_runs_to_the_edge_and_is_refused(rng):
    # A weak model on unfamiliar images: every probability a little above the prior it assumes. The
    # likelihood of the prevalence then rises all the way to 100%, and EM follows it (issue 26: 100.0%,
    # CI 100.0-100.0%, a +12.9 log-odds shift).
    p = rng.uniform(0.52, 0.75, 300)
    est = estimate_prior(p, 0.5)
    assert est.prior > 0.99 and est.edge == "upper"
    assert likelihood_edge(1.0 - p, 0.5) == "lower"
    interval = prior_interval(p, 0.5, n_boot=30)
    with pytest.raises(PriorNotSupported, match="runs to 100%"):
        check_prior_estimate(est, interval)
    # well-separated calibrated scores keep the maximum inside, and pass the same rule
    _, good = calibrated_scores(rng, 300, 0.37)
    est = estimate_prior(good, 0.5)
    assert est.edge == "" and 0.2 < est.prior < 0.55
    check_prior_estimate(est, prior_interval(good, 0.5, n_boot=30))


def test_a_collapsed_bootstrap_interval_or_an_implausible_estimate_is_refused():
    from ensemble.priors import PriorEstimate

    est = PriorEstimate(0.4, np.full(3, 0.4), 10, True)
    with pytest.raises(PriorNotSupported, match="collapses to a point"):
        check_prior_estimate(est, (0.4, 0.4))
    with pytest.raises(PriorNotSupported, match="plausible"):
        check_prior_estimate(PriorEstimate(0.9995, np.full(3, 0.9995), 10, True))
    with pytest.raises(PriorNotSupported, match="did not converge"):
        check_prior_estimate(PriorEstimate(0.4, np.full(3, 0.4), 1000, False))


def test_effective_prior_finds_the_prevalence_probabilities_are_calibrated_to(rng):
    # probabilities calibrated at 50% (class-balanced training) judged on a 16% validation split
    y, p = calibrated_scores(rng, 4000, 0.16, source_prior=0.5)
    assert effective_prior(p, y) == pytest.approx(0.5, abs=0.04)
    b = calibration_offset(p, y)
    assert shift_proba(p, b).mean() == pytest.approx(y.mean(), abs=1e-6)
    with pytest.raises(ValueError, match="both classes"):
        calibration_offset(p, np.zeros_like(y))


def test_prior_shift_moves_probabilities_the_right_way_and_keeps_auc_and_decisions(rng):
    y, p = calibrated_scores(rng, 1000, 0.2, source_prior=0.5)
    offset = prior_offset(0.2, 0.5)
    assert offset < 0
    q = shift_proba(p, offset)
    assert np.all(q <= p + 1e-12) and q.mean() < p.mean() - 0.1
    assert roc_auc_score(y, q) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    t = 0.42
    assert np.array_equal(p >= t, q >= shift_threshold(t, offset))
    assert shift_proba(p, prior_offset(0.8, 0.5)).mean() > p.mean()
    assert shift_threshold(0.0, offset) == 0.0 and shift_threshold(1.0, offset) == 1.0


@pytest.mark.parametrize("cls", [AverageFusion, StackingFusion])
def test_fusion_log_odds_offset_is_applied_and_old_pickles_read_as_unshifted(rng, cls):
    y = (rng.random(300) < 0.3).astype(int)
    P = np.column_stack([0.2 * y + rng.random(300) * 0.8 for _ in range(3)])
    fusion = cls().fit(P, y)
    base = fusion.predict_proba(P)[:, 1]
    shifted = fusion.with_logit_offset(-1.0)
    out = shifted.predict_proba(P)
    assert np.allclose(out.sum(axis=1), 1.0)
    assert np.all(out[:, 1] < base + 1e-12) and out[:, 1].mean() < base.mean() - 0.05
    assert roc_auc_score(y, out[:, 1]) == pytest.approx(roc_auc_score(y, base), abs=1e-12)
    assert fusion.predict_proba(P)[:, 1].tolist() == base.tolist()  # the original is untouched
    # a fusion pickled before the attribute existed has none in its __dict__
    old = pickle.loads(pickle.dumps(fusion))
    old.__dict__.pop("logit_offset_", None)
    assert np.array_equal(old.predict_proba(P)[:, 1], base)
    again = pickle.loads(pickle.dumps(shifted))
    assert np.allclose(again.predict_proba(P), out)


def test_balanced_weights_give_each_class_half_the_mass(rng):
    y = (rng.random(5000) < 0.2).astype(int)
    posteriors = np.where(y == 1, 0.999, 0.001)  # exact posteriors of a perfect classifier
    w = balanced_weights(posteriors)
    assert w.mean() == pytest.approx(1.0, abs=1e-9)
    assert (w * y).sum() / w.sum() == pytest.approx(0.5, abs=0.01)
    assert np.allclose(balanced_weights(np.full(10, 0.3), 0.3), 1.0)


# ---------------------------------------------------------------- BatchNorm re-estimation and TENT
@pytest.fixture(scope="module")
def tiny_branch():
    import keras

    from models.branch import BranchConfig, build_branch

    keras.utils.set_random_seed(0)
    # The old block order: TENT's anchored mean shift (< 0.05) was calibrated on this toy branch with it.
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, block_order="conv-bn-relu-pool")
    return config, build_branch(config)


def _stats_distance(a: dict, b: dict) -> float:
    """Mean |difference of BN means| in units of b's standard deviations, over every layer and channel."""
    return float(np.mean([np.mean(np.abs(a[k][0] - b[k][0]) / np.sqrt(b[k][1] + 1e-3)) for k in b]))


def test_class_balanced_bn_reproduces_source_statistics_and_corrects_a_skewed_mix(tiny_branch, rng):
    from models.adapt import bn_statistics, clone_branch, reestimate_bn

    config, model = tiny_branch
    # The "source" model's statistics are those of a 50/50 set, as class-balanced training sees.
    src_images, _ = separable_images(400, 16, rng, positive_every=2)
    source = clone_branch(model)
    reestimate_bn(source, config, src_images)
    src_stats = bn_statistics(source)

    def adapted(images, posteriors, balanced):
        m = clone_branch(source)
        reestimate_bn(m, config, images, balanced_weights(posteriors) if balanced else None)
        return bn_statistics(m)

    same, y_same = separable_images(400, 16, rng, positive_every=2)
    r_same = np.where(y_same == 1, 0.99, 0.01)
    assert _stats_distance(adapted(same, r_same, True), src_stats) < 0.02

    skewed, y_skew = separable_images(500, 16, rng, positive_every=5)  # 20% melanoma
    r_skew = np.where(y_skew == 1, 0.99, 0.01)
    plain, balanced = adapted(skewed, r_skew, False), adapted(skewed, r_skew, True)
    # (measured: 0.0025 for the same mix; 0.16 plain and 0.01 balanced for the skewed one)
    assert _stats_distance(plain, src_stats) > 0.05
    assert _stats_distance(balanced, src_stats) < 0.25 * _stats_distance(plain, src_stats)
    assert _stats_distance(balanced, plain) > 0.05
    # re-estimation works on copies: the source model is untouched
    for k, (mean, var) in bn_statistics(source).items():
        assert np.array_equal(mean, src_stats[k][0]) and np.array_equal(var, src_stats[k][1])


def test_bn_alpha_mixes_source_and_target_statistics(tiny_branch, rng):
    from models.adapt import bn_statistics, clone_branch, reestimate_bn

    config, model = tiny_branch
    images, _ = separable_images(120, 16, rng, positive_every=5)
    full, half = clone_branch(model), clone_branch(model)
    reestimate_bn(full, config, images)
    reestimate_bn(half, config, images, alpha=0.5)
    m0, mf, mh = (bn_statistics(m)["bn1"][0] for m in (model, full, half))
    assert np.allclose(mh, 0.5 * (m0 + mf), atol=1e-5)  # the first layer sees the same inputs in all three
    with pytest.raises(ValueError, match="alpha"):
        reestimate_bn(clone_branch(model), config, images, alpha=1.5)


def test_tent_lowers_entropy_and_changes_only_batchnorm_scale_and_offset(tiny_branch, rng):
    from models.adapt import clone_branch, reestimate_bn, tent

    config, model = tiny_branch
    images, _ = separable_images(128, 16, rng, positive_every=4)
    m = clone_branch(model)
    reestimate_bn(m, config, images)
    before = {v.path: np.array(v.numpy()) for v in m.weights}
    result = tent(m, config, images, steps=25, learning_rate=1e-2, batch_size=32, seed=0)
    assert result.entropy_after < result.entropy_before - 0.01
    after = {v.path: np.array(v.numpy()) for v in m.weights}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith(("gamma", "beta")) for k in changed), changed
    assert any(k.endswith("gamma") for k in changed) and any(k.endswith("beta") for k in changed)
    # the anchor keeps the mean prediction where it was
    assert abs(result.mean_after - result.mean_before) < 0.05
    # seeded: the same start, images and seed give the same weights
    again = clone_branch(model)
    reestimate_bn(again, config, images)
    tent(again, config, images, steps=25, learning_rate=1e-2, batch_size=32, seed=0)
    for v in again.weights:
        np.testing.assert_allclose(v.numpy(), after[v.path], atol=1e-5)


# ---------------------------------------------------------------- the command
def _adapt(*args: str) -> int:
    from skinfusion.cli import main

    return main(["adapt", *args, "-q"])


def test_method_list_is_parsed_in_application_order():
    from skinfusion.workflows.adaptation import parse_methods

    assert parse_methods("prior,tent,bn-balanced") == ("bn-balanced", "tent", "prior")
    assert parse_methods("none") == ()
    for bad in ("bn,bn-balanced", "prior,prior", "adabn", ""):
        with pytest.raises(ValueError, match="--method"):
            parse_methods(bad)


def test_misuse_is_refused_with_exit_2(tmp_path, capsys, rng):
    from helpers import write_random_images

    run = tmp_path / "run"
    run.mkdir()
    few = tmp_path / "few"
    write_random_images(few, 10, rng)
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(tmp_path / "new")) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "at least 250" in err and "10 images" in err and "Traceback" not in err
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(run)) == 2
    assert "is the source run" in capsys.readouterr().err
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(run / "sub")) == 2
    assert "inside one another" in capsys.readouterr().err
    assert _adapt("--run", str(run), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "new")) == 2
    assert "--images" in capsys.readouterr().err
    assert _adapt("--run", str(tmp_path / "norun"), "--images", str(few), "--out", str(tmp_path / "new")) == 2
    assert "no such run" in capsys.readouterr().err
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(other)) == 2
    assert "--force" in capsys.readouterr().err
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(other), "--force") == 2
    assert "left alone" in capsys.readouterr().err and (other / "keep.txt").is_file()
    assert _adapt("--run", str(run), "--images", str(few), "--out", str(tmp_path / "n"), "--method", "bn,bn-balanced") == 2
    assert "--method" in capsys.readouterr().err
    listing = tmp_path / "list.txt"
    listing.write_bytes("caf\u00e9.jpg\n".encode("utf-16"))
    assert _adapt("--run", str(run), "--images", str(listing), "--out", str(tmp_path / "n")) == 2
    assert "--images" in (err := capsys.readouterr().err) and "UTF-8" in err
    assert _adapt("--run", str(run), "--images", str(few / "img00.png"), "--out", str(tmp_path / "n")) == 2
    assert "is one image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _adapt("--run", str(run), "--images", str(few), "--out", str(tmp_path / "n"), "--bn-alpha", "0")
    assert exc.value.code == 2
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """A 'clinic': 270 new synthetic images (a different seed, 15% melanoma) plus two unreadable files."""
    from skinfusion.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path_factory.mktemp("clinic"), n_images=270, melanoma_fraction=0.15,
                                  size=48, seed=21, atypical_rate=0.0)
    (data / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (data / "images" / "zz_empty.png").write_bytes(b"")
    return data


def _same_files(a: Path, b: Path, names) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_adapt_end_to_end_writes_a_signed_batch_independent_run(trained_run, clinic, tmp_path, capsys):
    import ensemble
    from ensemble.bundle import load_ensemble, sha256_file

    out = tmp_path / "adapted"
    rc = _adapt("--run", str(trained_run), "--images", str(clinic / "images"), "--out", str(out),
                "--method", "bn-balanced,tent,prior", "--tent-steps", "3")
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # two images were unreadable: skipped, listed, and the exit says so
    assert "estimated melanoma prevalence" in captured.out and "adaptation_skipped.csv" in captured.err
    with open(out / "adaptation_skipped.csv", newline="") as fh:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(fh)) == ["zz_corrupt.jpg", "zz_empty.png"]

    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    a = manifest["adaptation"]
    assert a["methods"] == ["bn-balanced", "tent", "prior"]
    n_good = len(list((clinic / "images").glob("SYN_*.jpg")))
    assert a["images"]["n_used"] == n_good and a["images"]["n_skipped"] == 2 and len(a["images"]["fingerprint"]) == 64
    assert a["source"]["manifest_sha256"] == sha256_file(trained_run / "ensemble" / "manifest.json")
    assert 0.0 < a["prevalence"]["estimated"] < 1.0 and a["date"]
    assert any("BatchNorm" in c for c in a["changed"]) and any("fusion" in c for c in a["changed"])
    # the source's OOD gate measured the source branches' embeddings: refitted through the adapted ones
    assert a["ood_gate"].startswith("refitted") and "ood" in manifest
    assert manifest["threshold"] == pytest.approx(shift_threshold(a["threshold"]["source"], a["logit_offset"]))
    summary = json.loads((out / "adaptation.json").read_text())
    assert summary["prevalence"]["estimated"] == a["prevalence"]["estimated"]
    assert _same_files(out, trained_run, ["splits.csv", "split.json"])
    for view in ("rgb", "hsv", "fft"):  # the branches were adapted, the source run was not
        assert not _same_files(out / "branches" / view, trained_run / "branches" / view, ["model.keras"])
    assert "adaptation" not in json.loads((trained_run / "ensemble" / "manifest.json").read_text())

    ens = load_ensemble(out)  # every hash is checked
    assert float(ens.fusion.logit_offset_) == pytest.approx(a["logit_offset"])
    paths = sorted(str(p) for p in (clinic / "images").glob("SYN_*.jpg"))[:33]
    ensemble.clear_cache()
    alone = ensemble.predict(paths[0], run=out)
    batch = ensemble.predict_proba(paths, run=out)
    assert abs(batch[0] - alone) <= 1e-5
    np.testing.assert_allclose(ensemble.predict_proba(paths[::-1], run=out), batch[::-1], atol=1e-5)
    np.testing.assert_allclose(ensemble.predict_proba(paths[:5], run=out), batch[:5], atol=1e-5)

    # evaluate still works on the new run: the source run's test split, from the copied split files
    from skinfusion.cli import main

    assert main(["evaluate", "--run", str(out), "--no-plots", "--no-audit", "--bootstrap", "100", "-q"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_images"] > 0

    # an adapted run is not adapted again
    assert _adapt("--run", str(out), "--images", str(clinic / "images"), "--out", str(tmp_path / "again")) == 2
    assert "adapt the original run" in capsys.readouterr().err


def test_prior_only_adapt_keeps_branches_and_auc_and_lowers_probabilities(trained_run, clinic, tmp_path):
    import ensemble
    from ensemble.bundle import load_ensemble

    out = tmp_path / "prior"
    out.mkdir()
    (out / "adaptation.json").write_text("{}")  # an earlier adapted run there: --force replaces it
    (out / "stale.txt").write_text("x")
    assert _adapt("--run", str(trained_run), "--images", str(clinic / "images"), "--out", str(out),
                  "--force") == 1
    assert not (out / "stale.txt").exists()
    for view in ("rgb", "hsv", "fft"):
        assert _same_files(out / "branches" / view, trained_run / "branches" / view,
                           ["model.keras", "config.json", "metadata.json"])
    record = json.loads((out / "adaptation.json").read_text())
    assert record["methods"] == ["prior"] and record["branches"] == {}
    assert record["ood_gate"].startswith("the source bundle's")
    src, new = load_ensemble(trained_run), load_ensemble(out)
    paths = sorted(str(p) for p in (clinic / "images").glob("SYN_*.jpg"))
    with open(clinic / "labels.csv", newline="") as fh:
        labels = {r["image_id"]: int(r["label"] == "melanoma") for r in csv.DictReader(fh)}
    y = np.array([labels[Path(p).stem] for p in paths])
    p_src, p_new = src.predict_proba(paths), new.predict_proba(paths)
    offset = record["logit_offset"]
    assert np.sign(p_new.mean() - p_src.mean()) == np.sign(offset) and offset != 0.0
    assert roc_auc_score(y, p_new) == pytest.approx(roc_auc_score(y, p_src), abs=1e-9)
    assert np.array_equal(p_src >= src.threshold, p_new >= new.threshold)  # the same operating point
    ensemble.clear_cache()


def test_measurement_script_runs_end_to_end(trained_run, synthetic_data, tmp_path):
    from experiments.adapt import main as measure_main

    t0 = time.perf_counter()
    rc = measure_main(["--run", str(trained_run), "--data", str(synthetic_data), "--holdout-source", "synthetic",
                       "--methods", "none,prior,bn-balanced+prior", "--no-grid", "--n-boot", "20",
                       "--out", str(tmp_path / "m")])
    assert rc == 0 and time.perf_counter() - t0 < 120
    doc = json.loads((tmp_path / "m" / "adapt.json").read_text())
    rows = doc["methods"]
    assert set(rows) == {"none", "prior", "bn-balanced+prior"}  # (the JSON file sorts its keys)
    assert rows["prior"]["test"]["auc"] == pytest.approx(rows["none"]["test"]["auc"], abs=1e-9)
    assert rows["none"]["delta_auc_vs_none"] == 0.0
    assert 0 < rows["prior"]["prevalence"]["true_test"] < 1
    table = (tmp_path / "m" / "adapt.md").read_text()
    assert table.count("\n| ") == 4 and "bn-balanced+prior" in table


def test_prior_that_runs_to_the_edge_is_refused_and_nothing_is_written(trained_run, clinic, tmp_path, capsys,
                                                                         monkeypatch):
    from skinfusion.workflows import adaptation

    # the run's branches all lean towards melanoma on these images, as the tiny run of issue 26 did
    rng = np.random.default_rng(1)
    monkeypatch.setattr(adaptation, "member_proba",
                        lambda ens, images, batch_size=64: rng.uniform(0.97, 0.995, (len(images), len(ens.models))))
    out = tmp_path / "collapsed"
    assert _adapt("--run", str(trained_run), "--images", str(clinic / "images"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "--method prior" in err and "runs to 100%" in err and "Traceback" not in err
    assert err.count("error:") == 1 and not out.exists()
    # bn-balanced's class weights rest on the same estimate: refused for the same reason
    assert _adapt("--run", str(trained_run), "--images", str(clinic / "images"), "--out", str(out),
                  "--method", "bn-balanced") == 2
    assert "--method bn-balanced" in capsys.readouterr().err and not out.exists()


def test_an_adapted_run_that_gives_every_image_one_probability_is_not_written(trained_run, clinic, tmp_path,
                                                                             capsys, monkeypatch):
    from skinfusion.workflows import adaptation

    monkeypatch.setattr(adaptation, "member_proba",
                        lambda ens, images, batch_size=64: np.full((len(images), len(ens.models)), 0.999998))
    out = tmp_path / "flat"
    assert _adapt("--run", str(trained_run), "--images", str(clinic / "images"), "--out", str(out),
                  "--method", "bn") == 2
    err = capsys.readouterr().err
    assert "same probability 0.999998" in err and "nothing was written" in err and not out.exists()
