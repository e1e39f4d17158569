"""The ``python -m experiments.X`` scripts keep the command-line standard of ``skinfusion``.

A wrong path is one ``error:`` line naming it (exit 2), not a traceback; ``--help`` and flag
mistakes answer before TensorFlow is imported.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script, argv with a missing path, the text the error line must hold)
WRONG_PATHS = [
    ("loso", ["train", "--data", "{missing}", "--out", "{tmp}/loso", "--holdout", "ISIC2017", "--name", "a"], "{missing}"),
    ("loso", ["report", "--out", "{missing}"], "{missing}"),
    ("label_process", ["{missing}", "--data", "{missing}"], "{missing}"),
    ("ood", ["--checks-only", "--data", "{missing}", "--out", "{tmp}/ood"], "{missing}"),
    ("studies", ["--data", "{missing}", "--out", "{tmp}/studies"], "{missing}"),
    ("measure_audit", ["--data", "{missing}"], "{missing}"),
    ("ood_rules", ["--run", "{missing}", "--data", "{missing}", "--out", "{tmp}/rules"], "{missing}"),
    ("adapt", ["--run", "{missing}", "--data", "{missing}", "--out", "{tmp}/adapt", "--holdout-source", "ISIC2017"],
     "{missing}"),
    ("farood", ["--out", "{file}/sub", "--per-kind", "1"], "{file}"),
    ("compare_runs", ["{missing}", "{missing}"], "{missing}"),
]


@pytest.mark.parametrize("script, argv, expected", WRONG_PATHS, ids=[f"{s}-{a[0]}" for s, a, _ in WRONG_PATHS])
def test_a_wrong_path_is_one_error_line_naming_it(script, argv, expected, tmp_path, capsys):
    missing, file = tmp_path / "no-such-folder", tmp_path / "a-file"
    file.write_text("not a folder")

    def fill(text: str) -> str:
        return text.format(missing=missing, tmp=tmp_path, file=file)

    main = importlib.import_module(f"experiments.{script}").main
    assert main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and fill(expected) in err[0], err


def test_help_and_flag_mistakes_answer_before_tensorflow_is_imported():
    code = """
import json, sys
results = {}
for script, argv in [("loso", ["train", "--data", "D", "--out", "O", "--holdout", "H", "--name", "n", "--set", "epochs=0"]),
                     ("loso", ["--help"]), ("accuracy", ["--data", "D", "--configs", "no-such-config"]),
                     ("studies", ["--help"]), ("sweep", ["--data", "D", "--grid", "96"]), ("ood", ["--data", "D", "--out", "O"]),
                     ("label_process", ["--help"]), ("seeds", ["--help"]), ("measure_audit", ["--help"]),
                     ("compare_runs", ["--help"]), ("farood", ["--help"]), ("ood_rules", ["--help"]),
                     ("ood_variants", ["--help"]), ("bench_ray", ["--help"]), ("bench_views", ["--views", "nope"]),
                     ("adapt", ["--help"]), ("baseline", ["--help"])]:
    module = __import__(f"experiments.{script}", fromlist=["main"])
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    results[f"{script} {argv[-1]}"] = [code, "tensorflow" in sys.modules]
print(json.dumps(results))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (code, tensorflow) in results.items():
        assert code in (0, 2), (name, code)
        assert not tensorflow, f"{name}: imported TensorFlow before answering"


def test_bench_views_times_both_sides_on_identical_arrays(capsys):
    from experiments.bench_views import main

    assert main(["--size", "16", "--crop-scale", "1.25", "--batch", "4", "--batches", "2", "--rounds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_arrays"] is True and report["load"] == 20 and report["images_per_pass"] == 8
    assert report["views"] == ["rgb", "hsv", "fft", "rgb_sog", "hsv_sog"]
    assert all(report[side]["cpu_ms_per_image"] > 0 for side in ("branch by branch", "shared"))
    assert main(["--crop-scale", "3"]) == 2
    assert "--crop-scale must be in [1, 2]" in capsys.readouterr().err


def test_bench_views_fails_in_both_modes_when_the_shared_path_differs(monkeypatch, capsys):
    """A timing of two paths that compute different arrays is meaningless: exit 1, JSON or table."""
    import experiments.bench_views as bv

    real = bv.Preprocess.branch_inputs
    monkeypatch.setattr(bv.Preprocess, "branch_inputs", lambda self, b: [(x + 1, k) for x, k in real(self, b)])
    common = ["--views", "rgb", "--size", "16", "--batch", "2", "--batches", "1", "--rounds", "1"]
    assert bv.main([*common, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["identical_arrays"] is False
    assert bv.main(common) == 1
