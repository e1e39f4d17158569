"""Pre-train a view's encoder (or every default view's) without labels (SimSiam) for `train --init-from`.

``skinfusion pretrain`` learns the branch's conv layers from every image of the run's training
split (labels unused) and any extra unlabelled folders, and writes ``encoder.npz`` +
``pretrain.json`` + ``images.txt`` (default ``RUN/pretrain/<view>/``). Validation and test images
never enter it. ``skinfusion train --view V --init-from DIR`` then fine-tunes a branch from it.
The work is ``skinfusion.workflows.pretraining`` and ``models.pretrain``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from colorspaces import CONSTANCY, DEFAULT_VIEWS, VIEWS
from colorspaces.lesion import LESION_CROPS
from models.config import BLOCK_ORDERS, BranchConfig
from skinfusion.cli.common import (
    add_quiet,
    check_output_dir,
    data_help,
    learning_rate,
    new_parser,
    positive_int,
    run_command,
)


def parser() -> argparse.ArgumentParser:
    """The ``skinfusion pretrain`` parser."""
    d = BranchConfig()
    p = new_parser("pretrain", __doc__)
    p.add_argument("--view", required=True, choices=[*VIEWS, "all"],
                   help=f"which view's encoder to pre-train; 'all' pre-trains {', '.join(DEFAULT_VIEWS)}")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="with --view all: views pre-trained at once, each in its own process with cores/N TensorFlow "
                        "threads (default: one process per view, as train; 1 = one after another in this process, "
                        "less memory)")
    p.add_argument("--data", required=True, metavar="DIR", help=data_help())
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory whose training split is pre-trained on (its split is made on first use, "
                        "as `train` makes it, and reused)")
    p.add_argument("--images", action="append", default=[], metavar="DIR",
                   help="an extra folder of unlabelled images (searched recursively; repeat for more); files that "
                        "are validation or test images of the run, by name or by content, are left out")
    p.add_argument("--out", metavar="DIR",
                   help="where to write the encoder (default RUN/pretrain/<view>); with --view all, each view's "
                        "encoder goes to DIR/<view>")
    p.add_argument("--epochs", type=positive_int, default=20, metavar="N", help="passes over the images (default 20)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                   help="images per step, two augmented views each (default 64)")
    p.add_argument("--learning-rate", type=learning_rate, metavar="LR",
                   help="SGD learning rate, cosine-decayed (default 0.05 x batch size / 256)")
    p.add_argument("--image-size", type=positive_int, default=d.image_size, metavar="N",
                   help=f"square input side in pixels (default {d.image_size}; fine-tuning may use another)")
    p.add_argument("--base-filters", type=positive_int, default=d.base_filters, metavar="N",
                   help=f"width of the first conv layer; must match the branch's (default {d.base_filters})")
    p.add_argument("--block-order", choices=list(BLOCK_ORDERS), default=d.block_order,
                   help=f"layer order in each conv block; must match the branch's (default {d.block_order})")
    p.add_argument("--color-constancy", choices=list(CONSTANCY), default=d.color_constancy,
                   help="preprocessing before the view, as in train (default none)")
    p.add_argument("--lesion-crop", choices=LESION_CROPS, default=d.lesion_crop,
                   help="crop images to their located lesion before resizing, as train --lesion-crop (default none)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed for weights, order and augmentation (default 0)")
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="seed of the run's split, used only when the split is created (default 0)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="a stratified, grouped subset of about N images (fixed at split creation, as in train)")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="image decoding threads (default 2)")
    p.add_argument("--cache-dir", metavar="DIR", help="where decoded images are cached (default as train's)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted pre-training from its last completed epoch (checkpointed in "
                        "OUT/.checkpoint); the other flags must be the ones it was started with")
    add_quiet(p)
    return p


def _pretrain(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 40:
        raise ValueError(f"--limit must be at least 40 images to leave both classes in every split, got {args.limit}")
    if args.image_size < 16:
        raise ValueError(f"--image-size must be at least 16 (four 2x poolings), got {args.image_size}")
    views = DEFAULT_VIEWS if args.view == "all" else (args.view,)
    outs = [str(Path(args.out) / v) if args.out and args.view == "all" else args.out for v in views]
    for out in outs:
        if out:
            check_output_dir("--out", out)
    for d in args.images:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--images {d}: no such folder; give a folder of unlabelled images")
    if args.jobs is not None and args.view != "all":
        raise ValueError(f"--jobs {args.jobs} pre-trains several views at once; it needs --view all")
    from skinfusion.workflows.pretraining import pretrain_views  # TensorFlow: not for --help

    configs = [BranchConfig(view=v, image_size=args.image_size, base_filters=args.base_filters,
                            block_order=args.block_order, color_constancy=args.color_constancy,
                            lesion_crop=args.lesion_crop, seed=args.seed)
               for v in views]
    jobs = args.jobs if args.jobs is not None else len(configs)
    summaries = pretrain_views(args.data, args.run, configs, outs, jobs=jobs, extra_dirs=args.images,
                               epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               split_seed=args.split_seed, limit=args.limit, workers=args.workers,
                               cache_dir=args.cache_dir, resume=args.resume)
    for view, s in zip(views, summaries):
        first, last = s["history"][0], s["history"][-1]
        probe = (f"; k-NN probe validation AUC {first['knn_auc']:.4f} before, {last['knn_auc']:.4f} after"
                 if "knn_auc" in last else "")
        done = "kept (already pre-trained with these settings), pre-trained" if s.get("kept") else "pre-trained"
        print(f"{view}: encoder {done} on {s['n_images']} images ({s['n_training_images']} training, "
              f"{s['n_extra_images']} extra, {s['extra_refused']} refused){probe}; collapse indicator "
              f"{last['collapse_indicator']:.2f} (about 1 healthy, near 0 collapsed) -> {s['out']}")
    for view, s in zip(views, summaries):
        print(f"fine-tune with: skinfusion train --view {view} --data {args.data} --run RUN --init-from {s['out']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``skinfusion pretrain``: write an encoder directory.

    Returns:
        0, 2 on a reported error, 130 after Ctrl-C.
    """
    return run_command(parser(), _pretrain, argv,
                       interrupted_hint="an encoder whose pre-training was cut short was not written; rerun the "
                                        "command with --resume to continue from its last completed epoch (encoders "
                                        "already written with the same settings are kept)")
