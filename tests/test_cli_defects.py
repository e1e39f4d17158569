"""Issue 26's command-line defects: --help without TensorFlow, TensorFlow's start-up notices, empty --input,
--out suffixes, export directories given as --run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skinfusion.cli import COMMANDS, main

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
# Every command, train included: its flags come from models.config.BranchConfig, which is Keras-free.
TF_FREE_HELP = list(COMMANDS)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_help_of_every_command_imports_no_tensorflow():
    # One interpreter for all commands: the first --help that imports TensorFlow is named.
    done = _python(f"""
import contextlib, io, sys
from skinfusion.cli import main
for command in {TF_FREE_HELP!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([command, "--help"])
    if "tensorflow" in sys.modules:
        sys.exit("--help of " + command + " imported tensorflow")
""")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def keras_run(tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "branches", run / "branches")
    shutil.copytree(FIXTURE / "ensemble-mean", run / "ensemble")
    return run


def test_tensorflow_start_up_notices_appear_at_most_once(keras_run):
    done = _python(f"from skinfusion.cli import main; raise SystemExit(main(['predict', '--run', {str(keras_run)!r}, "
                   f"{str(FIXTURE / 'images' / 'gen0.png')!r}]))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "melanoma_proba" in done.stdout
    for notice in ("absl::InitializeLog", "cudart_stub", "cpu_feature_guard", "oneDNN custom operations"):
        assert done.stderr.count(notice) <= 1, done.stderr


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_an_empty_input_folder_says_no_images_found(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    extra = ["--out", str(tmp_path / "x")] if command == "explain" else []
    assert main([command, "--run", str(tmp_path / "run"), "--input", str(empty), *extra]) == 2
    err = capsys.readouterr().err
    assert f"no images found in --input {empty}" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["p.json", "p.xlsx", "p.tsv"])
def test_predict_refuses_an_out_suffix_it_does_not_write(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["predict", "--run", str(tmp_path / "run"), str(FIXTURE / "images" / "gen0.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "Parquet" in err and not out.exists()


def test_predict_writes_csv_to_a_csv_name(keras_run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(keras_run), str(FIXTURE / "images" / "gen0.png"), "--out", str(out), "-q"]) == 0
    assert out.read_text().startswith("path,melanoma_proba")


@pytest.mark.parametrize(("command", "extra"), [
    ("export", ["--out", "OUT"]),
    ("evaluate", []),
    ("adapt", ["--images", "OUT", "--out", "OUT"]),
    ("fuse", []),
    ("explain", ["--out", "OUT", "x.png"]),
])
def test_an_export_given_as_run_is_named_with_its_source_run(command, extra, tmp_path, capsys):
    import json

    from ensemble.runtime import EXPORT_KIND

    export = tmp_path / "export"
    export.mkdir()
    # what ensemble.export writes: its kind and the run it came from
    (export / "manifest.json").write_text(json.dumps({"kind": EXPORT_KIND, "format": "onnx",
                                                      "source": {"run": "/data/runs/r1"}}))
    args = [a.replace("OUT", str(tmp_path / "out")) for a in extra]
    assert main([command, "--run", str(export), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an export directory" in err and "--run /data/runs/r1" in err, err
    assert "damaged" not in err


WORKER_SCRIPT = """
import pickle, sys
sys.path.insert(0, {tmp!r})
from joblib import Parallel, delayed
from models.quiet import call_quietly, import_tensorflow_quietly
import_tensorflow_quietly()  # as the commands do first, so only the workers could print
import tfwork  # a module that imports TensorFlow at module level, as skinfusion.workflows.training does
if sys.argv[1] == "quiet":
    tasks = [delayed(call_quietly)(pickle.dumps((tfwork.add_one, (i,)))) for i in range(2)]
else:
    tasks = [delayed(tfwork.add_one)(i) for i in range(2)]
print(Parallel(n_jobs=2, backend="loky")(tasks))
"""


def test_training_workers_start_tensorflow_without_its_notices(tmp_path):
    # The way train_branches starts its loky workers (call_quietly), against the plain way, which
    # prints TensorFlow's notices from every worker: the comparison shows the notices exist here.
    (tmp_path / "tfwork.py").write_text("import tensorflow as tf\n\n\ndef add_one(i):\n    return int(tf.constant(i) + 1)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    runs = {mode: subprocess.run([sys.executable, "-c", WORKER_SCRIPT.format(tmp=str(tmp_path)), mode],
                                 capture_output=True, text=True, timeout=600, env=env) for mode in ("plain", "quiet")}
    for done in runs.values():
        assert done.returncode == 0 and "[1, 2]" in done.stdout, done.stderr[-2000:]
    if "absl::InitializeLog" not in runs["plain"].stderr:
        pytest.skip("this TensorFlow build prints no start-up notices in a worker")
    assert runs["quiet"].stderr.strip() == "", runs["quiet"].stderr
