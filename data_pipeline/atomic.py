"""Writes that a crash leaves whole or absent, never half done: a temporary sibling, then a rename.

A rename within one folder is atomic on POSIX file systems, so a reader (a
resumed run, another rank, a user) sees the old file or folder or the new one.
The temporary names carry the writer's pid, so two writers never share one.
Used for checkpoints, pointers and summaries (trainer/), shards' done-records
and metadata.json (data_pipeline/), and exports.
"""

import contextlib
import json
import os
import shutil


def write_text(path: str, text: str, durable: bool = False) -> None:
    """Replaces the file `path` with `text`; `durable` also fsyncs it before the rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, obj, durable: bool = False) -> None:
    """`obj` as indented JSON with sorted keys, written as write_text does."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", durable)


def replace_dir(new: str, target: str) -> None:
    """Moves the folder `new` to `target`; an old `target` is removed only once `new` is in place."""
    old = None
    if os.path.exists(target):
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(final: str, mode: int = 0o750):
    """Yields an empty temporary folder beside `final`, which becomes `final` when the block ends.

    If the block raises, the temporary folder is removed and `final` (new or
    old) is untouched.
    """
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=mode)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
