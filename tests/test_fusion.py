import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_is_fitted

from ensemble import AverageFusion, StackingFusion, make_fusion
from ensemble.bundle import FUSION_FILE, load_ensemble, save_ensemble, sha256_file
from ensemble.fusion import FUSION_METHODS, FusionEstimator, check_member_proba
from ensemble.metadata import parse_fields
from ensemble.metrics import binary_report, choose_threshold, roc_auc_ci
from skinfusion.workflows.fusing import check_same_split, fuse_run, read_val_predictions


def _members(rng, n=400):
    """Column 0 is informative, column 1 weakly, column 2 is noise."""
    y = (rng.random(n) < 0.2).astype(int)
    P = np.column_stack([
        1 / (1 + np.exp(-(2.5 * y - 1.2 + rng.normal(0, 1, n)))),
        1 / (1 + np.exp(-(0.8 * y - 0.5 + rng.normal(0, 1, n)))),
        rng.random(n),
    ])
    return P, y


def test_average_fusion_is_the_row_mean():
    P = np.array([[0.1, 0.2, 0.3], [0.9, 0.5, 0.4]])
    fused = AverageFusion().fit(P).predict_proba(P)
    np.testing.assert_allclose(fused[:, 1], P.mean(axis=1))
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)
    np.testing.assert_allclose(AverageFusion(weights=[1, 0, 0]).fit(P).predict_proba(P)[:, 1], P[:, 0])


@pytest.mark.parametrize("cls", [AverageFusion, StackingFusion])
def test_predict_before_fit_raises(cls):
    with pytest.raises(NotFittedError):
        cls().predict_proba(np.full((2, 3), 0.5))


@pytest.mark.parametrize("P, match", [
    (np.full((2,), 0.5), "2-D"),
    (np.full((2, 3), 1.5), r"\[0, 1\]"),
    (np.array([[0.5, np.nan, 0.5]]), r"\[0, 1\]"),
])
def test_fusion_validates_member_matrix(P, match):
    with pytest.raises(ValueError, match=match):
        AverageFusion().fit(P)


def test_fitted_fusion_refuses_a_different_member_count(rng):
    P, y = _members(rng)
    fusion = StackingFusion().fit(P, y)
    with pytest.raises(ValueError, match="expected 3"):
        fusion.predict_proba(P[:, :2])


def test_stacking_weights_the_informative_member_and_beats_the_mean(rng):
    P, y = _members(rng, 2000)
    Pt, yt = _members(np.random.default_rng(99), 2000)
    stack = StackingFusion().fit(P, y)
    coef = stack.final_estimator_.coef_.ravel()
    assert coef[0] > coef[1] > abs(coef[2])
    auc_stack = roc_auc_score(yt, stack.predict_proba(Pt)[:, 1])
    auc_mean = roc_auc_score(yt, AverageFusion().fit(P).predict_proba(Pt)[:, 1])
    assert auc_stack > auc_mean
    assert stack.oof_proba_.shape == (2000,)


def test_fusion_estimators_are_sklearn_clonable(rng):
    P, y = _members(rng)
    for est in (AverageFusion(weights=[1, 2, 3]), StackingFusion(C=0.5)):
        fitted = est.fit(P, y)
        c = clone(est)
        assert c.get_params() == est.get_params()
        with pytest.raises(NotFittedError):
            c.predict_proba(P)  # a clone carries the parameters, not the fit
        np.testing.assert_allclose(c.fit(P, y).predict_proba(P), fitted.predict_proba(P))
    assert StackingFusion(C=1e-4).fit(P, y).predict_proba(P)[:, 1].std() < StackingFusion(C=1.0).fit(P, y).predict_proba(P)[:, 1].std()


def test_stacking_needs_both_classes():
    with pytest.raises(ValueError, match="at least 2 of each class"):
        StackingFusion().fit(np.full((5, 3), 0.5), np.zeros(5))


def test_make_fusion_lists_methods():
    assert isinstance(make_fusion("stack"), StackingFusion)
    with pytest.raises(KeyError, match="choose one of"):
        make_fusion("vote")


def test_held_out_proba_is_what_the_threshold_may_be_chosen_on(rng):
    P, y = _members(rng)
    mean = AverageFusion().fit(P, y)
    np.testing.assert_allclose(mean.held_out_proba_, mean.predict_proba(P)[:, 1])  # it learnt nothing from y
    stack = StackingFusion().fit(P, y)
    np.testing.assert_array_equal(stack.held_out_proba_, stack.oof_proba_)  # cross-validated, not in-sample
    assert not np.allclose(stack.held_out_proba_, stack.predict_proba(P)[:, 1])
    assert mean.describe(["rgb", "hsv", "fft"]) == {"rgb": 0.333, "hsv": 0.333, "fft": 0.333}
    assert stack.describe(["rgb", "hsv", "fft"]) == stack.weights(["rgb", "hsv", "fft"])
    assert list(stack.describe(["rgb", "hsv", "fft"])) == ["rgb", "hsv", "fft"]


def test_auc_ci_brackets_the_auc(rng):
    P, y = _members(rng)
    auc, lo, hi = roc_auc_ci(y, P[:, 0], n_boot=300)
    assert lo < auc < hi and 0.5 < lo
    assert all(np.isnan(roc_auc_ci(np.zeros(4), np.arange(4))))


def test_threshold_and_report_on_known_values():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.9])
    thr = choose_threshold(y, p)
    assert 0.6 < thr <= 0.7
    r = binary_report(y, p, 0.5, n_boot=50)
    assert r["sensitivity"] == 1.0 and r["specificity"] == pytest.approx(2 / 3)
    assert r["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["n"] == 5 and r["n_melanoma"] == 2 and r["auc"] == 1.0


def test_operating_points_calibration_and_confusion_on_known_values():
    from ensemble.metrics import expected_calibration_error, sensitivity_at_specificity, specificity_at_sensitivity

    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.35, 0.6, 0.7, 0.9, 0.95])
    # at specificity >= 0.8 (at most one nevus above the cut) the best cut is 0.6 -> 4/5 melanomas
    assert sensitivity_at_specificity(y, p, 0.80) == pytest.approx(0.8)
    # at specificity >= 0.95 no nevus may be above the cut: only 0.9 and 0.95 remain -> 2/5
    assert sensitivity_at_specificity(y, p, 0.95) == pytest.approx(0.4)
    # at sensitivity >= 0.95 the cut must reach 0.35: nevi 0.1, 0.2, 0.3 stay below -> 3/5
    assert specificity_at_sensitivity(y, p, 0.95) == pytest.approx(0.6)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
    assert expected_calibration_error(np.array([0, 0]), np.array([0.95, 0.95])) == pytest.approx(0.95)
    r = binary_report(y, p, 0.5, n_boot=20)
    assert r["confusion_matrix"] == {"tn": 4, "fp": 1, "fn": 1, "tp": 4}
    assert set(r["sensitivity_at_specificity"]) == {"0.80", "0.90", "0.95"}


# ---------------------------------------------------------------- runs, bundles and the registry
LEGACY_BRANCHES = Path(__file__).parent / "fixtures" / "legacy-0.1.0" / "branches"
VIEWS3 = ("rgb", "hsv", "fft")


def _fake_run(root: Path, rng, n: int = 40) -> tuple[Path, np.ndarray, np.ndarray]:
    """A run of the 16-px legacy branches with made-up validation predictions (no training, no dataset).

    Returns:
        ``(run, y, P)`` with the validation labels and member matrix in image-id order.
    """
    run = root / "run"
    (run / "branches").mkdir(parents=True)
    (run / "splits.csv").write_text("image_id,label,group_id,source,split\n")
    y = (np.arange(n) % 3 == 0).astype(int)
    P = np.clip(0.3 + 0.3 * y[:, None] + rng.normal(0, 0.2, (n, 3)), 0.01, 0.99).round(6)
    for j, view in enumerate(VIEWS3):
        bdir = shutil.copytree(LEGACY_BRANCHES / view, run / "branches" / view)
        rows = "".join(f"v{i:03d},{y[i]},{P[i, j]:.6f}\n" for i in range(n))
        (bdir / "val_predictions.csv").write_text("image_id,label,melanoma_proba\n" + rows)
    return run, y, P


def _images(rng, n=3):
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("method, metadata", [("mean", ()), ("stack", ()), ("stack", ("age", "sex"))])
def test_fusion_file_round_trips(tmp_path, rng, method, metadata):
    run, y, P = _fake_run(tmp_path, rng)
    meta = [{"age": 30 + i, "sex": "female" if i % 2 else "male"} for i in range(len(y))] if metadata else None
    fusion = make_fusion(method, metadata).fit(P, y, meta)
    out = save_ensemble(run / "ensemble", fusion, method, 0.5, [run / "branches" / v for v in VIEWS3])
    loaded = joblib.load(out / FUSION_FILE)
    assert type(loaded) is type(fusion) and loaded.get_params() == fusion.get_params()
    assert loaded.metadata_ == tuple(metadata)
    Pt = rng.random((7, 3))
    mt = meta[:7] if meta else None
    np.testing.assert_array_equal(loaded.predict_proba(Pt, mt), fusion.predict_proba(Pt, mt))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["metadata"] == list(metadata)
    with pytest.raises(ValueError, match="fusion method 'mean' is AverageFusion"):
        save_ensemble(run / "ensemble", StackingFusion().fit(P, y), "mean", 0.5, [run / "branches" / v for v in VIEWS3])


class ToyMaxFusion(FusionEstimator):
    """A fusion the product does not know: the largest member probability.

    Its held-out output is deliberately not its in-sample one (a stand-in for a cross-validated
    fit), so the test can tell which of the two the threshold was chosen on.
    """

    supports_metadata = True

    def __init__(self, metadata=()):
        self.metadata = metadata

    def fit(self, P, y=None, meta=None):
        P = check_member_proba(P)
        self.n_features_in_, self.classes_ = P.shape[1], np.array([0, 1])
        self.metadata_ = parse_fields(self.metadata)
        self.held_out_proba_ = P.max(axis=1) ** 2
        return self

    def predict_proba(self, P, meta=None):
        check_is_fitted(self, "held_out_proba_")
        p = check_member_proba(P, self.n_features_in_).max(axis=1)
        return np.column_stack([1 - p, p])

    def describe(self, views):
        return {v: 1.0 for v in views}


def test_a_registered_fusion_method_fuses_a_run_with_no_other_code_change(tmp_path, rng, monkeypatch):
    monkeypatch.setitem(FUSION_METHODS, "max", ToyMaxFusion)
    run, y, P = _fake_run(tmp_path, rng)
    result = fuse_run(str(run), "max", VIEWS3)
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    # the threshold comes from the estimator's held-out probabilities, whatever its name
    assert result["threshold"] == manifest["threshold"] == choose_threshold(y, P.max(axis=1) ** 2)
    assert manifest["threshold"] != choose_threshold(y, P.max(axis=1))
    assert manifest["fusion_weights"] == {v: 1.0 for v in VIEWS3} and "stack_fit" not in manifest
    ens = load_ensemble(run)
    images = _images(rng)
    np.testing.assert_allclose(ens.predict_proba(images), ens.member_proba(images).max(axis=1), atol=1e-12)
    # its capabilities, not its name, decide what it may do
    assert make_fusion("max", "age").metadata == ("age",)
    with pytest.raises(ValueError, match="--folds only applies to --method select or stack"):
        fuse_run(str(run), "max", VIEWS3, folds=3)
    monkeypatch.setattr(ToyMaxFusion, "supports_metadata", False)
    with pytest.raises(ValueError, match="metadata fusion needs --method stack"):
        make_fusion("max", "age")


def _check_split(run):
    metas = [json.loads((run / "branches" / v / "metadata.json").read_text()) for v in VIEWS3]
    check_same_split(run, VIEWS3, metas, [read_val_predictions(run / "branches" / v) for v in VIEWS3])


def test_fuse_refuses_branches_trained_on_different_splits(tmp_path, rng):
    run, _, _ = _fake_run(tmp_path, rng)
    _check_split(run)  # one split: accepted (the registry test above fuses such a run end to end)
    fft = run / "branches" / "fft" / "val_predictions.csv"
    fft.write_text("".join(fft.read_text().splitlines(keepends=True)[:-1]))  # one validation image fewer
    with pytest.raises(ValueError, match=r"rgb\+hsv \(40 validation images\) vs fft \(39 .*retrain them in one run"):
        fuse_run(str(run), "mean", VIEWS3)

    run, _, _ = _fake_run(tmp_path / "b", rng)
    meta_file = run / "branches" / "hsv" / "metadata.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "split_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="branches hsv were trained on another split than .*retrain them in one run"):
        fuse_run(str(run), "mean", VIEWS3)
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "split_sha256": sha256_file(run / "splits.csv")}))
    _check_split(run)  # a recorded hash that matches the run's split, next to branches that record none


def test_fuse_without_views_fuses_the_default_or_the_design_three_of_an_older_run(tmp_path, rng, caplog):
    from colorspaces import DEFAULT_VIEWS, DESIGN_VIEWS
    from ensemble.rundir import default_fuse_views

    run, _, _ = _fake_run(tmp_path, rng)  # rgb, hsv, fft: a run trained before the twins joined the default
    with caplog.at_level("WARNING"):
        assert default_fuse_views(run) == DESIGN_VIEWS
        assert list(fuse_run(str(run), "mean", ood_percentile=None)["validation"]) == [*DESIGN_VIEWS, "fused"]
    assert "no rgb_sog, hsv_sog branch" in caplog.text and "--view VIEW" in caplog.text
    shutil.copytree(run / "branches" / "rgb", run / "branches" / "rgb_sog")
    # One twin there: the run is meant to be a default one, so fuse names the missing branch.
    assert default_fuse_views(run) == DEFAULT_VIEWS
    with pytest.raises(FileNotFoundError, match="hsv_sog"):
        fuse_run(str(run), "mean", ood_percentile=None)
