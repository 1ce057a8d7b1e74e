"""The names in a checkpoints folder, and its repair at start.

A checkpoint is the folder `ckpt-<N>-step-<S>`, N the save number and S the
global step. N is one more than the largest number in the folder or in its
`damaged/` subfolder, so a name is never taken twice and the names sort in the
order of the saves, which is training order, whatever the global step does (a
resume with a larger global batch re-bases it lower). Earlier versions named a
checkpoint `step-<S>` (`step-<S>-2`, `-3`... when taken): such folders are still
found, resolved by name and ordered by the progress in their state.json, but
`ls` lists them after every `ckpt-` name although they are older.

Rank 0 repairs the folder at the start of a run, when no save is under way:
`remove_leftovers` clears what killed saves left, and `set_aside` moves a
checkpoint that cannot be read into `damaged/`, where no rotation deletes it.
"""

import logging
import os
import re
import shutil

from data_pipeline import atomic

log = logging.getLogger(__name__)

NAME = re.compile(r"^(?:ckpt-(\d{6,})-)?step-(\d{9,})(?:-\d+)?$")
DAMAGED = "damaged"
_NUMBER = re.compile(r"^ckpt-(\d+)-")


def name(number: int, global_step: int) -> str:
    return f"ckpt-{number:06d}-step-{global_step:09d}"


def next_number(directory: str) -> int:
    """The number of the next save into `directory`: one more than any there or set aside."""
    numbers = [0]
    for folder in (directory, os.path.join(directory, DAMAGED)):
        if os.path.isdir(folder):
            numbers += [int(m.group(1)) for m in map(_NUMBER.match, os.listdir(folder)) if m]
    return max(numbers) + 1


def remove_leftovers(directory: str) -> None:
    """Deletes `*.tmp-*` of killed writes; puts back a `*.old-*` whose replacement never arrived."""
    if not os.path.isdir(directory):
        return
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        old = re.match(r"^(.*)\.old-\d+$", entry)
        if old and not os.path.exists(os.path.join(directory, old.group(1))):
            log.warning("restoring %s, left aside by a save that was killed", old.group(1))
            os.rename(path, os.path.join(directory, old.group(1)))
        elif old or re.search(r"\.tmp-\d+$", entry):
            log.info("removing %s, left by a save that was killed", path)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def set_aside(directory: str, path: str) -> str:
    """Moves the checkpoint folder `path` into `directory/damaged/` under its own name; returns where.

    Out of the folder, it is neither tried at every start nor in the way of a
    later save, and a person can still look at it. Raises OSError.
    """
    damaged = os.path.join(directory, DAMAGED)
    os.makedirs(damaged, mode=0o750, exist_ok=True)
    target, n = os.path.join(damaged, os.path.basename(path)), 1
    while os.path.exists(target):  # an older checkpoint's name (no save number), damaged twice
        n += 1
        target = os.path.join(damaged, f"{os.path.basename(path)}.{n}")
    os.rename(path, target)
    atomic.fsync_dir(damaged)
    atomic.fsync_dir(directory)
    return target
