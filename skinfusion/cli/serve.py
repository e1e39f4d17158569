"""Serve a run's ensemble over HTTP: a JSON API (predict, explain, model, health, metrics) and a web page.

``skinfusion serve --run RUN`` loads the bundle, warms it up and listens on 127.0.0.1:8000 by
default. The work is ``skinfusion.serve.serving``; this module is its flags. SIGTERM or
Ctrl-C stops accepting connections and lets the requests in flight finish before the process exits.
"""

from __future__ import annotations

import argparse
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
from skinfusion.serve.listener import GRACEFUL_S, reserve_port, run_uvicorn

SETTINGS_ENV = "SKINFUSION_SERVE_SETTINGS"  # how --workers N passes the flags to its worker processes
KEY_ENV = "SKINFUSION_API_KEY"  # the key from the environment: unlike --api-key KEY, not shown by ps
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (serving_guard)


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
    sock = reserve_port(args.host, args.port)
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
    where = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address is bracketed in a URL
    print(f"skinfusion: serving {args.run} ({kind}, model {mid[:12]}, {'+'.join(ens.views)}, {method}) on "
          f"http://{where}:{args.port}/  API key: {'required' if settings.api_key else 'none'}", file=sys.stderr)
    if not local and not settings.api_key:
        print(f"skinfusion: warning: listening on {args.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)
    options = dict(host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                   timeout_graceful_shutdown=GRACEFUL_S, server_header=False, proxy_headers=False)
    if args.workers == 1:
        stopped_by = run_uvicorn(create_app(ens, mid, settings), 1, options, sock)
    else:
        metrics_dir = tempfile.mkdtemp(prefix="skinfusion-metrics-")
        # A fresh folder per start: the workers' counters are summed from its files, and a
        # previous run's files would add old counts (or another server's) to this one's.
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[SETTINGS_ENV] = json.dumps({"run": os.path.abspath(args.run),
                                               "settings": dataclasses.asdict(settings)})
        try:
            stopped_by = run_uvicorn("skinfusion.cli.serve:app_from_env", args.workers, options, sock)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt  # the house rule: Ctrl-C exits 130, after the drain (run_command says so)
    print("skinfusion: server stopped", file=sys.stderr)
    return EXIT_OK


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
