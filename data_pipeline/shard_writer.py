"""Writes shards, one whole shard per task, in worker processes.

A task's shard is written under a temporary name, checksummed and renamed,
and then a small `<shard>.done.json` records its key (what went into it) and
its SHA-256. A rerun after an interruption skips every shard whose record
still matches and whose bytes still hash to it: completed shards are never
rewritten. Which process writes a shard does not change its bytes.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass

from data_pipeline import atomic
from data_pipeline.images import BrokenImage, ImageOptions, normalise
from data_pipeline.metadata import FORMAT_VERSION, DataError, sha256_file, shard_name
from data_pipeline.record_writer import TFRecordFile, encode_example
from data_pipeline.sources import Source

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    count: int  # shards in the split
    sources: tuple[Source, ...]  # in the order they are written
    class_names: tuple[str, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)

    def key(self, opts: ImageOptions) -> str:
        """Changes whenever the shard's bytes could: its files, their versions, the options."""
        h = hashlib.sha256(json.dumps([FORMAT_VERSION, self.name, asdict(opts), self.class_names]).encode())
        for s in self.sources:
            h.update(json.dumps([s.example_id, s.path, s.label, s.size, s.mtime_ns]).encode())
        return h.hexdigest()


def completed(task: ShardTask, work_dir: str, opts: ImageOptions) -> dict | None:
    """The shard's done-record if the shard on disk is complete and verified, else None."""
    shard = os.path.join(work_dir, task.name)
    try:
        with open(shard + DONE_SUFFIX, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("key") != task.key(opts) or not os.path.isfile(shard):
        return None
    return done if sha256_file(shard) == done.get("sha256") else None


def _read(src: Source, opts: ImageOptions):
    try:
        with open(src.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BrokenImage(e.strerror or type(e).__name__) from None
    return normalise(data, os.path.splitext(src.path)[1], opts)


def write_shard(task: ShardTask, work_dir: str, opts: ImageOptions, strict: bool, progress=None) -> dict:
    """Writes one shard, one image in memory at a time; returns its done-record."""
    shard = os.path.join(work_dir, task.name)
    tmp = shard + ".tmp"
    per_class = [0] * len(task.class_names)
    skipped, shape, uniform = [], None, True
    try:
        with TFRecordFile(tmp) as writer:
            for src in task.sources:
                try:
                    img = _read(src, opts)
                except BrokenImage as e:
                    if strict:
                        raise DataError(f"cannot use image {src.path!r}: {e}") from None
                    skipped.append({"path": src.path, "reason": str(e)})
                    continue
                finally:
                    if progress is not None:
                        with progress.get_lock():
                            progress.value += 1
                writer.write(encode_example(
                    img.data, img.format, img.shape, src.label, task.class_names[src.label], src.example_id,
                    original_size=img.original_size,
                ))
                per_class[src.label] += 1
                shape = shape or img.shape
                uniform = uniform and img.shape == shape
        done = {
            "file": task.name, "key": task.key(opts), "sha256": sha256_file(tmp), "num_examples": sum(per_class),
            "per_class": per_class, "shape": list(shape) if shape and uniform else None, "skipped": skipped,
            "uniform": uniform,
        }
        os.replace(tmp, shard)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic.write_text(shard + DONE_SUFFIX, json.dumps(done))
    return done


class Progress:
    """Images done out of a total: a live line on a terminal, a log line every 30 s otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and total > 0
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 30.0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"{done}/{self.total} images ({100 * done / self.total:.0f}%), {rate:.0f} images/s"
        if self.tty:
            sys.stderr.write(f"\r{line}" + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info("%s", line)


_worker_progress = None


def _init_worker(progress) -> None:
    global _worker_progress
    _worker_progress = progress


def _run_one(args) -> dict:
    task, work_dir, opts, strict = args
    return write_shard(task, work_dir, opts, strict, _worker_progress)


def run_tasks(
    tasks: list[ShardTask], work_dir: str, opts: ImageOptions, strict: bool, workers: int, show_progress: bool
) -> int:
    """Writes every task's shard that is not already complete; returns how many were reused."""
    pending = [t for t in tasks if completed(t, work_dir, opts) is None]
    reused = len(tasks) - len(pending)
    if reused:
        log.info("resuming: %d of %d shards are already complete and verified", reused, len(tasks))
    bar = Progress(sum(len(t.sources) for t in pending), show_progress)
    if workers <= 1 or len(pending) <= 1:
        counter = multiprocessing.Value("q", 0)
        for t in pending:
            write_shard(t, work_dir, opts, strict, counter)
            bar.update(counter.value)
        bar.update(counter.value, final=True)
        return reused
    # forkserver: workers must not inherit MPI or thread state from this
    # process; the server imports this module once and forks every worker from it.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    counter = ctx.Value("q", 0)
    with ctx.Pool(min(workers, len(pending)), initializer=_init_worker, initargs=(counter,)) as pool:
        results = pool.imap_unordered(_run_one, [(t, work_dir, opts, strict) for t in pending])
        for _ in range(len(pending)):
            while True:
                try:
                    results.next(timeout=0.2)
                    break
                except multiprocessing.TimeoutError:
                    bar.update(counter.value)
            bar.update(counter.value)
    bar.update(counter.value, final=True)
    return reused
