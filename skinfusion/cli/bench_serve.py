"""Load-test skinfusion serve on loopback: N concurrent clients, requests/s, p50/p95/p99, errors, RSS, vs in-process.

``skinfusion bench-serve --run RUN`` starts ``skinfusion serve`` on a free loopback port (or, with
``--url``, loads one already running on this machine), sends generated images (or ``--images DIR``)
from ``--clients`` threads until ``--requests`` are done or ``--duration-s`` has passed, stops the
server, and times in-process ``predict_proba`` on the same images. It prints a table and the goals
met or missed, and writes the raw numbers as JSON with ``--out``. A benchmark, not a test: it exits
0 whether the goals are met or not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from colorspaces.files import check_output_file, write_json_atomic
from skinfusion.cli.common import EXIT_OK, add_quiet, batch_wait_ms, new_parser, non_negative_int, port_number, positive_int, run_command


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 s, got {value:g}")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion bench-serve`` parser."""
    p = new_parser("bench-serve", __doc__, epilog="Goals (issue 19, 2 cores, 16 clients): served throughput >= 50% "
                   "of in-process, p99 <= 250 ms, 0 errors, server RSS growth < 50 MB over 10,000 requests.")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory with a fused ensemble (served, and "
                   "timed in-process)")
    p.add_argument("--url", help="benchmark this already running skinfusion serve on this machine "
                   "(e.g. http://127.0.0.1:8000) instead of starting one")
    p.add_argument("--clients", type=positive_int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=positive_int, default=10_000,
                   help="stop after this many requests (default 10000)")
    p.add_argument("--duration-s", type=_seconds, default=120.0, help="or after this many seconds (default 120)")
    p.add_argument("--images", metavar="DIR", help="send the image files of DIR (up to --n-images of them) "
                   "instead of generated synthetic images")
    p.add_argument("--n-images", type=positive_int, default=64, help="how many distinct images to cycle through "
                   "(default 64)")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="side in px of the generated images (default 256)")
    p.add_argument("--port", type=port_number(0), default=0, help="port for the server it starts (default 0: a free one)")
    p.add_argument("--api-key", metavar="KEY", help="send this key (and start the server with it); default "
                   "$SKINFUSION_API_KEY for --url")
    p.add_argument("--batch-wait-ms", type=batch_wait_ms, help="passed to skinfusion serve (its default: 5)")
    p.add_argument("--max-batch", type=positive_int, help="passed to skinfusion serve (its default: 32)")
    p.add_argument("--workers", type=positive_int, default=1, help="passed to skinfusion serve (default 1)")
    p.add_argument("--warmup-requests", type=non_negative_int, default=200,
                   help="requests sent first and not measured (kernel caches, allocators); the RSS growth is "
                        "counted from after them (default 200; 0: none)")
    p.add_argument("--in-process-s", type=_seconds, default=10.0,
                   help="how long to time in-process predict_proba (default 10 s)")
    p.add_argument("--in-process-batch", type=positive_int, default=64,
                   help="batch size of the in-process predict_proba (default 64, its own default)")
    p.add_argument("--out", metavar="JSON", help="write the report here as JSON")
    add_quiet(p)
    return p


def _bench(args: argparse.Namespace) -> int:
    from skinfusion.bench.bench_serve import BenchConfig, format_table, run_bench

    if args.out:
        check_output_file("--out", args.out)
    if args.url and args.port:
        raise ValueError("--port is for the server bench-serve starts; with --url, the port is the URL's")
    api_key = args.api_key or (os.environ.get("SKINFUSION_API_KEY") if args.url else None) or None
    cfg = BenchConfig(run=args.run, url=args.url, clients=args.clients, requests=args.requests,
                      duration_s=args.duration_s, images_dir=args.images, n_images=args.n_images,
                      image_size=args.image_size, port=args.port, api_key=api_key, batch_wait_ms=args.batch_wait_ms,
                      max_batch=args.max_batch, workers=args.workers,
                      warmup_requests=args.warmup_requests, inproc_s=args.in_process_s,
                      inproc_batch=args.in_process_batch, progress=not args.quiet)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        report = run_bench(cfg, say)
    except RuntimeError as exc:  # the server would not start or answer: the user's environment, not a bug
        raise ValueError(str(exc)) from None
    print(format_table(report))
    if args.out:
        write_json_atomic(Path(args.out), report)
        print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion bench-serve``: run the load benchmark, print the table, write ``--out``.

    Returns:
        0 after a benchmark (goals met or not), 2 on a reported error (no run, server would not start),
        130 after Ctrl-C.
    """
    return run_command(parser(), _bench, argv, interrupted_hint="benchmark stopped; the server it started was stopped")
