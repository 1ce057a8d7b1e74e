"""Writes that a crash leaves whole or absent, never half done: a temporary sibling, then a rename.

A rename within one folder is atomic on POSIX file systems, so a reader (a
resumed run, another rank, a user) sees the old file or folder or the new one.
The temporary names carry the writer's pid, so two writers never share one.
An OSError that names no file (a write failed, not an open: a full disk) is
raised again naming the file or folder being written.
Used for checkpoints, pointers and summaries (trainer/), shards' done-records
and metadata.json (data_pipeline/), and exports.
"""

import contextlib
import json
import logging
import os
import re
import shutil

log = logging.getLogger(__name__)


def fsync_dir(path: str) -> None:
    """Makes a folder's entries (a rename, a new file) survive a power loss, not only its files' bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsyncs every file and folder under `path`, and `path` itself."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def write_text(path: str, text: str, durable: bool = False) -> None:
    """Replaces the file `path` with `text`; `durable` also fsyncs it before the rename, and the rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(path) or ".")
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def write_json(path: str, obj, durable: bool = False) -> None:
    """`obj` as indented JSON with sorted keys, written as write_text does."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", durable)


def replace_dir(new: str, target: str) -> None:
    """Moves the folder `new` to `target`; an old `target` is removed only once `new` is in place.

    If the second rename fails, the old folder is put back; if the process is
    killed between the two, recover_dir puts it back at the next start.
    """
    old = None
    if os.path.exists(target):
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old:
            os.rename(old, target)
        raise
    if old:
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(final: str, mode: int = 0o750, durable: bool = False):
    """Yields an empty temporary folder beside `final`, which becomes `final` when the block ends.

    If the block raises, the temporary folder is removed and `final` (new or
    old) is untouched. `durable` fsyncs every file and folder before the
    rename, and the parent after it: without that, a power loss can leave a
    renamed folder whose files are empty or short.
    """
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=mode)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        replace_dir(tmp, final)
        if durable:
            fsync_dir(os.path.dirname(final) or ".")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), final) from e
        raise


def recover_dir(final: str) -> None:
    """Repairs what a killed staged_dir left beside `final`, for a writer about to start.

    A kill between replace_dir's two renames leaves `final.old-PID` (the
    complete old folder) and no `final`: the old one is put back. Any
    `final.tmp-PID` (a write cut short) and any other `final.old-PID` (a kill
    after the second rename) are removed. Only for a caller that knows no
    write of `final` is under way.
    """
    parent, base = os.path.split(final)
    parent = parent or "."
    if not os.path.isdir(parent):
        return
    leftover = re.compile(rf"^{re.escape(base)}\.(tmp|old)-\d+$")
    found = [(m.group(1), os.path.join(parent, name)) for name in os.listdir(parent) if (m := leftover.match(name))]
    olds = sorted((p for kind, p in found if kind == "old"), key=os.path.getmtime)
    if olds and not os.path.lexists(final):
        log.warning("putting back %s, set aside by a replacement that was killed before it completed", final)
        os.rename(olds.pop(), final)
        fsync_dir(parent)
    for path in sorted([p for kind, p in found if kind == "tmp"] + olds):
        log.info("removing %s, left by a write that was killed", path)
        shutil.rmtree(path, ignore_errors=True)
