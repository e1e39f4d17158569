"""How far an interrupted branch got, read from its checkpoint folder without loading Keras.

A one-seed branch checkpoints in ``<branch>/.checkpoint/state.json``; a branch of several seeds
(``BranchConfig.seeds``) in ``<branch>/.checkpoint/member<k>/state.json``, and a finished member
leaves ``member<k>/done.json``. ``train --resume``, the multi-worker agreement check and the
Ctrl-C message all need the same answer, so it is read here once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Progress:
    """Where an interrupted branch stands.

    Attributes:
        members_done: members of a several-seed branch already finished (0 for one seed).
        member: the 1-based member being trained, or None for a one-seed branch.
        epoch: epochs of that member (or of the branch) completed and checkpointed.
        epochs: the epochs it was configured for (0 if unknown).
    """

    members_done: int
    member: int | None
    epoch: int
    epochs: int

    def describe(self, seeds: int | None = None) -> str:
        """E.g. ``epoch 3 of 30`` or ``member 2 of 3, epoch 3 of 30``."""
        where = f"epoch {self.epoch} of {self.epochs}" if self.epochs else f"epoch {self.epoch}"
        if self.member is None:
            return where
        return f"member {self.member}{f' of {seeds}' if seeds else ''}, {where}"


def _epoch(state: Path) -> tuple[int, int] | None:
    """``(epoch, configured epochs)`` of a ``state.json``, or None if it is missing or damaged."""
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
        return int(saved["epoch"]), int(saved.get("config", {}).get("epochs", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def checkpoint_progress(checkpoint: Path, seeds: int = 1) -> Progress | None:
    """The progress saved in a branch's ``.checkpoint`` folder, or None when nothing is saved.

    Args:
        checkpoint: ``<branch>/.checkpoint``.
        seeds: the branch's ``BranchConfig.seeds``: with more than one, members are read in order
            and the first unfinished one is the one in progress.
    """
    checkpoint = Path(checkpoint)
    if seeds <= 1:
        at = _epoch(checkpoint / "state.json")
        return None if at is None else Progress(0, None, *at)
    done = 0
    for k in range(1, seeds + 1):
        member = checkpoint / f"member{k}"
        if (member / "done.json").is_file():
            done += 1
            continue
        at = _epoch(member / "state.json")
        if at is not None:
            return Progress(done, k, *at)
        break
    return Progress(done, min(done + 1, seeds), 0, 0) if done else None


def interrupted_training_message(branches: dict[str, Path], seeds: dict[str, int], started: float | None) -> str:
    """What Ctrl-C during ``train`` says about ``branches`` (``{view: branch dir}``).

    Args:
        branches: the branches the command trains.
        seeds: each view's ``BranchConfig.seeds`` once known (else the member folders are counted).
        started: when the command started (``time.time()``), to tell the branches it saved from
            older ones; None before that is known.
    """
    done, saved = [], []
    for view, branch in branches.items():
        n = seeds.get(view) or max(1, len(list((branch / ".checkpoint").glob("member*"))))
        progress = checkpoint_progress(branch / ".checkpoint", n)
        if progress is not None:
            done.append(f"{progress.describe(n if n > 1 else None)} ({view})")
        elif started is not None and _saved_since(branch, started):
            saved.append(view)
    where = f" after {', '.join(done)}" if done else "" if saved else " before the first epoch was checkpointed"
    kept = f"; {', '.join(saved)} finished and saved" if saved else ""
    return (f"interrupted{where}{kept}; rerun with --resume to continue from the last completed epoch "
            "(branches already saved are kept)")


def _saved_since(branch: Path, started: float) -> bool:
    """Whether ``branch`` was saved (its ``metadata.json`` written) after ``started``."""
    try:
        return (branch / "metadata.json").stat().st_mtime >= started
    except OSError:
        return False
