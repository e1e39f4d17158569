"""Bundles written by an earlier release still load and give the same predictions."""

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.mark.parametrize("bundle", sorted(EXPECTED["expected"]))
def test_a_bundle_written_by_0_1_0_gives_the_same_predictions(bundle):
    from ensemble import load_ensemble

    ens = load_ensemble(FIXTURE / bundle)
    paths = [str(FIXTURE / "images" / name) for name in EXPECTED["images"]]
    want = EXPECTED["expected"][bundle]
    meta = EXPECTED["metadata"] if ens.metadata_fields else None
    np.testing.assert_allclose(ens.predict_proba(paths, metadata=meta), want["fused"], atol=1e-6)
    np.testing.assert_allclose(ens.member_proba(paths), want["P"], atol=1e-6)


def _pickled_globals(path: Path, monkeypatch) -> set[str]:
    """Every module.qualname that unpickling ``path`` imports (joblib interleaves raw array bytes, so read it with joblib)."""
    import joblib
    from joblib import numpy_pickle

    found, original = set(), numpy_pickle.NumpyUnpickler.find_class

    def recording(self, module, name):
        found.add(f"{module}.{name}")
        return original(self, module, name)

    with monkeypatch.context() as m:
        m.setattr(numpy_pickle.NumpyUnpickler, "find_class", recording)
        joblib.load(path)
    return found


def test_the_old_bundles_pickle_only_class_paths_this_release_still_provides(monkeypatch):
    import importlib

    names = set().union(*(_pickled_globals(FIXTURE / b / "fusion.joblib", monkeypatch) for b in EXPECTED["expected"]))
    ours = {n for n in names if n.split(".")[0] in ("ensemble", "models", "skinfusion", "experiments")}
    assert {"ensemble.fusion.AverageFusion", "ensemble.fusion.StackingFusion", "ensemble.metadata.MetadataEncoder"} <= ours
    for name in ours:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"{name} is pickled in an old bundle but no longer exists"
