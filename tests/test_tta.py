"""Test-time averaging over the 8 rotations and flips: inference only, and invariant to them."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import ensemble
from colorspaces import read_image, resize_image
from colorspaces.crops import DIHEDRAL as TTA_TRANSFORMS, dihedral
from skinfusion.cli import evaluate_main


def test_dihedral_gives_the_eight_distinct_symmetries(rng):
    batch = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    variants = [dihedral(batch, k) for k in range(8)]
    np.testing.assert_array_equal(variants[0], batch)
    assert len({v.tobytes() for v in variants}) == 8 == len(TTA_TRANSFORMS)
    # closed under rotation: rotating every variant permutes the set
    rotated = {dihedral(v, 1).tobytes() for v in variants}
    assert rotated == {v.tobytes() for v in variants}


@pytest.mark.slow
def test_tta_is_the_mean_over_the_transforms_and_rotation_invariant(trained_run, synthetic_data):
    ens = ensemble.load(trained_run)
    paths = sorted(str(p) for p in (synthetic_data / "images").glob("*.jpg"))[:5]
    batch = np.stack([resize_image(read_image(p), ens.image_size) for p in paths])
    P, fused = ens.score_batch(batch, tta=True)
    manual = np.mean([ens.fuse(ens.member_proba_batch(dihedral(batch, k))) for k in range(8)], axis=0)
    np.testing.assert_allclose(fused, manual, atol=1e-6)
    assert P.shape == (5, 3)
    plain = ens.score_batch(batch)[1]
    assert not np.allclose(fused, plain, atol=1e-7), "TTA must change something on a trained model"
    img = batch[0]
    a = ensemble.predict(img, run=trained_run, tta=True)
    b = ensemble.predict(np.ascontiguousarray(np.rot90(img)), run=trained_run, tta=True)
    c = ensemble.predict(np.ascontiguousarray(img[::-1]), run=trained_run, tta=True)
    assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(c, abs=1e-6)
    assert a == pytest.approx(fused[0], abs=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(paths, run=trained_run, tta=True), fused, atol=1e-6)


@pytest.mark.slow
def test_evaluate_tta_records_it(trained_run, synthetic_data, tmp_path):
    rc = evaluate_main(["--run", str(trained_run), "--out", str(tmp_path), "--tta", "--no-plots", "--no-audit",
                        "--bootstrap", "100", "-q"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert rc == 0 and metrics["tta"] is True
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["n_images"] > 20
    # the scored probabilities are the fused mean over the 8 rotations and flips of each test image
    ens = ensemble.load(trained_run)
    batch = np.stack([resize_image(read_image(synthetic_data / "images" / f"{r['image_id']}.jpg"), ens.image_size)
                      for r in rows])
    manual = np.mean([ens.fuse(ens.member_proba_batch(dihedral(batch, k))) for k in range(8)], axis=0)
    fused = np.array([float(r["fused"]) for r in rows])
    np.testing.assert_allclose(fused, manual, atol=2e-6)  # predictions.csv keeps 6 decimals
    assert not np.allclose(fused, ens.score_batch(batch)[1], atol=1e-4), "evaluate --tta scored without TTA"
    # and the recorded AUC is the AUC of those probabilities
    y = np.array([int(r["label"]) for r in rows])
    assert metrics["fused"]["auc"] == pytest.approx(roc_auc_score(y, manual), abs=1e-3)
