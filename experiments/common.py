"""How every ``python -m experiments.X`` script runs: flags first, TensorFlow later, errors as one line.

The experiment scripts are command lines like ``skinfusion``'s and keep its standard: ``--help``
and a flag mistake answer before TensorFlow is imported (seconds, not a minute of import), and a
wrong path or a damaged file is one ``error:`` line naming it (exit 2), Ctrl-C exits 130, a
closed pipe exits quietly: ``skinfusion.cli.common.run_guarded`` does that for both.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
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


def paired_rows(names: Sequence[str], labels: Mapping[str, int], fused: Sequence[Mapping[str, float]],
                groups: Mapping[str, Sequence[str]], n_boot: int = 1000,
                extra: Sequence[str] | None = None) -> list[str]:
    """Markdown rows: per group of images and per run, its AUC (95% CI) and the paired bootstrap
    difference from the first run (the same resampled images for both).

    Args:
        names: a short name per run, first the reference.
        labels: image id -> 0/1.
        fused: per run, image id -> its fused probability (every id of every group must be there).
        groups: group name -> the image ids it holds; a group without both classes is left out.
        n_boot: bootstrap resamples.
        extra: per run, one more cell placed after its name (e.g. the views it fuses).
    """
    import numpy as np

    from ensemble.metrics import paired_auc_delta, roc_auc_ci

    lines = []
    for group, ids in groups.items():
        y = np.array([labels[i] for i in ids])
        if len(ids) == 0 or y.min() == y.max():
            continue
        ps = [np.array([f[i] for i in ids]) for f in fused]
        for k, (name, p) in enumerate(zip(names, ps)):
            auc, lo, hi = roc_auc_ci(y, p, n_boot=n_boot)
            d = paired_auc_delta(y, p, ps[0], n_boot)
            delta = "(reference)" if k == 0 else f"{d['delta']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f})"
            cells = [name, *([extra[k]] if extra else []), group, f"{len(y)} ({int(y.sum())})",
                     f"{auc:.3f} ({lo:.3f}–{hi:.3f})", delta]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
