"""Real ISIC data, read from $SKINFUSION_DATA: brief training of all three branches must beat chance."""

import json
import os

import pytest

from skinfusion.cli import evaluate_main, fuse_main, train_main

DATA = os.environ.get("SKINFUSION_DATA")
if DATA and not os.path.isdir(DATA):
    DATA = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA, reason="SKINFUSION_DATA is not set: skipping the real ISIC data test "
                       "(set it to ../shared/data/isic-mel-nev or your own labels.csv + images/ folder)"),
]


def test_three_branches_on_a_real_subset_fuse_above_chance(tmp_path):
    run = tmp_path / "run"
    for view in ("rgb", "hsv", "fft"):
        rc = train_main(["--view", view, "--data", DATA, "--run", str(run), "--limit", "600",
                         "--image-size", "64", "--epochs", "8", "--patience", "8", "-q"])
        assert rc == 0
    assert fuse_main(["--run", str(run), "--method", "mean", "-q"]) == 0
    assert evaluate_main(["--run", str(run), "--bootstrap", "500", "-q"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_images"] >= 60 and m["fused"]["n_melanoma"] >= 8
    # Clearly above chance: the lower end of the 95% CI must exceed 0.5.
    assert m["fused"]["auc_ci95"][0] > 0.5, m["fused"]
    assert m["fused"]["auc"] > 0.65, m["fused"]
