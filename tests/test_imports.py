"""What each entry point imports, measured in a fresh interpreter: inference never loads training code,
the fusion layer and the data layer never load Keras or TensorFlow, and the public names still import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
DEEP_LEARNING = ("tensorflow", "keras")
TRAINING = ("models.train", "skinfusion.workflows.training", "skinfusion.data", "experiments")


def modules_after(code: str, timeout: int = 300) -> tuple[set[str], str]:
    """Run ``code`` in a fresh interpreter; return every module it left in ``sys.modules`` and its stdout."""
    script = textwrap.dedent(code) + "\nimport json as _j, sys as _s\nprint(_j.dumps(sorted(_s.modules)))\n"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    *printed, last = proc.stdout.strip().splitlines()
    return set(json.loads(last)), "\n".join(printed)


def loaded(modules: set[str], prefixes) -> list[str]:
    """The modules in ``modules`` that are one of ``prefixes`` or inside one of them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


FUSION_ONLY = """
import numpy as np
import ensemble.fusion
from ensemble import AverageFusion, StackingFusion
P = np.random.default_rng(0).random((40, 3)); y = np.arange(40) % 2
print(float(StackingFusion().fit(P, y).predict_proba(P)[:, 1].sum() + AverageFusion().fit(P).predict_proba(P).sum()))
"""

PREDICT_BUNDLE = f"""
import ensemble
ens = ensemble.load_ensemble({str(FIXTURE / "ensemble-mean")!r})
print(float(ens.predict_proba([{str(FIXTURE / "images" / "gen0.png")!r}])[0]))
print(ensemble.predict({str(FIXTURE / "images" / "gen0.png")!r}, run={str(FIXTURE / "ensemble-mean")!r}))
"""


def test_the_fusion_layer_imports_neither_tensorflow_nor_keras():
    modules, printed = modules_after(FUSION_ONLY)
    assert float(printed) > 0  # the code really fitted and predicted
    assert "ensemble.fusion" in modules and "sklearn" in modules
    assert loaded(modules, DEEP_LEARNING) == [], "import ensemble.fusion pulled in Keras/TensorFlow"


def test_the_fusion_check_notices_tensorflow():
    """The check above can fail: the same code with Keras imported on the side is caught."""
    modules, _ = modules_after("import keras\n" + FUSION_ONLY)
    assert "tensorflow" in loaded(modules, DEEP_LEARNING) or "keras" in loaded(modules, DEEP_LEARNING)


@pytest.mark.slow
def test_loading_a_bundle_and_predicting_never_imports_training_or_dataset_code():
    modules, printed = modules_after(PREDICT_BUNDLE)
    want = EXPECTED["expected"]["ensemble-mean"]["fused"][EXPECTED["images"].index("gen0.png")]
    engine, public = (float(line) for line in printed.splitlines())
    assert engine == pytest.approx(want, abs=1e-6) and public == pytest.approx(want, abs=1e-6)
    assert "keras" in modules and "models.branch" in modules  # inference did run the branch CNNs
    assert loaded(modules, TRAINING) == [], "inference imported training or dataset code"


@pytest.mark.slow
def test_the_inference_check_notices_the_training_module():
    """The check above can fail: the same code with an explicit ``import models.train`` is caught."""
    modules, _ = modules_after("import models.train\n" + PREDICT_BUNDLE)
    assert loaded(modules, TRAINING) == ["models.train"]


def _data_modules() -> list[str]:
    return sorted(f"skinfusion.data.{p.stem}" for p in (ROOT / "skinfusion" / "data").glob("*.py")
                  if p.stem != "__init__")


@pytest.mark.parametrize("module", _data_modules())
def test_data_modules_import_neither_keras_nor_tensorflow(module):
    modules, _ = modules_after(f"import {module}")
    assert module in modules
    assert loaded(modules, DEEP_LEARNING) == [], f"{module} pulled in Keras/TensorFlow"


def test_the_data_modules_listed_include_index_and_splits():
    assert {"skinfusion.data.index", "skinfusion.data.splits"} <= set(_data_modules())


def test_the_synth_command_imports_neither_keras_nor_tensorflow(tmp_path):
    modules, _ = modules_after(f"""
        from skinfusion.cli import main
        assert main(["synth", "--out", {str(tmp_path / "syn")!r}, "--n-images", "40", "--size", "16"]) == 0
    """)
    assert (tmp_path / "syn" / "labels.csv").is_file()
    assert loaded(modules, DEEP_LEARNING) == [], "a data-only command pulled in Keras/TensorFlow"


@pytest.mark.slow
def test_public_predict_names_import_and_agree():
    import ensemble.api
    from ensemble import predict, predict_proba
    from skinfusion import predict as facade_predict
    from skinfusion import predict_proba as facade_predict_proba

    assert predict is ensemble.api.predict is facade_predict
    assert predict_proba is ensemble.api.predict_proba is facade_predict_proba
    bundle = FIXTURE / "ensemble-mean"
    paths = [str(FIXTURE / "images" / name) for name in EXPECTED["images"]]
    want = EXPECTED["expected"]["ensemble-mean"]["fused"]
    assert facade_predict(paths[0], run=bundle) == pytest.approx(want[0], abs=1e-6)
    assert predict_proba(paths, run=bundle) == pytest.approx(want, abs=1e-6)


def test_the_server_and_its_benchmark_import_neither_tensorflow_nor_keras():
    """``serve --run EXPORT`` scores with onnxruntime or LiteRT: building its app must not load TensorFlow,
    and ``bench-serve`` computes the served model id from ``ensemble.rundir``, not from a copy."""
    modules, printed = modules_after(f"""
        from skinfusion.bench import bench_serve
        from skinfusion.serve import serving, serving_io
        from ensemble.rundir import model_id
        print(serving_io.model_id is model_id, model_id({str(FIXTURE / "ensemble-mean")!r})[:8])
    """)
    same, mid = printed.split()
    assert same == "True" and len(mid) == 8
    assert "skinfusion.serve.serving" in modules
    assert loaded(modules, DEEP_LEARNING) == [], "the server's modules pulled in Keras/TensorFlow"
