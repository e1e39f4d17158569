"""What every subcommand shares: exit codes, logging set-up, the guarded runner, flag types and the progress bar."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from skinfusion.data.layouts import LAYOUTS

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a C tool killed by SIGPIPE reports (git, coreutils)

# The fewest bootstrap resamples a 95% CI may rest on. Its bounds are the 2.5th and 97.5th
# percentiles of the resampled AUCs: below 40 resamples a tail holds less than one resample and
# the "CI" is just their min and max; at 100 each bound rests on 2-3 resamples, coarse but a CI
# (quick runs). The default, 1000, is the usual recommendation for percentile intervals.
MIN_BOOTSTRAP = 100

# What Ctrl-C tells the user: a hint after "interrupted; ", or a function of the parsed arguments
# that returns the whole line.
InterruptedHint = str | Callable[[argparse.Namespace], str]


def refuse_export_dir(run: str | os.PathLike, command: str) -> None:
    """Refuse ``--run`` when it is an export directory, naming the run it was exported from.

    ``fuse``, ``evaluate``, ``explain``, ``adapt`` and ``export`` need the run itself (branches,
    splits, validation predictions, Keras models); an export holds none of them, and without this
    check they call a valid export "damaged". Only ``predict`` and ``serve`` score exports.

    Raises:
        ValueError: naming ``--run``, the export's source run and what to do.
    """
    from ensemble.runtime import is_export_dir  # TensorFlow-free: the export runtime

    if not is_export_dir(run):
        return
    try:
        source = json.loads((Path(run) / "manifest.json").read_text(encoding="utf-8")).get("source", {}).get("run")
    except (OSError, ValueError, AttributeError):
        source = None
    origin = f", exported from the run {source}" if source else ""
    fix = f"pass --run {source}" if source else "pass the run it was exported from"
    raise ValueError(f"--run {run} is an export directory (written by `skinfusion export`{origin}); {command} needs "
                     f"the run itself: {fix}. Exports are scored by `skinfusion predict` and `skinfusion serve`")


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
    return f"{what}, in any of the layouts {', '.join(lay.name for lay in LAYOUTS)} (see docs/data.md)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of workers, jobs or images per batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def learning_rate(text: str) -> float:
    """argparse type: a learning rate in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a count where 0 means none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def port_number(lowest: int = 1) -> Callable[[str], int]:
    """argparse type: a TCP port from ``lowest`` to 65535 (``lowest=0``: 0 means any free port)."""
    what = "0 (any free port)" if lowest == 0 else str(lowest)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a port number from {what} to 65535, got {text!r}") from None
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"must be a port number from {what} to 65535, got {value}")
        return value
    return parse


def batch_wait_ms(text: str) -> float:
    """argparse type: a micro-batching wait, 0 to 1000 milliseconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds, got {text!r}") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000 ms, got {value:g}")
    return value


def bootstrap_resamples(text: str) -> int:
    """argparse type: a number of bootstrap resamples, at least ``MIN_BOOTSTRAP``."""
    value = positive_int(text)
    if value < MIN_BOOTSTRAP:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_BOOTSTRAP} (the 95% CI bounds are the 2.5th and 97.5th percentiles of the "
            f"resamples; fewer leave them resting on one or two values), got {value}")
    return value


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``; ``why`` is added to the refusal."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{f' ({why})' if why else ''}, got {value}")
        return value
    return parse


def check_output_dir(flag: str, path: str | os.PathLike) -> Path:
    """Refuse an output folder path that names an existing file (a missing folder is created later).

    Raises:
        ValueError: if it, or a folder above it, is a file.
    """
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "exists and is not a directory" if p == out else f"{p} is a file, not a folder"
            raise ValueError(f"{flag} {out}: {what}; give a folder")
    return out


@contextlib.contextmanager
def reading(flag: str, path: str | os.PathLike) -> Iterator[None]:
    """Name ``flag PATH`` when the file read in the block is not UTF-8 text (UTF-16, Latin-1, binary).

    A ``UnicodeDecodeError`` says which byte failed but not in which file.

    Raises:
        ValueError: naming the flag, the file and the fix.
    """
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {os.fspath(path)}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from None


# What an OSError means for the path it names, in the user's words.
_OS_REASONS = {
    errno.EISDIR: "is a directory, where a file is expected",
    errno.ENOTDIR: "is (or lies under) a file, where a folder is expected",
    errno.EEXIST: "exists and is not a directory",
    errno.EACCES: "permission denied",
    errno.EROFS: "is on a read-only file system",
    errno.ENOSPC: "no space left on the device",
}


def _flag_for(path: Path, args: argparse.Namespace | None, parser: argparse.ArgumentParser | None) -> str | None:
    """``--flag VALUE`` if ``path`` is that flag's path or its temporary file; ``--flag VALUE: PATH`` if it lies under it."""
    if args is None or parser is None:
        return None
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or not isinstance(value, (str, os.PathLike)):
            continue
        flag, given = f"{action.option_strings[-1]} {os.fspath(value)}", Path(os.path.abspath(value))
        if path == given or (path.parent == given.parent and path.name.startswith(f".{given.name}.")):
            return flag
        if given in path.parents:
            return f"{flag}: {path}"
    return None


def describe_os_error(exc: OSError, args: argparse.Namespace | None = None,
                      parser: argparse.ArgumentParser | None = None) -> str:
    """One line for an ``OSError``: the flag (or else the file) it concerns, and what is wrong with it."""
    reason = _OS_REASONS.get(exc.errno, exc.strerror or str(exc))
    # an atomic write's rename names the temporary file first and the real target second
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if name is None:
        return reason
    path = Path(os.path.abspath(os.fsdecode(name)))
    return f"{_flag_for(path, args, parser) or path}: {reason}"


def run_guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                interrupted_hint: InterruptedHint = "", parser: argparse.ArgumentParser | None = None) -> int:
    """Run a subcommand body, turning a user's mistake into one ``skinfusion: error:`` line.

    Library code raises ``ValueError``, ``KeyError`` or ``FileNotFoundError`` with the file or
    the allowed values in the message; those are the user's to fix, so they get the message and
    exit status 2, not a traceback. So does any other ``OSError`` (a directory where a file
    belongs, no permission, a full disk): the file system is the user's, and the message names
    the path and, when a flag gave it, the flag. Anything else is a bug and keeps its traceback.

    Args:
        fn: the subcommand body, returning an exit status.
        args: its parsed arguments.
        interrupted_hint: what to tell the user after Ctrl-C, after "interrupted; " (e.g. "rerun
            with --resume"); or a function of ``args`` that returns the whole line (e.g.
            "interrupted after epoch 3 of 30 (rgb); rerun with --resume").
        parser: the parser of ``args``, to name the flag an ``OSError``'s path came from.

    Returns:
        ``fn``'s exit status; 2 for a reported error, 130 after Ctrl-C.
    """
    interrupts: list[int] = []
    restore = _note_sigint(interrupts)
    try:
        return fn(args)
    except BaseException as exc:
        # TensorFlow runs Python callbacks from C++: a KeyboardInterrupt raised in one can come out
        # as an unrelated SystemError or AttributeError. After Ctrl-C, any error is the interrupt.
        if interrupts or isinstance(exc, KeyboardInterrupt):
            if callable(interrupted_hint):
                message = interrupted_hint(args)
            else:
                message = "interrupted" + (f"; {interrupted_hint}" if interrupted_hint else "")
            print(f"\nskinfusion: {message}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`| head`): stop quietly, as a C tool would. Point stdout at
            # /dev/null so the interpreter's final flush does not fail on the closed pipe again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
            # str(KeyError) quotes its message; the first argument is the message itself.
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"skinfusion: error: {msg}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, OSError):
            print(f"skinfusion: error: {describe_os_error(exc, args, parser)}", file=sys.stderr)
            return EXIT_ERROR
        raise
    finally:
        restore()


def _note_sigint(interrupts: list[int]) -> Callable[[], None]:
    """Make Ctrl-C raise KeyboardInterrupt as usual, and also note it in ``interrupts``.

    Returns:
        A function that puts the previous handler back (a no-op outside the main thread, where
        Python allows no handler to be set).
    """
    def on_sigint(signum: int, frame: Any) -> None:
        interrupts.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, on_sigint)
    return lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None, quiet: bool | None = None, interrupted_hint: InterruptedHint = "") -> int:
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
    return run_guarded(body, args, interrupted_hint, parser)


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
