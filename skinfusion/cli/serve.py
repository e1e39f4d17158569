"""Serve a run's ensemble over HTTP: a JSON API (predict, explain, model, health, metrics) and a web page.

``skinfusion serve --run RUN`` loads the bundle, warms it up and listens on 127.0.0.1:8000 by
default. The work is ``skinfusion.serve.serving``; this module is its flags. SIGTERM or
Ctrl-C stops accepting connections and lets the requests in flight finish before the process exits.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Sequence

from skinfusion.cli.common import EXIT_OK, add_quiet, batch_wait_ms, new_parser, port_number, positive_int, run_command

SETTINGS_ENV = "SKINFUSION_SERVE_SETTINGS"  # how --workers N passes the flags to its worker processes
KEY_ENV = "SKINFUSION_API_KEY"  # the key from the environment: unlike --api-key KEY, not shown by ps
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (serving_guard)
GRACEFUL_S = 30  # the longest SIGTERM waits for in-flight requests
WORKER_HEALTHCHECK_S = 120  # how long a --workers process may be too busy to answer uvicorn's ping
BACKLOG = 2048  # uvicorn's own default; the connections that may wait while the model loads


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of megabytes, got {text!r}") from None
    if not 0 < value <= 1024:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1024 MB, got {value:g}")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion serve`` parser."""
    p = new_parser("serve", __doc__, epilog="Endpoints: POST /v1/predict, POST /v1/explain (multipart field 'files'), "
                   "GET /v1/model, /healthz, /readyz, /metrics, /docs, and the page at /. Research software, "
                   "not a medical device.")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 listens on every network)")
    p.add_argument("--port", type=port_number(), default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this key on every endpoint except /healthz, /readyz, the page and the API docs, as "
                        "the header 'X-API-Key: KEY' or 'Authorization: Bearer KEY'. Prefer setting "
                        "$SKINFUSION_API_KEY (the default): a key on the command line is visible to every user in ps")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with its own copy of the model and its own batcher (default 1)")
    p.add_argument("--max-upload-mb", type=_megabytes, default=20.0,
                   help="largest request body accepted, in MB; larger uploads get 413 (default 20)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://example.org) to call the API; repeatable; "
                        "default: no cross-origin access")
    p.add_argument("--batch-wait-ms", type=batch_wait_ms, default=5.0,
                   help="how long a request waits for others to share its forward pass (default 5 ms)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most images per forward pass (default 32)")
    p.add_argument("--max-queue", type=positive_int, default=128,
                   help="most images waiting for the model; requests beyond it get 503 with Retry-After at once, "
                        "instead of queueing without bound (default 128)")
    add_quiet(p)
    return p


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now and keep it: the socket uvicorn then listens on.

    A port another process holds is refused before minutes of loading, not after; and because the
    socket listens from here on, no other process can take the port during the loading (CI once lost
    a port that way when it was only checked here and bound again by uvicorn after the warm-up). It must
    listen, not only be bound: Linux lets a second SO_REUSEADDR socket bind a port nobody listens on.
    A client that connects during the loading waits in the backlog until the server answers (as with
    gunicorn, which also listens before its workers load the app); ``/readyz`` says when it is ready.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
    sock.set_inheritable(True)  # --workers: uvicorn hands it to each worker process
    return sock


def _settings(args: argparse.Namespace):
    from skinfusion.serve.serving import ServeSettings

    return ServeSettings(api_key=args.api_key or os.environ.get(KEY_ENV) or None,
                         max_upload_mb=args.max_upload_mb, cors_origins=tuple(args.cors_origin),
                         batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch, max_queue=args.max_queue)


def app_from_env():
    """The app of one ``--workers`` process, built from the settings the parent put in ``$SKINFUSION_SERVE_SETTINGS``."""
    from ensemble import load
    from skinfusion.serve.serving import ServeSettings, create_app
    from skinfusion.serve.serving_io import model_id

    conf = json.loads(os.environ[SETTINGS_ENV])
    settings = ServeSettings(**{**conf["settings"], "cors_origins": tuple(conf["settings"]["cors_origins"])})
    return create_app(load(conf["run"]), model_id(conf["run"]), settings)


def _serve(args: argparse.Namespace) -> int:
    sock = _reserve_port(args.host, args.port)
    try:
        return _serve_on(args, sock)
    finally:
        sock.close()


def _serve_on(args: argparse.Namespace, sock: socket.socket) -> int:
    import dataclasses

    from ensemble import load
    from skinfusion.serve.serving import create_app
    from skinfusion.serve.serving_io import model_id

    settings = _settings(args)
    ens = load(args.run)  # a missing or damaged run stops here, with one error line
    mid = model_id(args.run)
    local = _is_loopback(args.host)
    m = ens.manifest
    method = m.get("method") or (m.get("source") or {}).get("method", "?")  # an export names its run's method
    kind = f"{m['format']} export" if "format" in m and "source" in m else "Keras bundle"
    print(f"skinfusion: serving {args.run} ({kind}, model {mid[:12]}, {'+'.join(ens.views)}, {method}) on "
          f"http://{args.host}:{args.port}/  API key: {'required' if settings.api_key else 'none'}", file=sys.stderr)
    if not local and not settings.api_key:
        print(f"skinfusion: warning: listening on {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)
    options = dict(host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                   timeout_graceful_shutdown=GRACEFUL_S, server_header=False, proxy_headers=False)
    if args.workers == 1:
        stopped_by = _run_uvicorn(create_app(ens, mid, settings), 1, options, sock)
    else:
        metrics_dir = tempfile.mkdtemp(prefix="skinfusion-metrics-")
        # A fresh folder per start: the workers' counters are summed from its files, and a
        # previous run's files would add old counts (or another server's) to this one's.
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[SETTINGS_ENV] = json.dumps({"run": os.path.abspath(args.run),
                                               "settings": dataclasses.asdict(settings)})
        try:
            stopped_by = _run_uvicorn("skinfusion.cli.serve:app_from_env", args.workers, options, sock)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt  # the house rule: Ctrl-C exits 130, after the drain (run_command says so)
    print("skinfusion: server stopped", file=sys.stderr)
    return EXIT_OK


def _run_uvicorn(app, workers: int, options: dict, sock: socket.socket) -> int | None:
    """Serve until SIGTERM or SIGINT has drained the requests in flight; returns that signal (None if none).

    ``uvicorn.run`` would swallow Ctrl-C's KeyboardInterrupt and return as after SIGTERM; this is
    uvicorn.run's own sequence (Server, or a Multiprocess supervisor over one bound socket) with
    the stopping signal kept, so that Ctrl-C can exit 130 while SIGTERM (a service manager's stop) exits 0.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    stopped: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    if workers > 1 and "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        # uvicorn kills a worker that misses a 5-s health ping; importing TensorFlow and loading the
        # model can hold the interpreter longer than that on a busy machine, and the killed worker's
        # replacement meets the same fate, for ever.
        options = {**options, "timeout_worker_healthcheck": WORKER_HEALTHCHECK_S}
    config = uvicorn.Config(app, factory=workers > 1, workers=workers, **options)
    server = uvicorn.Server(config)
    # One worker: uvicorn re-raises the signal that stopped it once it has drained, to these handlers.
    previous = {sig: signal.signal(sig, lambda sig, _frame: stopped.append(sig)) for sig in handled}
    try:
        if workers == 1:
            server.run(sockets=[sock])
        else:
            given = {"sockets": [sock]}
            if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.36 took the worker's target
                given["target"] = server.run
            supervisor = Multiprocess(config, **given)
            for sig, name in ((signal.SIGINT, "handle_int"), (signal.SIGTERM, "handle_term")):
                original = getattr(supervisor, name)
                setattr(supervisor, name, lambda sig=sig, original=original: (stopped.append(sig), original()))
            supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if workers == 1 and not server.started:
        raise ValueError(f"--host {options['host']} --port {options['port']}: the server did not start (see above)")
    return stopped[0] if stopped else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion serve``: run the HTTP service until SIGTERM or Ctrl-C.

    Returns:
        0 after a clean stop, 2 on a reported error (bad run, port in use), 130 after Ctrl-C.
    """
    return run_command(parser(), _serve, argv,
                       interrupted_hint="server stopped; requests in flight were allowed to finish")
