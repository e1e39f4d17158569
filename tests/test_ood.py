"""The out-of-distribution gate: image-level checks, the feature-level Mahalanobis gate, its file, its columns."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_rgb

from colorspaces.quality import REASONS, image_checks
from ensemble.ood import DEFAULT_COMBINE, LEGACY_COMBINE, OOD_FILE, OODGate, check_percentile, fit_gate, judge
from skinfusion.data.synthetic import _lesion

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"


def lesion(size: int = 48, seed: int = 0, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A generated dermoscopy-like lesion, resized to ``shape`` (H, W) when given."""
    import cv2

    img = _lesion(np.random.default_rng(seed), size, melanoma=bool(seed % 2), atypical_rate=0.0)
    return img if shape is None else cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------- image-level checks
def on_page() -> np.ndarray:
    """A lesion pasted on a light grey page (a figure in a document): one large exactly uniform region."""
    page = np.full((160, 200, 3), (214, 212, 210), np.uint8)
    page[20:116, 30:126] = lesion(96, seed=5)
    return page


def dark_code() -> np.ndarray:
    """Syntax-coloured code on a dark editor theme: glyph edges on a flat (dark, so not 'uniform_area') field."""
    import cv2

    img = np.full((120, 160, 3), (30, 30, 36), np.uint8)
    for k, colour in enumerate([(86, 156, 214), (206, 145, 120), (78, 201, 176), (220, 220, 170), (197, 134, 192)]):
        cv2.putText(img, "def run(x):", (6, 20 + 20 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1)
    return img


CASES = {
    "too_small": lambda: lesion(24),
    "extreme_aspect_ratio": lambda: lesion(96, shape=(40, 160)),
    "not_colour": lambda: np.repeat(lesion(96).mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2),
    "nearly_uniform": lambda: np.clip(np.array([210, 160, 140]) + np.random.default_rng(0).normal(0, 1, (64, 64, 3)),
                                      0, 255).astype(np.uint8),
    "uniform_area": on_page,
    "text_like": dark_code,
}


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_each_image_check_fires_on_its_own_case_only(reason):
    assert image_checks(CASES[reason]()) == (reason,)


@pytest.mark.parametrize("shape", [None, (150, 200), (480, 640), (32, 32)])
def test_no_image_check_fires_on_a_lesion(shape):
    assert image_checks(lesion(96, seed=3, shape=shape)) == ()


def test_percentiles_outside_50_to_100_are_refused_by_name():
    assert check_percentile(99) == 99.0
    for bad in (0.95, 101, float("nan"), True, "95"):
        with pytest.raises(ValueError, match="--ood-percentile takes a percentile from 50 to 100"):
            check_percentile(bad)


# ---------------------------------------------------------------- the gate on known distributions
def _gaussians(rng, n, dims=(6, 4), shift=0.0):
    return [rng.normal(shift, 1.0, (n, d)) * np.linspace(1, 3, d) for d in dims]


def test_gate_threshold_pass_rate_and_scores_on_gaussian_embeddings(tmp_path, rng):
    gate = fit_gate(_gaussians(rng, 400), _gaussians(rng, 300), percentile=90)
    assert gate.n_fit == 400 and gate.dims == [6, 4]
    assert abs((gate.val_scores <= gate.threshold).mean() - 0.90) <= 1 / 300
    fresh, far = _gaussians(rng, 500), _gaussians(rng, 200, shift=4.0)
    assert 0.85 < (gate.score(fresh) <= gate.threshold).mean() < 0.95  # about the requested share passes
    assert (gate.score(far) > gate.threshold).all()
    # The p-value falls as the score rises and stays in [0, 1].
    s = np.sort(gate.score(fresh))
    p = gate.in_distribution_score(s)
    assert (np.diff(p) <= 0).all() and p.min() >= 0 and p.max() <= 1
    assert gate.in_distribution_score(np.array([-1e9, 1e9])).tolist() == [1.0, 0.0]
    # Round trip through the pickle-free file.
    path = gate.save(tmp_path / OOD_FILE)
    entry = gate.manifest_entry("sha")
    back = OODGate.load(path, entry, gate.dims, "refit")
    np.testing.assert_allclose(back.score(far), gate.score(far))
    assert back.threshold == gate.threshold and back.percentile == 90.0 and back.n_fit == 400


def test_gate_combines_standardised_branch_distances_by_its_rule(tmp_path, rng):
    dims = (6, 4, 5)
    fits = {rule: fit_gate(_gaussians(rng, 200, dims), _gaussians(rng, 150, dims), percentile=99, combine=rule)
            for rule in ("sum", "max")}
    E = _gaussians(rng, 50, dims)
    for rule, gate in fits.items():
        z = (gate.distances(E) - gate.dist_mean) / gate.dist_std
        np.testing.assert_allclose(gate.score(E), z.max(axis=1) if rule == "max" else z.sum(axis=1))
        entry = gate.manifest_entry("sha")
        assert entry["combine"] == rule and rule in entry["score"].split()[0]
        back = OODGate.load(gate.save(tmp_path / f"{rule}.npz"), entry, gate.dims, "refit")
        assert back.combine == rule and (back.note is None) == (rule == DEFAULT_COMBINE)
        np.testing.assert_allclose(back.score(E), gate.score(E))
    assert fit_gate(_gaussians(rng, 40), _gaussians(rng, 40)).combine == DEFAULT_COMBINE
    with pytest.raises(ValueError, match="combines branches by one of"):
        fit_gate(_gaussians(rng, 40), _gaussians(rng, 40), combine="mean")


def test_a_gate_fitted_before_the_combine_key_loads_with_the_legacy_rule(tmp_path, rng, caplog):
    gate = fit_gate(_gaussians(rng, 60), _gaussians(rng, 40), combine=LEGACY_COMBINE)
    path = gate.save(tmp_path / OOD_FILE)
    entry = {k: v for k, v in gate.manifest_entry("sha").items() if k != "combine"}  # as skinfusion 0.1 wrote it
    with caplog.at_level(logging.WARNING, logger="ensemble.ood"):
        back = OODGate.load(path, entry, gate.dims, "refit")
    assert back.combine == "sum"
    # Only a rule that is no longer the default asks for a refit, once per load.
    assert caplog.text.count("re-run `skinfusion fuse`") == (LEGACY_COMBINE != DEFAULT_COMBINE)
    far = _gaussians(rng, 5, shift=3.0)
    np.testing.assert_allclose(back.score(far), gate.score(far))
    with pytest.raises(ValueError, match=r"combined by 'median'.*refit"):
        OODGate.load(path, {**entry, "combine": "median"}, gate.dims, "refit")


def test_gate_file_refuses_pickles_and_arrays_of_the_wrong_shape(tmp_path, rng):
    gate = fit_gate(_gaussians(rng, 60), _gaussians(rng, 40))
    entry = gate.manifest_entry("sha")
    path = tmp_path / OOD_FILE
    with open(path, "wb") as fh:
        np.savez(fh, dist_mean=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(path))}: .*refit"):
        OODGate.load(path, entry, gate.dims, "refit").score(_gaussians(rng, 2))
    gate.save(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: damaged, 'mean_0' must be .* shape \(7,\)"):
        OODGate.load(path, entry, [7, 4], "refit")
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(path))}"):
        OODGate.load(path, entry, gate.dims, "refit")


def test_verdict_combines_image_checks_with_the_gate(rng):
    gate = fit_gate(_gaussians(rng, 60), _gaussians(rng, 40))
    E = [np.r_[e[:2], e[2:3] + 50] for e in _gaussians(rng, 3)]  # two typical, one far
    v = judge(gate, E, [(), ("not_colour",), ()])
    assert v.reasons[1] == ("not_colour",) and v.reasons[2][-1] == "atypical_features"
    assert v.out_of_distribution[1:].tolist() == [1.0, 1.0] and v.in_distribution_score[1] == 0.0
    none = judge(None, None, [(), ("too_small",)])
    assert np.isnan(none.in_distribution_score).all() and np.isnan(none.out_of_distribution[0])
    assert none.out_of_distribution[1] == 1.0 and none.reasons == [(), ("too_small",)]


# ---------------------------------------------------------------- the engine
def test_embeddings_of_a_cropped_bundle_are_the_mean_over_its_windows():
    import keras

    from ensemble.engine import Ensemble
    from models.branch import BranchConfig, branch_inputs, build_branch

    keras.utils.set_random_seed(0)
    configs = [BranchConfig(view=v, image_size=16, base_filters=4, crop_scale=1.5) for v in ("rgb", "hsv")]
    models = [build_branch(c) for c in configs]
    ens = Ensemble({"image_size": 16, "load_size": 24, "threshold": 0.5}, models, configs, fusion=None)
    batch = np.stack([lesion(24, seed=s) for s in range(3)])
    _, E = ens.member_outputs_batch(batch)
    for m, c, e in zip(models, configs, E):
        x, k = branch_inputs(c, batch)
        assert k == 9
        head = keras.Model(m.input, m.get_layer("gap").output)
        per_window = np.asarray(head(x, training=False)).reshape(k, len(batch), -1)
        np.testing.assert_allclose(e, per_window.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_a_bundle_without_a_gate_still_predicts_with_empty_ood_columns(tmp_path, caplog):
    import io

    from ensemble import load_ensemble
    from skinfusion.workflows.predicting import PREDICTION_COLUMNS, write_predictions

    ens = load_ensemble(FIXTURE / "ensemble-mean")
    assert ens.gate is None
    with caplog.at_level(logging.WARNING):
        d_ok, d_grey = ens.details([lesion(48), CASES["not_colour"]()])
    assert "no out-of-distribution gate" in caplog.text
    assert d_ok.in_distribution_score is None and d_ok.out_of_distribution is None and d_ok.ood_reasons == []
    assert d_grey.out_of_distribution is True and d_grey.ood_reasons == ["not_colour"]
    assert d_ok.melanoma_probability == pytest.approx(float(ens.predict_proba([lesion(48)])[0]))
    path = str(write_rgb(tmp_path / "ok.png", lesion(48)))
    buf = io.StringIO(newline="")
    write_predictions(ens, [path], buf)
    rows = list(csv.reader(io.StringIO(buf.getvalue(), newline="")))
    assert rows[0] == list(PREDICTION_COLUMNS) and rows[0][:2] == ["path", "melanoma_proba"]
    assert rows[1][0] == path and rows[1][2:] == ["", "", ""]


# ---------------------------------------------------------------- a fused run (trained_run has a gate)
def _split_paths(run: Path, split: str) -> list[str]:
    from skinfusion.data.layouts import index_dataset
    from skinfusion.data.splits import load_split

    assign, info = load_split(run)
    return [r.path for r in index_dataset(info["data_dir"], log=False).records if assign.get(r.image_id) == split]


@pytest.fixture(scope="module")
def gated(trained_run):
    from ensemble import load_ensemble

    ens = load_ensemble(trained_run)
    assert ens.gate is not None
    return ens


def test_fitted_gate_flags_far_ood_images_much_more_than_new_lesions(gated, tmp_path):
    from experiments.ood import far_ood_images
    from skinfusion.data.synthetic import make_synthetic_dataset

    far = far_ood_images(40, seed=1)
    new = sorted(str(p) for p in (make_synthetic_dataset(tmp_path / "new", n_images=60, size=48, seed=11,
                                                         atypical_rate=0.0) / "images").glob("*.jpg"))
    far_d, new_d = gated.details([img for _, img in far]), gated.details(new)
    far_rate = np.mean([d.out_of_distribution for d in far_d])
    new_rate = np.mean([d.out_of_distribution for d in new_d])
    assert far_rate >= 0.9 and new_rate <= 0.2, (far_rate, new_rate)
    # The features, not only the image-level checks, tell them apart: colour photographs, text and noise pass
    # every image check, and the gate still flags them.
    feature_only = [d for d in far_d if not set(d.ood_reasons) - {"atypical_features"}]
    assert len(feature_only) >= 15
    assert np.mean(["atypical_features" in d.ood_reasons for d in feature_only]) >= 0.8
    typicality = {"new": np.median([d.in_distribution_score for d in new_d]),
                  "far": np.median([d.in_distribution_score for d in far_d])}
    assert typicality["new"] > 0.2 > typicality["far"], typicality


def test_manifest_threshold_gives_the_requested_pass_rate_and_matches_inference(gated, trained_run, tmp_path):
    from ensemble import load_ensemble
    from ensemble.bundle import fuse_command
    from skinfusion.cli import fuse_main

    ood = gated.manifest["ood"]
    assert {"file", "sha256", "threshold", "percentile", "n_fit", "n_val", "layer"} <= set(ood)
    assert ood["percentile"] == 95 and ood["layer"] == "gap" and ood["n_fit"] == len(_split_paths(trained_run, "train"))
    val = np.load(trained_run / "ensemble" / OOD_FILE, allow_pickle=False)["val_scores"]
    assert len(val) == ood["n_val"] and abs((val <= ood["threshold"]).mean() - 0.95) <= 1 / len(val)
    # The embeddings the gate was fitted with are those inference computes: the validation images score the same.
    scored = [d.ood_distance for d in gated.details(_split_paths(trained_run, "val"))]
    np.testing.assert_allclose(np.sort(scored), val, rtol=1e-4, atol=1e-4)

    run = shutil.copytree(trained_run, tmp_path / "run")
    assert fuse_main(["--run", str(run), "--ood-percentile", "80", "-q"]) == 0
    manifest = json.loads((run / "ensemble" / "manifest.json").read_text())
    val80 = np.load(run / "ensemble" / OOD_FILE, allow_pickle=False)["val_scores"]
    assert manifest["ood"]["percentile"] == 80 and manifest["ood"]["threshold"] < ood["threshold"]
    assert abs((val80 <= manifest["ood"]["threshold"]).mean() - 0.80) <= 1 / len(val80)
    assert "--ood-percentile 80" in fuse_command(run, manifest)
    assert load_ensemble(run).gate.threshold == manifest["ood"]["threshold"]


def test_a_tampered_gate_file_is_refused_naming_it(trained_run, tmp_path, capsys):
    import ensemble
    from ensemble import load_ensemble
    from skinfusion.cli import predict_main

    run = shutil.copytree(trained_run, tmp_path / "run")
    npz = run / "ensemble" / OOD_FILE
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(npz))}: SHA-256 differs .* refusing to load it"):
        load_ensemble(run)
    ensemble.clear_cache()
    rc = predict_main(["--run", str(run), _split_paths(trained_run, "test")[0]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and f"{npz}: SHA-256 differs" in err
    # Re-signed, a pickle is still refused (allow_pickle=False), and a missing file is named.
    with open(npz, "wb") as fh:
        np.savez(fh, dist_mean=np.array([print], dtype=object))
    manifest_path = run / "ensemble" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from ensemble.bundle import sha256_file

    manifest["ood"]["sha256"] = sha256_file(npz)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"cannot load {re.escape(str(npz))}: .*skinfusion fuse --run"):
        load_ensemble(run)
    npz.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(npz))}: bundle file listed in .* is missing"):
        load_ensemble(run)


def test_predict_csv_has_the_ood_columns(trained_run, tmp_path):
    from experiments.ood import far_ood_images
    from skinfusion.cli import predict_main
    from skinfusion.workflows.predicting import PREDICTION_COLUMNS

    lesions = _split_paths(trained_run, "test")[:4]
    grey = str(write_rgb(tmp_path / "grey, 'image'.png", CASES["not_colour"]()))
    tiny = str(write_rgb(tmp_path / "tiny.png", lesion(20)))
    photo = str(write_rgb(tmp_path / "photo.png", far_ood_images(1)[0][1]))
    out = tmp_path / "pred.csv"
    assert predict_main(["--run", str(trained_run), *lesions, grey, tiny, photo, "--out", str(out), "-q"]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == PREDICTION_COLUMNS and rows[0][:2] == ["path", "melanoma_proba"]
    by_path = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert list(by_path) == [*lesions, grey, tiny, photo]  # quoted paths read back intact, in order
    for p in lesions:
        row = by_path[p]
        assert 0.0 <= float(row["in_distribution_score"]) <= 1.0 and row["out_of_distribution"] in ("0", "1")
    assert sum(by_path[p]["out_of_distribution"] == "0" for p in lesions) >= 3
    assert by_path[grey]["out_of_distribution"] == "1" and by_path[grey]["ood_reason"].split(";")[0] == "not_colour"
    assert by_path[grey]["in_distribution_score"] == "0.0000"
    assert by_path[tiny]["ood_reason"].startswith("too_small")
    assert by_path[photo]["ood_reason"] == "atypical_features" and by_path[photo]["out_of_distribution"] == "1"


def test_gate_scores_do_not_depend_on_the_batch_or_on_tta(gated, trained_run):
    from experiments.ood import far_ood_images

    paths = _split_paths(trained_run, "test")[:3]
    alone = [gated.details([p])[0] for p in paths]
    mixed = gated.details([img for _, img in far_ood_images(6, seed=2)][:3] + paths + [lesion(48)])[3:6]
    tta = gated.details(paths, tta=True)
    for a, m, t in zip(alone, mixed, tta):
        assert m.ood_distance == pytest.approx(a.ood_distance, rel=1e-5, abs=1e-5)
        assert m.melanoma_probability == pytest.approx(a.melanoma_probability, abs=1e-6)
        # TTA averages the probability over 8 symmetries; the gate scores the image as given.
        assert t.ood_distance == pytest.approx(a.ood_distance, rel=1e-5, abs=1e-5)


def test_fusing_without_the_dataset_writes_a_bundle_without_a_gate_that_predicts(trained_run, tmp_path, caplog):
    import ensemble
    from ensemble import load_ensemble
    from skinfusion.workflows.fusing import fuse_run

    run = shutil.copytree(trained_run, tmp_path / "run")
    info = json.loads((run / "split.json").read_text())
    info["data_dir"] = str(tmp_path / "moved-away")
    (run / "split.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        result = fuse_run(str(run), "mean")
    assert result["ood"] is None and "fusing without an OOD gate" in caplog.text and "moved-away" in caplog.text
    assert "ood" not in json.loads((run / "ensemble" / "manifest.json").read_text())
    assert not (run / "ensemble" / OOD_FILE).exists(), "the previous fuse's gate was left behind"
    ens = load_ensemble(run)
    path = _split_paths(trained_run, "test")[0]
    assert ens.gate is None and ensemble.predict_details(path, run=run).in_distribution_score is None
    assert ens.predict_proba([path])[0] == pytest.approx(float(load_ensemble(trained_run).predict_proba([path])[0]))


def test_public_predict_details_names(trained_run):
    import skinfusion
    from ensemble import predict, predict_details, predict_details_batch

    assert skinfusion.predict_details is predict_details and skinfusion.predict_details_batch is predict_details_batch
    paths = _split_paths(trained_run, "test")[:2]
    one = predict_details(paths[0], run=trained_run)
    assert one.melanoma_probability == pytest.approx(predict(paths[0], run=trained_run), abs=1e-9)
    assert set(one.branch_probabilities) == {"rgb", "hsv", "fft"}
    assert one.decision in (("melanoma", "nevus") if not one.out_of_distribution else (None,))
    assert json.loads(json.dumps(one.as_dict()))["in_distribution_score"] == one.in_distribution_score
    batch = predict_details_batch(paths, run=trained_run)
    assert len(batch) == 2 and batch[0].ood_reasons == one.ood_reasons
    assert batch[0].melanoma_probability == pytest.approx(one.melanoma_probability, abs=1e-6)
    assert batch[0].ood_distance == pytest.approx(one.ood_distance, rel=1e-5)


def test_held_out_images_shape_neither_the_gate_fit_nor_its_threshold(trained_run, tmp_path):
    # A leave-one-source-out run lists the held-out source in RUN/held_out_ids.txt: the gate must be
    # fitted and thresholded on the images the branches saw, or it would call that source typical.
    from skinfusion.data.layouts import index_dataset
    from skinfusion.data.splits import load_split
    from skinfusion.workflows.fusing import HELD_OUT_FILE, fit_run_gate

    run = shutil.copytree(trained_run, tmp_path / "run")
    assign, info = load_split(run)
    records = index_dataset(info["data_dir"], log=False).records
    train_ids = [r.image_id for r in records if assign.get(r.image_id) == "train"]
    val_ids = [r.image_id for r in records if assign.get(r.image_id) == "val"]
    held = train_ids[:7] + val_ids[:3]
    (run / HELD_OUT_FILE).write_text("\n".join(held) + "\n")
    gate = fit_run_gate(run, [run / "branches" / v for v in ("rgb", "hsv", "fft")], 95)
    assert gate.n_fit == len(train_ids) - 7
    assert len(gate.val_scores) == len(val_ids) - 3
