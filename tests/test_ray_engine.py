"""``skinfusion predict --engine ray`` (skinfusion.workflows.ray_scoring) against the local engine.

Runs are the committed 16-px 0.1.0 mean bundle (tests/fixtures/legacy-0.1.0) with an
out-of-distribution gate fitted here on generated images, so the OOD columns are compared too and
nothing is trained. One in-process Ray instance (2 CPUs, no dashboard) serves the module; one test
starts its own ``ray start --head`` on loopback and stops it. Ray's files go to a short temporary
folder (its socket paths must stay under the Unix limit), removed at the end.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from skinfusion.cli import predict
from skinfusion.workflows.predicting import PREDICTION_COLUMNS, input_paths

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0"


# ------------------------------------------------------------------------------ fixtures
def _lesion(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin-coloured noise with a dark disc (RGB uint8)."""
    img = np.clip(np.array([200, 150, 130]) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    r = int(rng.integers(size // 8, size // 3))
    c = (int(rng.integers(r, size - r)), int(rng.integers(r, size - r)))
    cv2.circle(img, c, r, tuple(int(v) for v in rng.integers(20, 90, 3)), -1)
    return img


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The fixture's mean bundle in RUN/ensemble, re-signed with an OOD gate fitted on 40 generated lesions."""
    from ensemble.bundle import load_ensemble, sha256_file
    from ensemble.ood import OOD_FILE, embedding_layer, fit_gate

    run = tmp_path_factory.mktemp("ray-run")
    shutil.copytree(FIXTURE / "branches", run / "branches")
    shutil.copytree(FIXTURE / "ensemble-mean", run / "ensemble")
    ens = load_ensemble(run)
    rng = np.random.default_rng(1)
    emb = ens.embed(np.stack([cv2.resize(_lesion(rng, 64), (16, 16), interpolation=cv2.INTER_AREA)
                              for _ in range(40)]))
    gate = fit_gate([e[:20] for e in emb], [e[20:] for e in emb], percentile=80, layer=embedding_layer(ens.models[0]))
    manifest_path = run / "ensemble" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ood"] = gate.manifest_entry(sha256_file(gate.save(run / "ensemble" / OOD_FILE)))
    manifest_path.write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 readable images (sizes 12-200 px, some too small, one grey) and 3 that cannot be read."""
    folder = tmp_path_factory.mktemp("ray-images")
    rng = np.random.default_rng(7)
    for i in range(22):
        img = _lesion(rng, int(rng.choice([12, 48, 96, 200])))
        cv2.imwrite(str(folder / f"img{i:02d}.{'png' if i % 3 else 'jpg'}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "grey.png"), np.full((64, 64, 3), 128, np.uint8))
    shutil.copy(FIXTURE / "images" / "gen0.png", folder / "gen0.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    return folder


@pytest.fixture(scope="module")
def ray_temp():
    """A short folder for Ray's session files (socket paths have a 107-byte limit), removed at the end."""
    path = tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(ray_temp):
    """One in-process Ray instance with 2 CPUs for the module; ``RayEngine`` reuses it and leaves it running."""
    ray = pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    # A local instance needs no token; left unset, Ray would write one into ~/.ray for it.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def _predict(capsys, *args: str) -> tuple[int, str]:
    rc = predict.main(["-q", *args])
    return rc, capsys.readouterr().err


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_predictions(local: Path, ray: Path, same_path=lambda a, b: a == b) -> None:
    """The two engines' CSVs and skip reports agree: paths, order, columns, OOD cells, probabilities to 1e-6."""
    a, b = _csv(local), _csv(ray)
    assert tuple(a[0]) == tuple(b[0]) == PREDICTION_COLUMNS
    assert len(a) == len(b) and all(same_path(x["path"], y["path"]) for x, y in zip(a, b))
    for x, y in zip(a, b):
        assert abs(float(x["melanoma_proba"]) - float(y["melanoma_proba"])) <= 1e-6
        assert [x[k] for k in ("in_distribution_score", "out_of_distribution", "ood_reason")] == \
            [y[k] for k in ("in_distribution_score", "out_of_distribution", "ood_reason")]
    skip_a, skip_b = _csv(Path(f"{local}.skipped.csv")), _csv(Path(f"{ray}.skipped.csv"))
    assert len(skip_a) == len(skip_b) == 3
    assert all(same_path(x["path"], y["path"]) and same_path(x["reason"], y["reason"]) for x, y in zip(skip_a, skip_b))


# ------------------------------------------------------------------------------ in-process Ray
def test_ray_engine_scores_like_the_local_engine_with_unreadable_files(run, images, ray_local, tmp_path, capsys):
    rc_local, _ = _predict(capsys, "--run", str(run), "--input", str(images), "--out", str(tmp_path / "local.csv"),
                           "--batch-size", "4")
    # Batches of 4 over 27 files: 7 blocks over 2 actors, so the order is Ray Data's to keep.
    rc_ray, err = _predict(capsys, "--run", str(run), "--input", str(images), "--out", str(tmp_path / "ray.csv"),
                           "--batch-size", "4", "--engine", "ray", "--num-workers", "2")
    assert rc_local == rc_ray == 1, err
    assert "Traceback" not in err and "3 skipped" in err
    _same_predictions(tmp_path / "local.csv", tmp_path / "ray.csv")
    rows = _csv(tmp_path / "ray.csv")
    assert tuple(rows[0]) == PREDICTION_COLUMNS
    assert {r["out_of_distribution"] for r in rows} == {"0", "1"}, "the gate and the image checks both ran"
    assert any("too_small" in r["ood_reason"] for r in rows) and any("not_colour" in r["ood_reason"] for r in rows)

    # Parquet keeps full precision: there the engines agree to 1e-6 before any rounding.
    for engine in ("local", "ray"):
        assert _predict(capsys, "--run", str(run), "--input", str(images), "--out", str(tmp_path / f"{engine}.parquet"),
                        "--batch-size", "5", "--engine", engine)[0] == 1
    import pandas as pd

    pa, pb = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "ray.parquet")
    assert list(pa.columns) == list(pb.columns) == list(PREDICTION_COLUMNS)
    assert list(pa["path"]) == list(pb["path"]) == [r["path"] for r in rows]
    np.testing.assert_allclose(pb["melanoma_proba"], pa["melanoma_proba"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pb["in_distribution_score"], pa["in_distribution_score"], rtol=0, atol=1e-6)
    assert list(pa["out_of_distribution"]) == list(pb["out_of_distribution"])
    assert (tmp_path / "ray.parquet.skipped.csv").read_text() == (tmp_path / "local.parquet.skipped.csv").read_text()


def test_ray_engine_passes_each_image_its_metadata(images, ray_local, tmp_path, capsys):
    """The 0.1.0 stacking bundle fused with age and sex: each row's metadata travels with its path."""
    table = tmp_path / "meta.csv"
    table.write_text("image_id,age,sex\n" + "".join(f"img{i:02d},{20 + 3 * i},{('male', 'female')[i % 2]}\n"
                                                     for i in range(0, 22, 2)))
    common = ["--run", str(FIXTURE / "ensemble-stackmeta"), "--input", str(images), "--metadata", str(table),
              "--batch-size", "4"]
    assert _predict(capsys, *common, "--out", str(tmp_path / "local.csv"))[0] == 1
    assert _predict(capsys, *common, "--out", str(tmp_path / "ray.csv"), "--engine", "ray")[0] == 1
    a, b = _csv(tmp_path / "local.csv"), _csv(tmp_path / "ray.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert max(abs(float(x["melanoma_proba"]) - float(y["melanoma_proba"])) for x, y in zip(a, b)) <= 1e-6
    assert len({r["melanoma_proba"] for r in b}) > len(b) // 2, "the metadata moved the probabilities"


def test_ray_engine_reads_uris_and_uri_lists_through_pyarrow(run, images, ray_local, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    names = sorted(p.name for p in images.iterdir())
    listing.write_text("".join(f"{images.as_uri()}/{n}\n" for n in names) + f"{images.as_uri()}/missing.jpg\n")
    local_list = tmp_path / "local-list.txt"
    local_list.write_text("".join(f"{images / n}\n" for n in names) + f"{images / 'missing.jpg'}\n")
    assert _predict(capsys, "--run", str(run), "--input", str(local_list), "--out", str(tmp_path / "local.csv"))[0] == 1
    rc, err = _predict(capsys, "--run", str(run), "--input", listing.as_uri(), "--out", str(tmp_path / "ray.csv"),
                       "--engine", "ray")
    assert rc == 1, err

    def same(local: str, uri: str) -> bool:  # a path, or a reason naming it, as the file:// URI names it
        return local.replace(str(images), images.as_uri()) == uri

    a, b = _csv(tmp_path / "local.csv"), _csv(tmp_path / "ray.csv")
    assert len(a) == len(b) == 24 and all(same(x["path"], y["path"]) for x, y in zip(a, b))
    assert max(abs(float(x["melanoma_proba"]) - float(y["melanoma_proba"])) for x, y in zip(a, b)) <= 1e-6
    skipped = _csv(tmp_path / "ray.csv.skipped.csv")
    assert [r["path"].rsplit("/", 1)[1] for r in skipped] == ["corrupt.jpg", "empty.png", "text.png", "missing.jpg"]
    assert skipped[-1]["reason"].endswith("missing.jpg: no such image file")
    assert "/tmp/tmp" not in "".join(r["reason"] for r in skipped), "reasons name the URI, not the temporary copy"

    # A folder URI is listed recursively and sorted, as a local folder is.
    from skinfusion.workflows.ray_scoring import remote_input_paths

    assert remote_input_paths(images.as_uri()) == [Path(p).as_uri() for p in input_paths(str(images))]


def test_ray_engine_refusals_are_one_line(run, images, ray_local, tmp_path, capsys):
    from ensemble import load
    from skinfusion.workflows.ray_scoring import RayEngine

    rc, err = _predict(capsys, "--run", str(run), str(images / "img01.png"), "--engine", "ray", "--num-workers", "3")
    assert rc == 2 and "--num-workers 3: the Ray cluster has 2 CPUs" in err and "Traceback" not in err
    # A worker that cannot load the run (not on a shared file system) is the user's to fix: a ValueError.
    with RayEngine(load(run), tmp_path / "not-on-the-workers", num_workers=1) as engine:
        with pytest.raises(ValueError, match="on Ray worker .*no such run directory.*same path"):
            list(engine.iter_files([str(images / "img01.png")]))


# ------------------------------------------------------------------------------ no Ray needed
def test_engine_ray_without_ray_installed_exits_2_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    rc, err = _predict(capsys, "--run", str(tmp_path / "no-run"), "x.jpg", "--engine", "ray")
    assert rc == 2 and "pip install 'skinfusion[ray]'" in err and "Traceback" not in err


def test_ray_only_flags_and_uris_are_refused_by_the_local_engine(tmp_path, capsys):
    no_run = str(tmp_path / "no-run")
    rc, err = _predict(capsys, "--run", no_run, "x.jpg", "--num-workers", "2")
    assert rc == 2 and "--num-workers applies to --engine ray only" in err
    rc, err = _predict(capsys, "--run", no_run, "x.jpg", "--address", "127.0.0.1:6379")
    assert rc == 2 and "--address applies to --engine ray only" in err
    rc, err = _predict(capsys, "--run", no_run, "s3://bucket/x.jpg")
    assert rc == 2 and "s3://bucket/x.jpg: a URI" in err and "--engine ray" in err
    rc, err = _predict(capsys, "--run", no_run, "--input", "s3://bucket/folder")
    assert rc == 2 and "--input s3://bucket/folder: a URI" in err


# ------------------------------------------------------------------------------ a real `ray start --head`
def _free_port() -> int:
    from skinfusion.bench.loadgen import free_port

    return free_port()


def test_an_address_where_nothing_listens_is_refused_at_once():
    from skinfusion.workflows.ray_scoring import _check_reachable

    with pytest.raises(ValueError, match=r"--address 127\.0\.0\.1:\d+: no Ray cluster answers there"):
        _check_reachable(f"127.0.0.1:{_free_port()}")
    _check_reachable("auto")  # left to Ray


def test_cli_on_a_ray_head_started_on_loopback(run, images, tmp_path, capsys):
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    port, temp = _free_port(), tempfile.mkdtemp(prefix="sf-rayh-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Token authentication with a token of the test's own, in the environment of the head and of
    # the client alike, as on a real cluster (Ray >= 2.5x; older Ray ignores both variables).
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    # --block keeps `ray start` in the foreground: terminating it stops exactly the processes it
    # started (`ray stop` would stop every Ray process of this user, the module's own instance too).
    # The head's output goes to a file, not a pipe nobody reads (a full pipe would block it).
    head_log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115  (closed in finally)
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=head_log, text=True)
    try:
        # Wait for the head's port before the client tries it: on a busy 2-core machine the head
        # can take tens of seconds, and the client's reachability check refuses at once.
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert head.poll() is None, f"the Ray head exited: {Path(head_log.name).read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the Ray head did not open its port within 120 s"
                time.sleep(0.5)
        assert _predict(capsys, "--run", str(run), "--input", str(images), "--out", str(tmp_path / "local.csv"))[0] == 1
        cmd = [sys.executable, "-m", "skinfusion", "predict", "--run", str(run), "--input", str(images),
               "--out", str(tmp_path / "ray.csv"), "--engine", "ray", "--address", f"127.0.0.1:{port}",
               "--num-workers", "2", "--batch-size", "8"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert head.poll() is None, f"the Ray head exited: {Path(head_log.name).read_text()[-2000:]}"
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "scored 24 images" in done.stderr
        _same_predictions(tmp_path / "local.csv", tmp_path / "ray.csv")
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        head_log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_from_the_environment_is_checked_before_ray_waits_for_it(run, images, tmp_path):
    # $RAY_ADDRESS is --address's default: a dead one must fail at once, naming the variable,
    # not leave Ray retrying for minutes.
    pytest.importorskip("ray")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-m", "skinfusion", "predict", "--run", str(run), "--input", str(images),
                           "--out", str(tmp_path / "p.csv"), "--engine", "ray"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"$RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster answers there" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_address_where_a_web_server_listens_is_refused_in_seconds(run, images, tmp_path):
    # issue 26: a plain HTTP server at --address passed the TCP check, then ray.init retried for 400 s,
    # logging "Failed to connect to GCS" under another address (Ray rewrites loopback to the node IP).
    pytest.importorskip("ray")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not open its port"
                time.sleep(0.2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Without the gRPC probe this runs for minutes: the timeout fails the test instead of waiting.
        done = subprocess.run([sys.executable, "-m", "skinfusion", "predict", "--run", str(run), "--input",
                               str(images), "--out", str(tmp_path / "p.csv"), "--engine", "ray", "--address",
                               f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=90)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 2, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if "error" in ln.lower() or "GCS" in ln]
    assert len(errors) == 1 and f"--address 127.0.0.1:{port}" in errors[0] and "not a Ray cluster" in errors[0], errors
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "p.csv").exists()


def test_a_local_ray_run_prints_no_token_warning_or_actor_restart_error(run, images, tmp_path):
    # issue 26: every run printed Ray's token-authentication warning and an error-level core_worker line
    # about restarting actors; neither is the user's business on the instance started for the run.
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run([sys.executable, "-m", "skinfusion", "predict", "--run", str(run), "--input", str(images),
                           "--out", str(tmp_path / "p.csv"), "--engine", "ray", "--num-workers", "1"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 1, done.stderr  # the three unreadable files
    assert "Token authentication" not in done.stderr and "core_worker.cc" not in done.stderr, done.stderr
    assert "scored 24 images" in done.stderr and "Traceback" not in done.stderr
