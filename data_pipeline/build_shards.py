"""Converts an image folder (or a CSV of `path,label`) into TFRecord shards.

    python -m data_pipeline.build_shards --images DIR --out DIR \
        --num-shards 8 --val-fraction 0.2 [--workers N] [--max-side 512]
    mpirun -np 4 python -m data_pipeline.build_shards --images DIR --out DIR ...

The output folder holds `train-0000i-of-0000N.tfrecord` and `validation-...`
shards plus `metadata.json` (class names, counts per split and class, per-shard
counts and checksums, skipped files, and the options used).

The split and the record order are fixed by `--seed`: the same input and
options give byte-identical shards, whatever the number of workers or MPI
ranks. Work happens in `<out>.partial`, which is renamed to `<out>` when
complete; an interrupted run leaves it there, and the same command resumes it
without rewriting completed shards. An existing output is only replaced with
`--overwrite`.
"""

import logging
import math
import os
import signal
import sys

from data_pipeline.arguments import ArgumentParser
from data_pipeline.cluster import Group, local_size, make_group
from data_pipeline.collective import on_root
from data_pipeline.images import ENCODINGS, MAX_PIXELS, ImageOptions
from data_pipeline.metadata import METADATA_FILE, DataError
from data_pipeline.shard_output import collect_metadata, publish
from data_pipeline.shard_plan import plan, plan_fingerprint, prepare_work_dir
from data_pipeline.shard_writer import ShardTask, run_tasks
from data_pipeline.sources import scan_csv, scan_folder

log = logging.getLogger("data_pipeline.build_shards")

SKIPPED_SHOWN = 20


def _check(num_shards, val_fraction, num_val_shards, shard_size_mb, workers, opts: ImageOptions) -> None:
    checks = [
        (num_shards >= 1, f"--num-shards must be at least 1, got {num_shards}"),
        (0 <= val_fraction < 1, f"--val-fraction must be in [0, 1), got {val_fraction}"),
        (num_val_shards >= 0, f"--num-val-shards must be at least 0, got {num_val_shards}"),
        (0 <= shard_size_mb < math.inf, f"--shard-size-mb must be a number >= 0, got {shard_size_mb}"),
        (workers >= 1, f"--workers must be at least 1, got {workers}"),
        (opts.channels in (1, 3), f"--channels must be 1 or 3, got {opts.channels}"),
        (opts.encoding in ENCODINGS, f"--encoding must be one of {', '.join(ENCODINGS)}, got {opts.encoding!r}"),
        (1 <= opts.jpeg_quality <= 100, f"--jpeg-quality must be in [1, 100], got {opts.jpeg_quality}"),
        (opts.max_side >= 0, f"--max-side must be at least 0, got {opts.max_side}"),
        (opts.max_pixels >= 1, f"--max-pixels must be at least 1, got {opts.max_pixels}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


def _relation(path: str, src: str) -> str | None:
    """How `path` lies to the folder `src`, after resolving symlinks: "is", "is inside", "holds" or None."""
    real, src = os.path.realpath(path), os.path.realpath(src)
    common = os.path.commonpath([real, src])
    if common not in (real, src):
        return None
    return "is" if real == src else "is inside" if common == src else "holds"


def _outputs(out_dir: str) -> tuple[tuple[str, str], ...]:
    return ("--out", out_dir), ("its work folder", f"{out_dir}.partial")


def _refuse(what: str, path: str, relation: str, source: str) -> None:
    raise DataError(f"{what} {path!r} {relation} {source}: writing there would delete the input; "
                    "choose an output folder outside it")


def _check_input_kept(images_dir: str | None, csv_path: str | None, out_dir: str) -> None:
    """Refuses an output or work folder that is, holds or lies in the input folder (for --csv: that is or holds
    the CSV's folder), since publishing or --overwrite replaces it. A symlink to the input is caught too."""
    for what, path in _outputs(out_dir):
        if images_dir is not None and (relation := _relation(path, images_dir)):
            _refuse(what, path, relation, f"--images {images_dir!r}")
        csv_dir = csv_path and os.path.dirname(os.path.abspath(csv_path))
        if csv_dir and (relation := _relation(path, csv_dir)) in ("is", "holds"):
            _refuse(what, path, relation, f"the folder of --csv {csv_path!r}")


def _check_listed_files_kept(inv, csv_path: str, out_dir: str) -> None:
    """--out may lie in the CSV's folder, but must hold none of the files the CSV lists."""
    folders = {os.path.dirname(s.path) for sources in inv.splits.values() for s in sources}
    for what, path in _outputs(out_dir):
        for folder in sorted(folders):
            if (relation := _relation(path, folder)) in ("is", "holds"):
                _refuse(what, path, relation, f"{folder!r}, listed in --csv {csv_path!r}")


def _os_error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename!r}"
    return str(e)


def _collective(group: Group, fn):
    """Runs fn on rank 0 and gives every rank its result, or the same DataError.

    An unreadable folder or a full disk (OSError) becomes one line too, and no rank is left waiting.
    """
    return on_root(group.is_main, group.bcast, fn, DataError, catch=(OSError,), describe=_os_error_line)


def _write_my_shards(tasks: list[ShardTask], work_dir: str, opts: ImageOptions, strict: bool, workers: int,
                     group: Group) -> str | None:
    """Writes this rank's share of the shards; returns the error to report, or None."""
    mine = tasks[group.rank::group.size]
    if group.size > 1:
        log.info("rank %d of %d: %d of %d shards", group.rank, group.size, len(mine), len(tasks))
    try:
        run_tasks(mine, work_dir, opts, strict, workers, show_progress=group.is_main)
    except DataError as e:
        return str(e)
    except OSError as e:  # disk full, permissions: reported like bad input, so no rank waits forever
        return f"rank {group.rank}: {e}"
    except BaseException:
        log.warning("interrupted: the completed shards in %s are kept; rerun the same command to resume", work_dir)
        raise
    return None


def build(
    images_dir: str | None,
    out_dir: str,
    num_shards: int = 8,
    val_fraction: float = 0.1,
    num_val_shards: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    *,
    csv_path: str | None = None,
    image_options: ImageOptions = ImageOptions(),
    shard_size_mb: float = 0,
    keep_empty_classes: bool = False,
    strict: bool = False,
    workers: int = 1,
    group: Group | None = None,
) -> dict:
    """Converts `images_dir` (or the files listed in `csv_path`) into shards under
    `out_dir`; returns the metadata written. Under MPI every rank calls it with
    the same arguments; rank 0 scans, plans and writes metadata.json."""
    group = group or Group()
    opts = image_options
    _check(num_shards, val_fraction, num_val_shards, shard_size_mb, workers, opts)
    if (images_dir is None) == (csv_path is None):
        raise DataError("give either --images or --csv")
    _check_input_kept(images_dir, csv_path, out_dir)
    out_dir = os.path.abspath(out_dir)
    work_dir = f"{out_dir}.partial"
    if os.path.exists(out_dir) and not overwrite:
        raise DataError(f"output folder {out_dir!r} already exists (pass --overwrite to replace it)")

    def scan_and_plan():
        inv = scan_csv(csv_path) if csv_path else scan_folder(images_dir, keep_empty_classes)
        if csv_path:
            _check_listed_files_kept(inv, csv_path, out_dir)
        tasks = plan(inv, num_shards, num_val_shards, val_fraction, seed, shard_size_mb)
        prepare_work_dir(work_dir, plan_fingerprint(tasks, opts), overwrite)
        return inv, tasks

    inv, tasks = _collective(group, scan_and_plan)
    errors = group.gather(_write_my_shards(tasks, work_dir, opts, strict, workers, group))
    options = {"images": images_dir and os.path.abspath(images_dir), "csv": csv_path and os.path.abspath(csv_path),
               "num_shards": num_shards, "num_val_shards": num_val_shards, "val_fraction": val_fraction,
               "seed": seed, "shard_size_mb": shard_size_mb, "keep_empty_classes": keep_empty_classes,
               "strict": strict}

    def finish():
        first = next((e for e in errors if e), None)
        if first:
            raise DataError(first)
        meta = collect_metadata(tasks, inv, work_dir, opts, options)
        publish(tasks, meta, work_dir, out_dir)
        return meta

    return _collective(group, finish)


def report(meta: dict, out: str) -> None:
    counts = ", ".join(f"{s}={m['num_examples']}" for s, m in meta["splits"].items())
    log.info("wrote %s: %d classes, %s, image shape %s", out, meta["num_classes"], counts, meta["image_shape"])
    ignored = meta["ignored"]
    if any(ignored.values()):
        log.info("ignored %d hidden and %d non-image files", ignored["hidden"], ignored["not_image"])
    if meta["skipped"]:
        log.warning("skipped %d broken files (all listed under 'skipped' in %s):", len(meta["skipped"]),
                    os.path.join(out, METADATA_FILE))
        for s in meta["skipped"][:SKIPPED_SHOWN]:
            log.warning("  %s: %s", s["path"], s["reason"])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m data_pipeline.build_shards", description=__doc__.split("\n")[0])
    p.add_argument("--images", help="folder with one subfolder per class (or train/ and validation/ of those)")
    p.add_argument("--csv", help="CSV of path,label rows instead of --images; paths relative to the CSV")
    p.add_argument("--out", required=True, help="output folder for shards and metadata.json")
    p.add_argument("--num-shards", type=int, default=8, help="number of training shards")
    p.add_argument("--num-val-shards", type=int, default=0, help="validation shards (0: in proportion)")
    p.add_argument("--shard-size-mb", type=float, default=0,
                   help="target shard size instead of shard counts, estimated from the source files")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of each class kept for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the record order")
    p.add_argument("--channels", type=int, default=3, help="3: RGB records, 1: grayscale")
    p.add_argument("--encoding", default="auto", help="auto (keep JPEGs that need no change), jpeg or png")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs")
    p.add_argument("--max-side", type=int, default=0, help="resize so that the longer side is at most this")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"skip an image with more pixels than this, before decoding it (default {MAX_PIXELS}, "
                        "Pillow's own limit)")
    p.add_argument("--keep-empty-classes", action="store_true", help="keep class folders without images")
    p.add_argument("--strict", action="store_true", help="stop at the first broken file instead of skipping it")
    p.add_argument("--workers", type=int, default=0, help="worker processes per host (0: one per core)")
    p.add_argument("--mpi", choices=("auto", "yes", "no"), default="auto",
                   help="split the work across MPI ranks (auto: when started by mpirun or srun)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (scancel, a job's time limit) unwinds like Ctrl-C: the worker pool is
    # stopped and the completed shards are kept for a resume.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    group = None
    try:
        group = make_group(args.mpi)
        workers = args.workers or max(1, (os.cpu_count() or 1) // local_size())
        opts = ImageOptions(args.channels, args.encoding, args.jpeg_quality, args.max_side, args.max_pixels)
        meta = build(args.images, args.out, args.num_shards, args.val_fraction, args.num_val_shards, args.seed,
                     args.overwrite, csv_path=args.csv, image_options=opts, shard_size_mb=args.shard_size_mb,
                     keep_empty_classes=args.keep_empty_classes, strict=args.strict, workers=workers, group=group)
    except DataError as e:
        if group is None or group.is_main:
            print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    if group.is_main:
        report(meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
