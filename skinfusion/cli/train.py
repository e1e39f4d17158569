"""Train the branch of one view (or --view all) on a run's grouped split.

``skinfusion train`` writes ``RUN/branches/<view>/``. Its branch flags are generated from the
fields of ``models.branch.BranchConfig``: their types, defaults, choices and help live there only.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing
from typing import Any, Sequence

from colorspaces import DEFAULT_VIEWS, VIEWS
from ensemble.rundir import RunDir
from models.config import BranchConfig, read_config_file
from models.distribute import STRATEGIES, start_strategy
from models.precision import MIXED_PRECISION
from models.progress import interrupted_training_message
from skinfusion.cli.common import (
    add_quiet,
    data_help,
    exit_for_skipped,
    new_parser,
    positive_int,
    reading,
    run_command,
)

# the train flag's metavar by field type, when the field has no choices and names no metavar
_METAVARS = {int: "N", float: "X", str: "TEXT"}
_NOT_FLAGS = ("view",)  # --view is the command's own: required, and it also takes "all"


def _default_text(value: Any) -> str:
    return "empty" if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type = BranchConfig) -> None:
    """Add one flag per config field, generated from its type, default and metadata.

    A field's metadata gives ``help`` and optionally ``choices``, ``flag`` (the flag's name,
    default ``--field-name``) and ``metavar``. A bool field becomes a switch to the opposite
    of its default (``augment=True`` → ``--no-augment``). Every flag defaults to ``None``, so
    that only the flags given override ``--config``; the help states the field's default.

    Args:
        parser: the parser to add the flags to, in a group of their own.
        config_cls: a dataclass whose fields carry that metadata.
    """
    group = parser.add_argument_group(f"branch config ({config_cls.__name__}; these override --config)")
    types = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in _NOT_FLAGS:
            continue
        meta, kind = f.metadata, types[f.name]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        text = meta["help"].replace("%", "%%")  # argparse %-formats help strings
        if kind is bool:
            state = ("on", "off") if f.default else ("off", "on")
            group.add_argument(flag, dest=f.name, action="store_const", const=not f.default,
                               help=f"{text} ({state[0]} by default; {flag} turns it {state[1]})")
            continue
        choices = tuple(meta["choices"]) if meta.get("choices") is not None else None
        group.add_argument(flag, dest=f.name, type=kind, choices=choices,
                           metavar=None if choices else meta.get("metavar", _METAVARS.get(kind)),
                           help=f"{text} (default {_default_text(f.default)})")


def config_overrides(args: argparse.Namespace, config_cls: type = BranchConfig) -> dict[str, Any]:
    """The config fields given explicitly on the command line (the generated flags left ``None`` are not)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
            if f.name not in _NOT_FLAGS and getattr(args, f.name, None) is not None}


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion train`` parser; view choices are read from ``VIEWS`` now, not at import."""
    p = new_parser("train", __doc__)
    p.add_argument("--view", required=True, choices=[*VIEWS, "all"],
                   help=f"which view's branch to train; 'all' trains {', '.join(DEFAULT_VIEWS)}")
    p.add_argument("--data", required=True, metavar="DIR", help=data_help())
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory; its split (splits.csv) is made on first use and reused")
    p.add_argument("--config", metavar="FILE", help="JSON file of branch config defaults; explicit flags override it")
    add_config_flags(p)
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="seed of the run's split, used only when the split is created (default 0)")
    p.add_argument("--exclude-artefacts", action="store_true",
                   help="drop images flagged with a colour disc or ink from training (validation and test keep them)")
    p.add_argument("--audit", metavar="FILE",
                   help="audit CSV from `skinfusion audit` for --exclude-artefacts (default: audit the data now, "
                        "saved as RUN/audit.csv)")
    p.add_argument("--dedup-split", action="store_true",
                   help="when the run's split is created, also group images whose perceptual hashes are near-identical")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use a stratified, grouped subset of about N images (quick runs; fixed at split creation)")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="image decoding threads (default 2)")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="with --view all: branches trained at once, each in its own process with cores/N TensorFlow "
                        "threads (default: one process per branch, which measured fastest on 2 cores; 1 = one after "
                        "another in this process, less memory; see docs/performance.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: each branch resumes from its last completed epoch "
                        "(checkpointed in RUN/branches/<view>/.checkpoint); finished branches are kept")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="tf.distribute strategy: one-device; mirrored (every GPU here); multi-worker (across machines, "
                        "from $TF_CONFIG; run the same command on each); auto = mirrored with more than one GPU, else "
                        "one-device (default auto). --batch-size stays the global batch, split equally between the "
                        "replicas; see docs/cluster.md")
    p.add_argument("--mixed-precision", nargs="?", const="float16", default="", choices=MIXED_PRECISION,
                   metavar="{float16,bfloat16}",
                   help="train in mixed precision, the output layer in float32: float16 (the default when the flag "
                        "has no value; Keras mixed_float16) for GPUs, slower on a CPU; bfloat16 for GPUs and for CPUs "
                        "with native bf16 (avx512_bf16 or AMX: 1.06-1.12x the float32 speed measured), emulated and "
                        "about 4x slower on others. Off by default; the saved branch is float32 either way")
    p.add_argument("--cache-dir", metavar="DIR", help="where decoded, resized images are cached between branches and runs "
                                       "(default $SKINFUSION_CACHE or ~/.cache/skinfusion)")
    add_quiet(p)
    return p


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def resolve_configs(args: argparse.Namespace, views: Sequence[str]) -> list[BranchConfig]:
    """One ``BranchConfig`` per view: ``--config`` file values, overridden by the flags given.

    A bad value is blamed on where it came from: the ``--config`` file (checked on its own, so a
    wrong value there is refused even when a flag overrides it) or the flag.

    Raises:
        ValueError: naming ``--config FILE`` or ``--flag VALUE`` and what is wrong.
        FileNotFoundError: if the ``--config`` file is missing.
    """
    base: dict[str, Any] = {}
    if args.config:
        with reading("--config", args.config):
            base = read_config_file(args.config)
        try:
            BranchConfig.from_dict({**base, "view": views[0]})
        except (ValueError, KeyError) as exc:
            raise ValueError(f"--config {args.config}: {exc.args[0] if exc.args else exc}") from None
    overrides = config_overrides(args)
    for f in dataclasses.fields(BranchConfig):
        if f.name in overrides:
            try:
                BranchConfig.from_dict({**base, f.name: overrides[f.name], "view": views[0]})
            except ValueError as exc:
                raise ValueError(f"{_flag_name(f)} {_default_text(overrides[f.name])}: {exc}") from None
    return [BranchConfig.from_dict({**base, **overrides, "view": view}) for view in views]


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C during ``train`` says: where each interrupted branch stopped (member and epoch),
    the branches this command already saved, and --resume (see ``models.progress``)."""
    views = DEFAULT_VIEWS if args.view == "all" else (args.view,)
    return interrupted_training_message({v: RunDir(args.run).branch(v) for v in views},
                                        getattr(args, "resolved_seeds", {}), getattr(args, "started_at", None))


def _train(args: argparse.Namespace) -> int:
    from skinfusion.workflows.auditing import artefact_exclusions  # these load TensorFlow: not at --help
    from skinfusion.workflows.training import train_branches
    views = DEFAULT_VIEWS if args.view == "all" else (args.view,)
    args.started_at = time.time()  # for the Ctrl-C message: which branches this command saved
    configs = resolve_configs(args, views)
    args.resolved_seeds = {c.view: c.seeds for c in configs}
    args.jobs = start_strategy(args.strategy, args.mixed_precision, args.jobs, [c.batch_size for c in configs])
    if args.limit is not None and args.limit < 40:
        raise ValueError(f"--limit must be at least 40 images to leave both classes in every split, got {args.limit}")
    exclude = None
    if args.exclude_artefacts:
        exclude, audit_csv = artefact_exclusions(args.data, args.run, args.audit, workers=args.workers)
        print(f"excluding up to {len(exclude)} artefact-flagged images from training ({audit_csv})")
    elif args.audit:
        raise ValueError("--audit is only used with --exclude-artefacts")
    jobs = args.jobs if args.jobs is not None else len(configs)
    summaries = train_branches(args.data, args.run, configs, jobs=jobs, split_seed=args.split_seed,
                               limit=args.limit, workers=args.workers, dedup=args.dedup_split,
                               exclude_ids=exclude, cache_dir=args.cache_dir, resume=args.resume,
                               strategy=args.strategy, mixed_precision=args.mixed_precision)
    skipped = 0
    for s in summaries:
        v = s["validation"]
        print(f"{s['view']}: validation AUC {v['auc']:.4f} [{v['auc_ci95'][0]:.3f}, {v['auc_ci95'][1]:.3f}], "
              f"trained in {s['train_seconds']:.0f}s, peak RSS {s['peak_rss_mb']:.0f} MB -> {s['branch_dir']}")
        skipped += s["skipped"]
    return exit_for_skipped(skipped, "skipped.csv in each branch")


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion train``: train branches and save each under ``RUN/branches/<view>/``.

    Returns:
        0, or 1 if unreadable images were skipped, 2 on a reported error, 130 after Ctrl-C.
    """
    return run_command(parser(), _train, argv, interrupted_hint=interrupted_message)
