"""What every subcommand shares: exit codes, logging set-up, the guarded runner, flag types and the progress bar."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable, Sequence

from skinfusion.data.layouts import LAYOUTS

# TensorFlow's C++ start-up chatter (including a harmless cuInit error on CPU-only machines)
# drowns the progress lines; Python exceptions still surface. Users can override it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def exit_for_skipped(n_skipped: int, where: str) -> int:
    """Exit 1 with a warning naming where the skipped images are listed, or 0 when none were skipped."""
    if not n_skipped:
        return EXIT_OK
    print(f"warning: {n_skipped} unreadable images were skipped; see {where}", file=sys.stderr)
    return EXIT_SKIPPED


def setup_logging(quiet: bool) -> None:
    """Send log records to stderr: INFO and up, or WARNING and up when ``quiet``."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def summary(doc: str | None) -> str:
    """The first line of a module docstring: a subcommand's one-line summary and parser description."""
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def new_parser(command: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``skinfusion COMMAND``, described by its module docstring's first line."""
    return argparse.ArgumentParser(prog=f"skinfusion {command}", description=summary(doc), epilog=epilog)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """The ``-q/--quiet`` flag every subcommand takes."""
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings, errors and results")


def data_help(what: str = "dataset folder") -> str:
    """Help for a ``--data`` flag, naming every registered dataset layout."""
    return f"{what}, in any of the layouts {', '.join(lay.name for lay in LAYOUTS)} (see README 'Data')"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of workers, jobs or images per batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                interrupted_hint: str = "") -> int:
    """Run a subcommand body, turning a user's mistake into one ``skinfusion: error:`` line.

    Library code raises ``ValueError``, ``KeyError`` or ``FileNotFoundError`` with the file or
    the allowed values in the message; those are the user's to fix, so they get the message and
    exit status 2, not a traceback. Anything else is a bug and keeps its traceback.

    Args:
        fn: the subcommand body, returning an exit status.
        args: its parsed arguments.
        interrupted_hint: what to tell the user after Ctrl-C (e.g. "rerun with --resume").

    Returns:
        ``fn``'s exit status; 2 for a reported error, 130 after Ctrl-C.
    """
    try:
        return fn(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # str(KeyError) quotes its message; the first argument is the message itself.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"skinfusion: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nskinfusion: interrupted" + (f"; {interrupted_hint}" if interrupted_hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None, quiet: bool | None = None, interrupted_hint: str = "") -> int:
    """Parse ``argv``, set up logging and run ``body`` guarded: the whole of a subcommand's ``main``.

    Args:
        parser: the subcommand's parser.
        body: the subcommand body.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        quiet: force the log level (``predict`` writes data to stdout); default: the ``-q`` flag.
        interrupted_hint: see ``run_guarded``.

    Returns:
        The exit status.
    """
    args = parser.parse_args(argv)
    setup_logging(args.quiet if quiet is None else quiet)
    return run_guarded(body, args, interrupted_hint)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, enabled: bool, label: str = "images"):
        self.total, self.enabled, self.label, self.done = total, enabled and total > 0, label, 0
        self._t0, self._tty, self._last_decile = time.perf_counter(), sys.stderr.isatty(), -1

    def update(self, n: int, skipped: int) -> None:
        """Count ``n`` more items done, ``skipped`` of all so far skipped, and redraw."""
        self.done += n
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
        frac = self.done / self.total
        if self._tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.label} ({rate:.0f}/s, {skipped} skipped)")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(frac * 10) != self._last_decile:
            self._last_decile = int(frac * 10)
            print(f"{self.done}/{self.total} {self.label} ({rate:.0f}/s, {skipped} skipped)", file=sys.stderr, flush=True)
