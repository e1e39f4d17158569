"""The ``skinfusion`` command line: a registry of subcommands, one module each, with thin ``main(argv) -> int``.

A subcommand module is imported only when it runs (``train`` and ``predict`` load TensorFlow;
``audit`` and ``synth`` must not). ``train_main``, ``fuse_main`` and the others are its ``main``,
importable from here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from models.quiet import import_tensorflow_quietly
from skinfusion.cli.common import EXIT_ERROR, EXIT_OK, summary

# Command name → module, in the order the usage lists them. Each module has `parser()` and
# `main(argv=None) -> int`, and its docstring's first line is its summary, here and in its --help.
COMMANDS: dict[str, str] = {
    "train": "skinfusion.cli.train",
    "pretrain": "skinfusion.cli.pretrain",
    "fuse": "skinfusion.cli.fuse",
    "evaluate": "skinfusion.cli.evaluate",
    "predict": "skinfusion.cli.predict",
    "explain": "skinfusion.cli.explain",
    "adapt": "skinfusion.cli.adapt",
    "audit": "skinfusion.cli.audit",
    "verify-split": "skinfusion.cli.verify_split",
    "synth": "skinfusion.cli.synth",
    "bench": "skinfusion.cli.bench",
    "export": "skinfusion.cli.export",
    "serve": "skinfusion.cli.serve",
    "bench-serve": "skinfusion.cli.bench_serve",
}

# The commands that always run a Keras model (predict does only for a run, not an export: it asks itself).
TENSORFLOW_COMMANDS = ("train", "pretrain", "fuse", "evaluate", "explain", "adapt")

_MAINS = {f"{name.replace('-', '_')}_main": module for name, module in COMMANDS.items()}
__all__ = ["COMMANDS", "command_module", "main", "usage", *sorted(_MAINS)]


def command_module(name: str) -> ModuleType:
    """Import and return the module of subcommand ``name``.

    Raises:
        KeyError: if ``name`` is not a key of ``COMMANDS``.
    """
    if name not in COMMANDS:
        raise KeyError(f"unknown command {name!r}; choose one of {list(COMMANDS)}")
    return importlib.import_module(COMMANDS[name])


def _module_summary(module: str) -> str:
    # Read the docstring from the source instead of importing the module: half the commands
    # import TensorFlow, and listing them should not take seconds.
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        return summary(ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))))
    return summary(importlib.import_module(module).__doc__)


def usage() -> str:
    """The top-level usage text, generated from ``COMMANDS`` and each command's module docstring."""
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}}{_module_summary(module)}" for name, module in COMMANDS.items()]
    return ("usage: skinfusion COMMAND [options]   (skinfusion COMMAND --help for each)\n"
            "       skinfusion --version\n\ncommands:\n" + "\n".join(lines) + "\n")


def _version() -> str:
    try:
        return importlib.metadata.version("skinfusion")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skinfusion`` console script: dispatch to a subcommand's ``main``.

    Args:
        argv: ``COMMAND [options]`` (default ``sys.argv[1:]``).

    Returns:
        The subcommand's exit status; 0 for ``--help``/``--version``, 2 for no or an unknown command.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"skinfusion: error: no command given\n\n{usage()}", file=sys.stderr)
        return EXIT_ERROR
    if argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK
    if argv[0] == "--version":
        print(f"skinfusion {_version()}")
        return EXIT_OK
    if argv[0] not in COMMANDS:
        print(f"skinfusion: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_ERROR
    if argv[0] in TENSORFLOW_COMMANDS and not {"-h", "--help"} & set(argv[1:]):
        import_tensorflow_quietly()  # before the command's module imports it, noisily
    return command_module(argv[0]).main(argv[1:])


def __getattr__(name: str) -> Callable[..., Any]:
    # `from skinfusion.cli import train_main` imports only the train module (PEP 562).
    if name not in _MAINS:
        raise AttributeError(f"module 'skinfusion.cli' has no attribute {name!r}")
    return importlib.import_module(_MAINS[name]).main
