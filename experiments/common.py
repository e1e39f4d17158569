"""How every ``python -m experiments.X`` script runs: flags first, TensorFlow later, errors as one line.

The experiment scripts are command lines like ``skinfusion``'s and keep its standard: ``--help``
and a flag mistake answer before TensorFlow is imported (seconds, not a minute of import), and a
wrong path or a damaged file is one ``error:`` line naming it (exit 2), Ctrl-C exits 130, a
closed pipe exits quietly: ``skinfusion.cli.common.run_guarded`` does that for both.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from colorspaces.files import write_json_atomic
from skinfusion.cli.common import positive_int

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def run_experiment(body: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                   parser: argparse.ArgumentParser, tensorflow: bool = True, log_format: str = LOG_FORMAT) -> int:
    """Run an experiment's ``body(args)`` guarded as the ``skinfusion`` commands are.

    Args:
        body: the work, after the flags are parsed and checked; returns the exit status.
        args: the parsed flags.
        parser: their parser, so that an ``OSError``'s path is reported with the flag that gave it.
        tensorflow: import TensorFlow (quietly) before ``body``, for scripts whose work loads models.
        log_format: the ``logging`` format of the progress lines.

    Returns:
        ``body``'s exit status; 2 for a reported error, 130 after Ctrl-C.
    """
    from skinfusion.cli.common import run_guarded

    def guarded(a: argparse.Namespace) -> int:
        if tensorflow:
            from models.quiet import import_tensorflow_quietly

            import_tensorflow_quietly()  # before anything imports it, noisily
        return body(a)

    # Not forced: a caller that already set up logging (a test, a notebook) keeps its handlers.
    logging.basicConfig(level=logging.INFO, format=log_format, datefmt="%H:%M:%S")
    return run_guarded(guarded, args, parser=parser)


def add_set_arguments(p: argparse.ArgumentParser, run_help: str) -> None:
    """The flags every experiment on the OOD image sets takes: --run, --data, --out, --per-kind."""
    p.add_argument("--run", required=True, metavar="RUN", help=run_help)
    p.add_argument("--data", required=True, metavar="DIR", help="the run's dataset")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--per-kind", type=positive_int, default=30,
                   help="realistic far-OOD images per kind and part (default 30)")


def run_report(args: argparse.Namespace, parser: argparse.ArgumentParser, compute: Callable[[], dict[str, Any]],
               stem: str, markdown: Callable[[dict[str, Any]], str]) -> int:
    """Run ``compute`` and write ``OUT/<stem>.json`` and ``OUT/<stem>.md``, and the table on stdout.

    Guarded by ``run_experiment``; ``--out`` is created before the work, so a wrong one fails first.
    """
    def body(a: argparse.Namespace) -> int:
        folder = Path(a.out)
        folder.mkdir(parents=True, exist_ok=True)
        result = compute()
        write_json_atomic(folder / f"{stem}.json", result)
        table = markdown(result)
        (folder / f"{stem}.md").write_text(table + "\n")
        print(table)
        return 0

    return run_experiment(body, args, parser)
