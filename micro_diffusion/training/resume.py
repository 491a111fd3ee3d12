"""Autoresume that survives a checkpoint cut short: pick the newest complete checkpoint before Composer loads one.

Composer (0.32) writes each checkpoint straight to its final name, `ep{epoch}-ba{batch}-rank0.pt`, then points
the link `latest-rank0.pt` at it and deletes the checkpoints beyond `save_num_checkpoints_to_keep`. A run killed
(or out of disk) while a checkpoint is written leaves that file cut short beside a link to the previous one; a
file damaged later leaves the link pointing at a bad file. Either way, a rerun with `autoresume` would fail: in the
middle of Composer's load, or, with `save_overwrite: false`, at fit start, where Composer refuses a folder holding
a checkpoint newer than the one it resumed from.

`prepare_resume` runs before the Trainer is built (train.py, on global rank 0). It checks the checkpoints of the
save folder with `models.checkpoints.incomplete_checkpoint_reason` (the end of each file only), points the link at
the newest complete one, and renames the incomplete ones newer than it to `<name>.incomplete` (kept, not deleted,
and no longer in Composer's way). With no complete checkpoint left it raises, naming the files and what to do.
A remote save folder (a URI) is left to Composer.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

from composer import Trainer
from composer.utils import format_name_with_dist

from micro_diffusion.models.checkpoints import IncompleteCheckpointError, incomplete_checkpoint_reason

__all__ = ["INCOMPLETE_SUFFIX", "prepare_resume"]

INCOMPLETE_SUFFIX = ".incomplete"
# The Trainer's defaults (train.py does not change them): checkpoint names and the link to the latest one.
_TRAINER_DEFAULTS = inspect.signature(Trainer).parameters
CHECKPOINT_FILENAME = _TRAINER_DEFAULTS["save_filename"].default  # 'ep{epoch}-ba{batch}-rank{rank}.pt'
LATEST_FILENAME = _TRAINER_DEFAULTS["save_latest_filename"].default  # 'latest-rank{rank}.pt'


def _checkpoints(folder: Path) -> list[Path]:
    """Rank 0's checkpoints in `folder`, newest (highest epoch, then batch) first."""
    pattern = re.escape(CHECKPOINT_FILENAME.replace("{rank}", "0"))
    pattern = pattern.replace(re.escape("{epoch}"), r"(\d+)").replace(re.escape("{batch}"), r"(\d+)")
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match is not None and not path.is_symlink():
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found, reverse=True)]


def prepare_resume(save_folder: str, run_name: str) -> list[str]:
    """Make `<save_folder>/latest-rank0.pt` point at the newest complete checkpoint of the folder; returns a note
    for each change made (nothing to say: an empty list). A complete file (not a link) of that name is left as it is.

    Args:
        save_folder: the Trainer's save_folder (may hold `{run_name}`).
        run_name: the run's name (exp_name).
    Raises:
        IncompleteCheckpointError: the folder holds checkpoints (or a link) but no complete checkpoint.
    """
    folder = Path(format_name_with_dist(save_folder, run_name))
    if "://" in save_folder or not folder.is_dir():
        return []
    latest = folder / LATEST_FILENAME.replace("{rank}", "0")
    notes = []
    if latest.exists() and not latest.is_symlink():  # a file someone put there, not Composer's link
        if incomplete_checkpoint_reason(latest) is None:
            return notes
        notes.append(_set_aside(latest, incomplete_checkpoint_reason(latest)))
    checkpoints = _checkpoints(folder)
    if not latest.is_symlink() and not checkpoints and not notes:
        return notes  # a fresh run
    for path in checkpoints:
        reason = incomplete_checkpoint_reason(path)
        if reason is None:
            return notes + _link(latest, path)
        notes.append(_set_aside(path, reason))
    linked = f"{latest} -> {os.readlink(latest)}" if latest.is_symlink() else str(latest)
    raise IncompleteCheckpointError(
        linked, "no complete checkpoint is left in the save folder to resume from. To start the run over, move "
        f"{folder} away (or choose another exp_name); to start from another checkpoint, set trainer.load_path to "
        f"it{' (' + '; '.join(notes) + ')' if notes else ''}"
    )


def _set_aside(path: Path, reason: str) -> str:
    """Rename an incomplete checkpoint to `<name>.incomplete`; returns the note saying so."""
    path.rename(path.with_name(path.name + INCOMPLETE_SUFFIX))
    return f"{path} is incomplete ({reason}): renamed to {path.name}{INCOMPLETE_SUFFIX}"


def _link(latest: Path, checkpoint: Path) -> list[str]:
    """Point the link `latest` at `checkpoint` (relative, as Composer does); a note when that changed it."""
    target = os.path.relpath(checkpoint, latest.parent)
    if not latest.is_symlink():
        was = "missing"
    elif os.readlink(latest) == target:
        return []
    else:
        was = f"{os.readlink(latest)}"
        latest.unlink()
    latest.symlink_to(target)
    return [f"{latest} now points to {target}, the newest complete checkpoint (it pointed to: {was})"]
