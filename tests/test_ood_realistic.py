"""Issue 28: realistic non-dermoscopic images (text, code, charts, screenshots, figures on white pages) are
refused by the image-level checks, and dermoscopy-like images are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colorspaces.quality import image_checks
from skinfusion.data.synthetic import _lesion

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"


def lesion(size: int = 48, seed: int = 0) -> np.ndarray:
    return _lesion(np.random.default_rng(seed), size, melanoma=bool(seed % 2), atypical_rate=0.0)


def test_rendered_page_checks_pass_dermoscopy_like_lesions_at_every_size():
    # The synthetic lesions' interiors are exactly flat (no noise) with sharp borders at small sizes:
    # only page-like (unsaturated or dark) uniform regions may count as a background.
    import cv2

    for size in (32, 48, 96, 150):
        for seed in range(12):
            img = _lesion(np.random.default_rng(seed), size, melanoma=seed % 3 == 0, atypical_rate=0.12)
            assert image_checks(img) == (), (size, seed)
    for seed in range(6):  # enlarged: blocks of equal pixels
        assert image_checks(cv2.resize(lesion(96, seed), (640, 480), interpolation=cv2.INTER_AREA)) == ()


@pytest.mark.parametrize("kind", ["text_page", "code", "chart", "diagram", "project_plot", "screenshot", "white_border"])
def test_realistic_rendered_images_fail_a_page_check(kind):
    # Issue 28: white-background text, charts and screenshots passed every image-level check.
    from experiments.farood import realistic_far_ood

    for _, img in realistic_far_ood("tuning", 3, kinds=[kind]):
        assert {"uniform_area", "text_like"} & set(image_checks(img)), kind


def test_realistic_far_ood_set_is_seeded_and_its_parts_differ():
    from experiments.farood import KINDS, realistic_far_ood

    a = list(realistic_far_ood("tuning", 1))
    assert [k for k, _ in a] == list(KINDS)
    assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for _, img in a)
    again = dict(realistic_far_ood("tuning", 1, kinds=["chart", "scene"]))
    np.testing.assert_array_equal(again["scene"], dict(a)["scene"])
    held = dict(realistic_far_ood("heldout", 1, kinds=["scene"]))
    assert held["scene"].shape != dict(a)["scene"].shape or not np.array_equal(held["scene"], dict(a)["scene"])
    with pytest.raises(ValueError, match="part must be one of"):
        next(realistic_far_ood("test"))


def test_the_committed_bundle_flags_rendered_images_and_passes_lesions():
    # A bundle of skinfusion 0.1.0 (no feature gate): the image-level checks are current for every bundle.
    from ensemble import load_ensemble
    from experiments.farood import realistic_far_ood

    ens = load_ensemble(FIXTURE / "ensemble-mean")
    pages = [img for _, img in realistic_far_ood("tuning", 1, kinds=["text_page", "chart", "screenshot"])]
    details = ens.details(pages + [lesion(96, seed=s) for s in range(4)])
    for d in details[:3]:
        assert d.out_of_distribution is True and {"uniform_area", "text_like"} & set(d.ood_reasons), d.ood_reasons
        assert d.decision is None  # the refusal is the answer in the Python API too
    assert all(d.ood_reasons == [] and not d.out_of_distribution for d in details[3:])
    assert all(d.decision in ("melanoma", "nevus") for d in details[3:])


def test_checks_only_report_counts_flags_per_source_and_kind(tmp_path):
    from experiments.ood import check_rates, checks_markdown
    from skinfusion.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "syn", n_images=12, size=64, seed=2, atypical_rate=0.0)
    result = check_rates(str(data), per_kind=1)
    assert result["dermoscopy"]["synthetic"]["n"] == 12 and result["dermoscopy"]["synthetic"]["flagged"] == 0.0
    assert result["near_ood"] == {}  # no seborrheic keratosis list in a synthetic dataset
    for part in ("far_ood_tuning", "far_ood_heldout"):
        assert result[part]["all"]["n"] == 10
        assert result[part]["text_page"]["flagged"] == 1.0 and result[part]["text_page"]["new_checks"] == 1.0
        lo, hi = result[part]["all"]["ci95"]
        assert lo <= result[part]["all"]["flagged"] <= hi
    assert "| far_ood_heldout | text_page | 1 | 1.0000 |" in checks_markdown(result)


def test_rule_comparison_on_a_fused_run_reports_both_rules(trained_run, synthetic_data):
    from experiments.ood_rules import compare_rules, markdown

    r = compare_rules(str(trained_run), str(synthetic_data), per_kind=1)
    assert r["percentile"] == 95 and r["views"] == ["rgb", "hsv", "fft"]
    test, far = r["sets"]["test"]["all"], r["sets"]["far_ood_heldout"]["all"]
    for rule in ("sum", "max"):
        assert test[f"gate_{rule}"]["flagged"] <= 0.25
        # The whole gate flags at least what either of its parts flags.
        assert far[f"gate_{rule}"]["flagged"] >= max(far["checks"]["flagged"], far[f"features_{rule}"]["flagged"])
    assert far["checks"]["n"] == 10 and len(test["median_z"]) == 3
    assert "| far_ood_heldout | text_page | 1 | 1.000 |" in markdown(r)


def test_percentile_sweep_moves_only_the_threshold(trained_run, synthetic_data):
    from experiments.ood_rules import compare_rules, markdown

    r = compare_rules(str(trained_run), str(synthetic_data), per_kind=1, percentile=95, sweep=[60, 100])
    assert sorted(r["sweep"]) == ["100", "60"]
    for name, groups in r["sets"].items():
        for grp, row in groups.items():
            lo, hi = (r["sweep"][q][name][grp] for q in ("60", "100"))
            for rule in ("sum", "max"):
                # A lower threshold flags a superset, whatever the images: 60th >= 95th >= 100th.
                assert lo[f"gate_{rule}"]["flagged"] >= row[f"gate_{rule}"]["flagged"] >= hi[f"gate_{rule}"]["flagged"]
                assert hi[f"gate_{rule}"]["flagged"] >= row["checks"]["flagged"]
    # The 60th percentile flags about 40% of validation-like images: in-distribution test images too.
    assert r["sweep"]["60"]["test"]["all"]["gate_sum"]["flagged"] > r["sets"]["test"]["all"]["gate_sum"]["flagged"]
    assert "Whole gate at the 60th validation percentile" in markdown(r)


def test_ood_rules_refuses_a_percentile_out_of_range(capsys):
    from experiments.ood_rules import main

    with pytest.raises(SystemExit) as exc:
        main(["--run", "R", "--data", "D", "--out", "O", "--sweep", "99", "101"])
    assert exc.value.code == 2
    assert "--sweep takes a validation percentile from 50 to 100, got 101" in capsys.readouterr().err
