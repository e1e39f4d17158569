"""experiments.ood_variants on Gaussian embeddings: rates, the frontier and the branch-weight choice."""

import numpy as np
import pytest

from experiments import ood_variants as ov

LAYERS = ("relu1", "relu2", "relu3", "relu4", "gap")
DIMS = {"relu1": 3, "relu2": 4, "relu3": 4, "relu4": 5, "gap": 6}


def _emb(rng, n, shift=(0.0, 0.0, 0.0)):
    """Three branches; every layer of branch j shifted by ``shift[j]`` standard deviations along all axes."""
    return {layer: [np.abs(rng.normal(size=(n, DIMS[layer])) + 3.0 + s) for s in shift] for layer in LAYERS}


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    fit = {"train": _emb(rng, 600), "val": _emb(rng, 600)}
    held = _emb(rng, 200, shift=(0.0, 1.2, 1.2))  # a new clinic: shifted on branches 1 and 2 only
    sets = {
        "test": {"emb": _emb(rng, 400), "checks": np.zeros(400, bool), "groups": np.array(["test"] * 400)},
        "held_out_source": {"emb": held, "checks": np.zeros(200, bool),
                            "groups": np.array(["split_val", "split_test"] * 100)},
        # far-OOD: far on branch 0 only; a tenth caught by the image checks
        "far_ood_tuning": {"emb": _emb(rng, 100, shift=(6.0, 0.0, 0.0)), "checks": np.arange(100) < 10,
                           "groups": np.array(["tuning"] * 100)},
        "far_ood_heldout": {"emb": _emb(rng, 100, shift=(6.0, 0.0, 0.0)), "checks": np.zeros(100, bool),
                            "groups": np.array(["heldout"] * 100)},
    }
    return fit, sets


def test_compositions_cover_the_simplex():
    comps = ov._compositions(3, 10)
    assert len(comps) == 66 == len(set(comps))  # C(12, 2)
    assert all(sum(c) == 10 and min(c) >= 0 for c in comps)
    weights = ov._simplex(3, 10)
    assert np.allclose([w.sum() for w in weights], 1.0)


def test_evaluate_rates_frontier_and_weights():
    fit, sets = _problem()
    out = ov.evaluate(fit, sets, (99.0,))
    assert set(out) == {*ov.VARIANTS, "weights"}
    for name in ov.VARIANTS:
        r = out[name]["by_percentile"]["99"]
        # in-distribution images pass at about the validation rate; far-OOD images are flagged
        assert r["test"] <= 0.04, (name, r)
        assert r["far_ood_tuning"] >= 0.95 and r["far_ood_heldout"] >= 0.95, (name, r)
        assert r["held_out_split_val"] > r["test"], (name, r)
        f = out[name]["frontier"]
        assert f["far_ood_tuning"] >= ov.FAR_GOAL
        # the frontier's threshold is at least as loose as the 99th percentile's when far-OOD is this easy
        assert f["held_out_split_val"] <= r["held_out_split_val"] + 1e-9
    w = out["weights"]
    assert w["weights"] is not None and abs(sum(w["weights"]) - 1) < 1e-6
    # far-OOD shows on branch 0 and the new clinic on branches 1-2: the choice weights branch 0
    assert w["weights"][0] >= 0.7, w
    assert w["chosen"]["far_ood_tuning"] >= ov.FAR_GOAL
    assert w["chosen"]["held_out_split_val"] < out["gap"]["by_percentile"]["99"]["held_out_split_val"]


def test_markdown_lists_every_variant():
    fit, sets = _problem(1)
    result = {"run": "RUN", "variants": ov.evaluate(fit, sets, (99.0, 99.5)),
              "held_out_by_disc": {"99": {"split_val": {"colour_disc": {"n": 3, "flagged": 1.0},
                                                        "no_disc": {"n": 97, "flagged": 0.1}}}}}
    md = ov.markdown(result)
    for name in ov.VARIANTS:
        assert f"| {name} | 99 |" in md and f"| {name} | 99.5 |" in md and f"| {name} | frontier" in md
    assert "| weights [" in md
    assert "| 99 | split_val | 3 | 1.000 | 97 | 0.100 |" in md


@pytest.mark.parametrize("argv", [["--run", "R", "--data", "D", "--out", "O", "--percentiles", "20"]])
def test_cli_rejects_a_bad_percentile(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ov.main(argv)
    assert e.value.code == 2
    assert "--percentiles" in capsys.readouterr().err


def test_cli_names_a_missing_run_in_one_line(tmp_path, capsys):
    code = ov.main(["--run", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'nope'}: no such run directory" in err


def test_cli_refuses_a_per_kind_below_one(capsys):
    with pytest.raises(SystemExit) as e:
        ov.main(["--run", "R", "--data", "D", "--out", "O", "--per-kind", "0"])
    assert e.value.code == 2 and "--per-kind: must be at least 1" in capsys.readouterr().err


def test_layer_heads_of_a_seeds_branch_put_its_members_side_by_side():
    from types import SimpleNamespace

    from models import BranchConfig, build_branch
    from models.branch import assemble_members, member_config

    config = BranchConfig(view="rgb", image_size=16, base_filters=4, seeds=2)
    members = [build_branch(member_config(config, k)) for k in range(2)]
    one = build_branch(BranchConfig(view="rgb", image_size=16, base_filters=4))
    heads, names = ov.layer_heads(SimpleNamespace(models=[assemble_members(config, members), one]))
    assert names == list(LAYERS)  # the seeds branch keeps the multi-layer variants
    x = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    seeds_out, one_out = heads[0](x, training=False), heads[1](x, training=False)
    for a, b in zip(seeds_out, one_out):
        assert a.shape[-1] == 2 * b.shape[-1]
    # Member 2's pooled relu1 is the second half of the seeds branch's relu1.
    m2 = members[1]
    import keras

    pooled = keras.Model(m2.input, keras.layers.GlobalAveragePooling2D()(m2.get_layer("relu1").output))(x)
    np.testing.assert_allclose(np.asarray(seeds_out[0])[:, 4:], np.asarray(pooled), rtol=1e-5, atol=1e-6)
