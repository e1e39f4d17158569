"""The command line: a generated usage and generated train flags, views and fusion methods read from their registries, and CSV output that round-trips."""

import argparse
import ast
import csv
import dataclasses
import io
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import skinfusion.cli as cli
from colorspaces import DEFAULT_VIEWS, VIEWS, ViewSpec, to_rgb
from ensemble.fusion import FUSION_METHODS, AverageFusion
from models import BranchConfig
from skinfusion.cli import common, fuse, predict, synth, train
from skinfusion.workflows.auditing import artefact_exclusions
from skinfusion.workflows.predicting import (
    PREDICTION_COLUMNS,
    input_paths,
    predict_to_csv,
    read_metadata_csv,
    write_predictions,
)

ROOT = Path(__file__).resolve().parents[1]


def _gray(images):
    return to_rgb(images).mean(axis=-1, keepdims=True)


@pytest.fixture
def gray_view(monkeypatch):
    """A toy fourth view, registered the one way a view is added: an entry in VIEWS."""
    monkeypatch.setitem(VIEWS, "gray", ViewSpec("gray", 1, _gray, "mean of RGB"))
    return "gray"


def _module_doc_line(module):
    return ast.get_docstring(ast.parse(Path(sys.modules[module].__file__).read_text())).splitlines()[0]


def test_usage_is_generated_from_the_command_registry(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, module in cli.COMMANDS.items():
        cli.command_module(name)
        assert f"  {name}" in out and _module_doc_line(module) in out, name
        if name != "bench":  # bench's parser, and its description, belong to skinfusion.bench.bench
            assert cli.command_module(name).parser().description == _module_doc_line(module)
    assert cli.main([]) == 2
    assert cli.main(["nosuch"]) == 2 and "unknown command 'nosuch'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("skinfusion ")


def test_every_command_module_is_thin_and_importable_by_its_old_name():
    for name, module in cli.COMMANDS.items():
        mod = cli.command_module(name)
        assert isinstance(mod.parser(), argparse.ArgumentParser) and callable(mod.main)
        assert getattr(cli, f"{name.replace('-', '_')}_main") is mod.main
        assert len(Path(mod.__file__).read_text().splitlines()) <= 200, module
    with pytest.raises(AttributeError, match="no attribute 'nosuch_main'"):
        cli.nosuch_main  # noqa: B018


def test_listing_commands_and_data_only_commands_do_not_import_tensorflow():
    code = ("import sys, contextlib, io\n"
            "import skinfusion.cli as cli\n"
            "from skinfusion.cli import audit_main, synth_main, verify_split_main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['--help']) == 0\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_train_flags_are_generated_from_branch_config_fields():
    parser = train.parser()
    actions = {a.dest: a for a in parser._actions}
    types = typing.get_type_hints(BranchConfig)
    for f in dataclasses.fields(BranchConfig):
        if f.name == "view":
            continue
        action = actions[f.name]
        assert action.default is None, f"{f.name}: an unset flag must not override --config"
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
        if types[f.name] is bool:
            assert action.const is (not f.default)
            continue
        assert action.type is types[f.name]
        default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default) or "empty"
        assert action.help.endswith(f"(default {default})"), action.help
        if "choices" in f.metadata:
            assert list(action.choices) == list(f.metadata["choices"])
    args = parser.parse_args(["--view", "rgb", "--data", "d", "--run", "r"])
    assert train.config_overrides(args) == {}
    args = parser.parse_args(["--view", "hsv", "--data", "d", "--run", "r", "--no-augment", "--image-size", "48",
                              "--class-weight", "balanced", "--learning-rate", "2e-3"])
    assert train.config_overrides(args) == {"augment": False, "image_size": 48, "class_weight": "balanced",
                                            "learning_rate": 2e-3}
    with pytest.raises(SystemExit):
        parser.parse_args(["--view", "rgb", "--data", "d", "--run", "r", "--sampling", "sometimes"])


def test_config_choices_are_validated_from_the_field_metadata():
    for f in dataclasses.fields(BranchConfig):
        if "choices" in f.metadata:
            with pytest.raises(ValueError, match=f"{f.name} must be one of"):
                BranchConfig(**{f.name: "no-such-choice"})


def test_a_view_registered_later_is_a_train_and_fuse_choice(gray_view):
    args = train.parser().parse_args(["--view", gray_view, "--data", "d", "--run", "r"])
    assert args.view == "gray" and BranchConfig(view=args.view).channels == 1
    assert fuse.parse_views("rgb,gray") == ["rgb", "gray"]
    assert fuse.parser().parse_args(["--run", "r"]).views is None  # fuse_run picks the default (default_fuse_views)
    with pytest.raises(ValueError, match="rgb,nope"):
        fuse.parse_views("rgb,nope")
    with pytest.raises(ValueError, match="twice"):
        fuse.parse_views("rgb,rgb")


def test_an_unregistered_view_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parser().parse_args(["--view", "gray", "--data", "d", "--run", "r"])
    assert "invalid choice: 'gray'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gray"):
        fuse.parse_views("gray")


def test_fuse_methods_come_from_the_fusion_registry(monkeypatch):
    assert fuse.parser().parse_args(["--run", "r", "--method", "stack"]).method == "stack"
    monkeypatch.setitem(FUSION_METHODS, "toy", AverageFusion)
    assert fuse.parser().parse_args(["--run", "r", "--method", "toy"]).method == "toy"


@pytest.mark.parametrize("argv, flag", [
    (["--workers", "-3"], "--workers"),
    (["--jobs", "0"], "--jobs"),
    (["--workers", "two"], "--workers"),
])
def test_train_counts_must_be_positive(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parser().parse_args(["--view", "rgb", "--data", "d", "--run", "r", *argv])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_synth_refuses_impossible_datasets(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "a"), "--melanoma-fraction", "1.5"]) == 2
    assert "--melanoma-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "b"), "--n-images", "0"])
    assert "--n-images" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_guarded_runner_reports_errors_and_interrupts_without_traceback(capsys):
    def boom(exc):
        def body(_):
            raise exc
        return body

    assert common.run_guarded(boom(KeyError("unknown view 'x'")), None) == 2
    assert capsys.readouterr().err == "skinfusion: error: unknown view 'x'\n"
    assert common.run_guarded(boom(KeyboardInterrupt()), None, "rerun with --resume") == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun with --resume" in err and "Traceback" not in err


class _StubEnsemble:
    """Stands in for a loaded ensemble: scores every readable path 0.25 and skips the ones named 'bad'."""

    def iter_files(self, paths, batch_size=64, workers=2, tta=False, metadata=None):
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            ok = [p for p in chunk if "bad" not in p]
            yield SimpleNamespace(paths=ok, fused=np.full(len(ok), 0.25),
                                  failures=[(p, f"{p}: not an image") for p in chunk if "bad" in p])


AWKWARD_PATHS = ["plain.jpg", "with,comma.jpg", 'with "quotes", and comma.png', "new\nline.jpg", "bad,one.jpg"]


def test_predictions_csv_round_trips_awkward_paths(tmp_path):
    buf = io.StringIO(newline="")
    skipped = write_predictions(_StubEnsemble(), AWKWARD_PATHS, buf, batch_size=2)
    rows = list(csv.reader(io.StringIO(buf.getvalue(), newline="")))
    assert rows[0] == list(PREDICTION_COLUMNS) and rows[0][:2] == ["path", "melanoma_proba"]
    # The stub has no OOD gate: its OOD cells are empty, never made up.
    assert rows[1:] == [[p, "0.250000", "", "", ""] for p in AWKWARD_PATHS if "bad" not in p]
    assert [p for p, _ in skipped] == ["bad,one.jpg"]

    out = tmp_path / "pred.csv"
    done = []
    predict_to_csv(_StubEnsemble(), AWKWARD_PATHS, out, batch_size=2, on_batch=lambda n, s: done.append((n, s)))
    with open(out, newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == AWKWARD_PATHS[:-1]
    with open(str(out) + ".skipped.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == ["bad,one.jpg"]
    assert done == [(2, 0), (2, 0), (1, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv", "pred.csv.skipped.csv"], "no temporary file left"


def test_an_interrupted_prediction_leaves_no_file(tmp_path):
    class Interrupted(_StubEnsemble):
        def iter_files(self, paths, **kw):
            yield from list(super().iter_files(paths, **kw))[:1]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_to_csv(Interrupted(), AWKWARD_PATHS, tmp_path / "pred.csv", batch_size=2)
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_an_unwritable_out_before_loading_anything(tmp_path, capsys):
    no_run = str(tmp_path / "no-run")
    assert predict.main(["--run", no_run, "x.jpg", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert predict.main(["--run", no_run, "x.jpg", "--out", str(tmp_path / "missing" / "p.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_input_paths_reads_folders_and_lists(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.JPG", "sub/a.png", "sub/c.webp", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"x")
    assert [Path(p).relative_to(tmp_path / "d").as_posix() for p in input_paths(str(tmp_path / "d"))] == \
        ["b.JPG", "sub/a.png", "sub/c.webp"]
    listing = tmp_path / "d" / "list.txt"
    listing.write_text("# comment\nsub/a.png\n\n/abs/x.jpg\n")
    assert input_paths(str(listing)) == [str(tmp_path / "d" / "sub" / "a.png"), "/abs/x.jpg"]
    with pytest.raises(ValueError, match="is an image"):
        input_paths(str(tmp_path / "d" / "b.JPG"))
    with pytest.raises(FileNotFoundError, match="no such folder or list file"):
        input_paths(str(tmp_path / "nowhere"))


def test_metadata_csv_is_matched_by_image_id_and_warns_about_the_rest(tmp_path, caplog):
    table = tmp_path / "meta.csv"
    table.write_text("image_id,age,sex\nA,60,male\n")
    got = read_metadata_csv(str(table), ["/x/A.jpg", "/x/B.jpg"], ["age", "sex"])
    assert got == {"/x/A.jpg": {"age": "60", "sex": "male"}}
    assert "1 of 2 images are not in" in caplog.text
    with pytest.raises(ValueError, match=r"lacks \['site'\]"):
        read_metadata_csv(str(table), ["/x/A.jpg"], ["age", "site"])
    table.write_text("name,age\nA,60\n")
    with pytest.raises(ValueError, match="needs an image_id or a path column"):
        read_metadata_csv(str(table), ["/x/A.jpg"], ["age"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_metadata_csv(str(tmp_path / "none.csv"), [], ["age"])


def test_artefact_exclusions_read_an_audit_and_reuse_the_runs_own(tmp_path):
    audit = tmp_path / "mine.csv"
    audit.write_text("image_id,colour_disc,ink\nA,True,False\nB,false,TRUE\nC,False,False\n")
    assert artefact_exclusions("unused", str(tmp_path / "run"), str(audit)) == ({"A", "B"}, str(audit))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(audit, run / "audit.csv")
    # RUN/audit.csv exists, so the (absent) dataset is not audited again
    assert artefact_exclusions(str(tmp_path / "no-data"), str(run)) == ({"A", "B"}, str(run / "audit.csv"))
    with pytest.raises(FileNotFoundError, match="audit file not found"):
        artefact_exclusions("unused", str(run), str(tmp_path / "none.csv"))


@pytest.mark.slow
def test_cli_predict_writes_a_path_with_a_comma_that_csv_reads_back(trained_run, synthetic_data, tmp_path, capsys):
    src = next((synthetic_data / "images").glob("*.jpg"))
    odd = tmp_path / 'lesion, left "arm".jpg'
    shutil.copy(src, odd)
    out = tmp_path / "pred.csv"
    assert predict.main(["--run", str(trained_run), str(odd), str(src), "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(odd), str(src)]
    assert rows[0]["melanoma_proba"] == rows[1]["melanoma_proba"], "same pixels, same probability"
    capsys.readouterr()
    assert predict.main(["--run", str(trained_run), str(odd)]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    assert row["path"] == str(odd)


def test_predict_piped_into_head_stops_quietly(tmp_path):
    """`skinfusion predict ... | head -1`: no traceback and no error line when the reader goes away."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "legacy-0.1.0"
    image = fixture / "images" / "gen0.png"
    images = []
    for i in range(400):  # enough output to outlast the pipe buffer once head has gone
        images.append(tmp_path / f"img{i}.png")
        shutil.copy(image, images[-1])
    cmd = f"{sys.executable} -m skinfusion predict --run {fixture / 'ensemble-mean'} --batch-size 400 " + " ".join(
        map(str, images)) + " | head -1"
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, timeout=300)
    assert out.stdout == ",".join(PREDICTION_COLUMNS) + "\n"
    assert "Traceback" not in out.stderr and "skinfusion: error" not in out.stderr and "Broken pipe" not in out.stderr, out.stderr
    assert out.returncode == 141, (out.returncode, out.stderr)
