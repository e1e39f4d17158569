import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from ensemble import AverageFusion, StackingFusion, make_fusion
from ensemble.metrics import binary_report, choose_threshold, roc_auc_ci


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
        c = clone(est)
        assert c.get_params() == est.get_params()
        c.fit(P, y)


def test_stacking_needs_both_classes():
    with pytest.raises(ValueError, match="at least 2 of each class"):
        StackingFusion().fit(np.full((5, 3), 0.5), np.zeros(5))


def test_make_fusion_lists_methods():
    assert isinstance(make_fusion("stack"), StackingFusion)
    with pytest.raises(KeyError, match="choose one of"):
        make_fusion("vote")


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
