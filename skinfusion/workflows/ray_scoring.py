"""``skinfusion predict --engine ray``: score many image files on a Ray cluster with Ray Data.

The local engine (``Ensemble.iter_files``) decodes and scores batches on one machine. This one
hands the same work to Ray Data: the paths become a dataset, ``map_batches`` runs them through a
pool of actors that each load the bundle once, decode their batch and score it with the same
calls (``read_image``, ``resize_image``, ``image_checks``, ``Ensemble.score_details``), and the
driver streams the results back in input order. ``RayEngine.iter_files`` yields the local
engine's ``FileBatch`` objects, so ``write_predictions`` / ``predict_to_csv`` /
``predict_to_parquet`` write the same columns, the same skip report and the same exit codes.

Paths may be local (every node must see them, and the run, at the same path: a shared file
system) or URIs such as ``s3://bucket/key.jpg``, read by the actors through ``pyarrow.fs``, the
file-system layer Ray Data's own readers use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the actors import TensorFlow after this module

INSTALL_HINT = "pip install 'skinfusion[ray]'"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Ray Data keeps a few blocks in flight per actor: enough blocks to spread over a cluster, not so
# many that a million-image archive pays a scheduling round-trip per 64 images.
MAX_BLOCKS = 2000


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (s3, gs, hdfs, file, ...), False for a local path."""
    return bool(_URI.match(str(path)))


def require_ray():
    """Import and return ``ray``, or raise ``ValueError`` naming the install command.

    Raises:
        ValueError: if Ray (with Ray Data) is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks its dependencies)
    except ImportError as exc:
        raise ValueError(f"--engine ray needs Ray Data, which is not installed ({exc}); install it with "
                         f"{INSTALL_HINT}, or use --engine local") from None
    return ray


# Object stores name a file bucket/key inside their filesystem; the others by the URI's path alone.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def _filesystem(uri: str, cache: dict) -> tuple:
    """``(pyarrow filesystem, path within it)`` for a URI, one filesystem per scheme and host.

    Building an S3 filesystem can cost a network round trip (region lookup): it is done once.
    """
    from pyarrow import fs

    parts = urlsplit(uri)
    key = f"{parts.scheme}://{parts.netloc}"
    if key not in cache:
        cache[key] = fs.FileSystem.from_uri(uri)[0]
    return cache[key], (parts.netloc + parts.path if parts.scheme in _BUCKET_SCHEMES else parts.path)


def _uri(spec: str, path: str) -> str:
    """The URI of ``path`` (as ``_filesystem`` gives it) on the filesystem of ``spec``."""
    parts = urlsplit(spec)
    return f"{parts.scheme}://{path}" if parts.scheme in _BUCKET_SCHEMES else f"{parts.scheme}://{parts.netloc}{path}"


def remote_input_paths(spec: str) -> list[str]:
    """``input_paths`` for a URI: a folder (recursive, sorted) or a list file, read through ``pyarrow.fs``.

    Relative lines of a list file are relative to its folder; lines that are URIs or absolute
    paths are kept as they are.

    Raises:
        FileNotFoundError: if ``spec`` names nothing.
        ValueError: if its scheme is not one pyarrow can open, or it names an image.
    """
    from pyarrow import fs

    from colorspaces.image import IMAGE_SUFFIXES

    try:
        filesystem, path = _filesystem(spec, {})
        info = filesystem.get_file_info(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError depending on the scheme
        raise ValueError(f"--input {spec}: cannot open it with pyarrow.fs ({exc}); pyarrow reads s3://, gs://, "
                         "hdfs:// and file:// URIs; copy the files to a shared folder otherwise") from None
    if info.type == fs.FileType.Directory:
        found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
        return sorted(_uri(spec, f.path) for f in found
                      if f.type == fs.FileType.File and posixpath.splitext(f.path)[1].lower() in IMAGE_SUFFIXES)
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"--input {spec}: no such folder or list file")
    if posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        raise ValueError(f"--input {spec} is an image; give it as a positional argument, or give a folder "
                         "or a list file")
    with filesystem.open_input_stream(path) as fh:
        lines = [ln.strip() for ln in fh.read().decode("utf-8").splitlines()]
    parent = spec.rsplit("/", 1)[0]
    return [ln if is_uri(ln) or ln.startswith("/") else f"{parent}/{ln}"
            for ln in lines if ln and not ln.startswith("#")]


class _Scorer:
    """The Ray Data actor: loads the bundle once, then decodes and scores one batch of paths per call."""

    def __init__(self, run: str, tta: bool, threads: int):
        from ensemble import load

        try:
            self.ens = load(run)
        except (FileNotFoundError, ValueError) as exc:
            # Raised on a worker: say where, since the driver could load the same run.
            raise ValueError(f"on Ray worker {os.uname().nodename}: {exc} (every node must see --run at the "
                             "same path, e.g. on a shared file system)") from None
        self.tta = tta
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self.filesystems: dict = {}

    def _load(self, path: str):
        """``(image at load_size, image-level reasons, None)`` or ``(None, (), reason)``, as ``Ensemble._load_file``."""
        from colorspaces import ImageError
        from colorspaces.pipeline import prepare_image

        local = path
        try:
            if is_uri(path):
                local = self._fetch(path)
            return *prepare_image(local, self.ens.preprocess), None
        except ImageError as exc:
            return None, (), str(exc).replace(local, path)
        finally:
            if local != path:
                os.unlink(local)

    def _fetch(self, uri: str) -> str:
        """Copy a URI's bytes to a temporary file, so it is decoded by the very reader a local file is."""
        from colorspaces import ImageError, MissingImageError

        try:
            filesystem, path = _filesystem(uri, self.filesystems)
            with filesystem.open_input_stream(path) as fh:
                data = fh.read()
        except FileNotFoundError:
            raise MissingImageError(f"{uri}: no such image file") from None
        except Exception as exc:  # network, permissions, unknown scheme: this file is skipped, the rest go on
            raise ImageError(f"{uri}: cannot read it ({type(exc).__name__}: {exc})") from None
        fd, tmp = tempfile.mkstemp(suffix=posixpath.splitext(uri)[1])
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return tmp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        loaded = list(self.pool.map(self._load, paths))
        ok = [j for j, (_, _, err) in enumerate(loaded) if err is None]
        ens, n = self.ens, len(paths)
        imgs = (np.stack([loaded[j][0] for j in ok]) if ok
                else ens.preprocess.empty_batch())
        meta = [json.loads(batch["meta"][j]) for j in ok] if ens.metadata_fields else None
        s = ens.score_details(imgs, self.tta, meta, [loaded[j][1] for j in ok])
        out = {name: np.full(n, np.nan) for name in ("fused", "distance", "score", "flag")}
        out["P"] = np.full((n, len(ens.views)), np.nan)
        reasons = [""] * n
        for k, j in enumerate(ok):
            out["P"][j], out["fused"][j] = s.P[k], s.fused[k]
            out["distance"][j], out["score"][j] = s.ood.distance[k], s.ood.in_distribution_score[k]
            out["flag"][j], reasons[j] = s.ood.out_of_distribution[k], ";".join(s.ood.reasons[k])
        out.update(i=batch["i"], path=batch["path"], reasons=np.array(reasons, dtype=object),
                   error=np.array([err or "" for _, _, err in loaded], dtype=object))
        return out


class RayEngine:
    """An ``Ensemble`` stand-in whose ``iter_files`` scores on a Ray cluster (use it as a context manager).

    Args:
        ens: the ensemble loaded on the driver (its bundle already checked; gives the OOD note).
        run: the run directory every actor loads.
        address: a Ray cluster (``HOST:PORT``, ``auto``, ``ray://...``); None: ``$RAY_ADDRESS`` if
            set, else a Ray instance started on this machine for the duration.
        num_workers: actors, one CPU each; None: one per CPU of the cluster.

    A Ray already initialised in this process (``ray.init``) is used as it is, whatever ``address`` says.
    """

    def __init__(self, ens, run: str | os.PathLike, address: str | None = None, num_workers: int | None = None):
        self.ens, self.run, self.address, self.num_workers = ens, str(Path(run).resolve()), address, num_workers
        self._ray, self._started, self._local = require_ray(), False, False

    @property
    def ood_note(self) -> str | None:
        """The driver's bundle's note (why it has no OOD gate), as ``write_predictions`` reports it."""
        return getattr(self.ens, "ood_note", None)

    def __enter__(self) -> RayEngine:
        ray = self._ray
        if not ray.is_initialized():
            where = f"--address {self.address}" if self.address else "a local Ray instance"
            self._local = not (self.address or os.environ.get("RAY_ADDRESS"))
            kwargs = {"include_dashboard": False} if self._local else {}
            if self._local:
                _quiet_token_notice()
            if self.address:
                _check_reachable(self.address, "--address")
            elif os.environ.get("RAY_ADDRESS"):
                _check_reachable(os.environ["RAY_ADDRESS"], "$RAY_ADDRESS")
            try:
                # Workers' own output stays in Ray's session logs: on the driver it would interleave
                # with the CSV on stdout. Their errors still reach the driver, as exceptions.
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ValueError(f"cannot connect to {where}: {exc}; start one with `ray start --head` and pass "
                                 "its address (HOST:6379); if the cluster uses token authentication, set "
                                 "RAY_AUTH_MODE=token here and give this machine its token (`ray get-auth-token` "
                                 "on the head, then RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus == 0:
            # Each scoring actor takes one CPU: Ray Data would wait forever for a node to offer one.
            self.__exit__()
            raise ValueError(f"--engine ray: the Ray cluster{' at ' + self.address if self.address else ''} has no "
                             "CPUs; start worker nodes with `ray start --address HEAD:PORT`, or give the head CPUs")
        if self.num_workers is None:
            self.num_workers = max(1, cpus)
        elif self.num_workers > cpus:
            self.__exit__()  # __exit__ does not run when __enter__ raises
            raise ValueError(f"--num-workers {self.num_workers}: the Ray cluster has {cpus} CPUs and each worker "
                             f"takes one; give at most {cpus}, or add nodes")
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()

    def iter_files(self, paths: Sequence[str], batch_size: int = 64, workers: int = 2, tta: bool = False,
                   metadata: dict[str, dict] | None = None) -> Iterator:
        """Score ``paths`` on the cluster; yields ``FileBatch`` objects in input order, as ``Ensemble.iter_files``.

        Args:
            paths: local paths (seen by every node) or URIs, scored in this order.
            batch_size: images per actor call (one forward pass).
            workers: decoding threads inside each actor.
            tta, metadata: as for ``Ensemble.iter_files``.
        """
        import ray.data

        # From ensemble.details, not ensemble.engine: the driver of an export's scoring stays TensorFlow-free.
        from ensemble.details import FileBatch
        from ensemble.ood import OODScores

        if not paths:
            return
        fused_meta = bool(self.ens.metadata_fields)
        items = [{"i": i, "path": str(p), "meta": json.dumps((metadata or {}).get(p)) if fused_meta else ""}
                 for i, p in enumerate(paths)]
        _quiet_ray_data()
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        # Rows must come back in input order (the CSV's order), and our own progress line replaces Ray's bars.
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
        try:
            blocks = min(MAX_BLOCKS, math.ceil(len(items) / batch_size))
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            # No more actors than blocks: each would load the bundle and then have nothing to score.
            # On the instance started for this run (one machine) a scoring actor that dies crashed
            # there and would crash again: no restarts, which also spares the user Ray Data's
            # error-level line about restarting actors whose arguments sit in the object store
            # (ray-project/ray#57733, printed on every run). A cluster keeps Ray's restarts.
            restarts = {"max_restarts": 0} if self._local else {}
            ds = ds.map_batches(_Scorer, fn_constructor_kwargs={"run": self.run, "tta": tta, "threads": workers},
                                batch_size=batch_size, batch_format="numpy", num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(size=min(self.num_workers, blocks)), **restarts)
            expected = 0
            for out in _reraise_worker_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
                index = np.asarray(out["i"])
                if not np.array_equal(index, np.arange(expected, expected + len(index))):
                    raise RuntimeError(f"Ray Data returned rows {index[:3]}... after row {expected - 1}: out of order")
                expected += len(index)
                good = np.array([not e for e in out["error"]], bool)
                rows = np.flatnonzero(good)
                ood = OODScores(np.asarray(out["distance"])[rows], np.asarray(out["score"])[rows],
                                np.asarray(out["flag"])[rows],
                                [tuple(r.split(";")) if r else () for r in np.asarray(out["reasons"])[rows]])
                yield FileBatch([str(p) for p in np.asarray(out["path"])[rows]], np.asarray(out["P"])[rows],
                                np.asarray(out["fused"])[rows],
                                [(str(p), str(e)) for p, e, g in zip(out["path"], out["error"], good) if not g], ood)
            if expected != len(items):
                raise RuntimeError(f"Ray Data returned {expected} rows for {len(items)} paths")
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# How long a cluster's GCS may take to complete a gRPC handshake: a few round trips, even across a WAN.
GCS_PROBE_TIMEOUT_S = 10.0


def _check_reachable(address: str | None, source: str = "--address") -> None:
    """Refuse a ``HOST:PORT`` where no Ray cluster answers, in seconds: Ray itself retries for minutes.

    Two checks, both bounded: a TCP connection (something listens), then a gRPC handshake
    (what listens speaks gRPC, as a Ray head's GCS does). Without the second, ``ray.init`` on
    a port held by, say, a web server retries for minutes, logging ``Failed to connect to GCS``
    under another address (Ray rewrites a loopback host to the machine's own IP). The handshake
    is skipped when ``RAY_USE_TLS`` is on: a plain channel cannot judge a TLS server.

    Raises:
        ValueError: naming ``source`` (``--address`` or ``$RAY_ADDRESS``) and what to do.
    """
    import socket

    host, _, port = (address or "").rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return  # no address, "auto", or ray://: Ray resolves those
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ValueError(f"{source} {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                         f"with `ray start --head --port={port}` on {host}, or check the address") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        import grpc  # a dependency of Ray
    except ImportError:
        return
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=GCS_PROBE_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise ValueError(f"{source} {address}: something listens there but it is not a Ray cluster (no gRPC "
                         f"answer in {GCS_PROBE_TIMEOUT_S:g} s); give the head's GCS address, HOST:6379 by "
                         "default (not the dashboard's 8265), as `ray start --head` printed it") from None
    finally:
        channel.close()


class _DropTokenNotice(logging.Filter):
    """Drops Ray's notice that it enabled token authentication, its default for a new local instance."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_notice() -> None:
    """Keep Ray's every-run warning that a local instance uses token authentication (its default) off stderr.

    Only that notice goes: Ray's other authentication warnings and errors (token missing or
    wrong, authentication disabled) still reach the user. Setting ``RAY_AUTH_MODE`` would
    also silence it, but changes how the instance looks for its token.
    """
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in log.filters):
        log.addFilter(_DropTokenNotice())


def _quiet_ray_data() -> None:
    """Keep Ray Data's INFO lines (execution plans, its own progress) in its log file, off the terminal.

    ``skinfusion predict`` shows its own progress line. Ray Data's warnings still reach stderr.
    """
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    # Ray Data warns once per process that its bars are off; they are off on purpose. Marking the
    # warning as given (log_once's key) silences it; if the key changes, the line merely reappears.
    log_once("ray_data_progress_manager_disabled")


def _reraise_worker_errors(batches: Iterator) -> Iterator:
    """Pass ``batches`` through; a user's error raised in an actor (a run it cannot load) comes out as a ValueError.

    Ray wraps an exception raised in a task in ``RayTaskError`` (its ``cause`` is the original);
    one raised in an actor's ``__init__`` becomes ``ActorDiedError``, which keeps only its text,
    so there ``_Scorer``'s own marker, ``ValueError: on Ray worker``, is looked for. A user's error
    gets the CLI's one-line report; anything else is re-raised untouched, with Ray's traceback.
    """
    from ray.exceptions import RayError

    try:
        yield from batches
    except RayError as exc:
        cause = exc
        while isinstance(cause, RayError) and getattr(cause, "cause", None) is not None:
            cause = cause.cause
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise ValueError(str(cause.args[0] if cause.args else cause)) from None
        found = re.findall(r"^ValueError: (on Ray worker .*)$", str(exc), re.M)
        if getattr(exc, "actor_init_failed", False) and found:
            raise ValueError(found[-1]) from None
        raise
