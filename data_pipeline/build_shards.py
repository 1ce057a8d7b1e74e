"""Converts a class-per-subfolder image folder into TFRecord shards.

    python -m data_pipeline.build_shards --images DIR --out DIR \
        --num-shards 8 --val-fraction 0.2

The output folder holds `train-0000i-of-0000N.tfrecord` and
`validation-...` shards plus `metadata.json` (class names, counts per split and
class, per-shard counts and checksums, image shape, and the options used).

The split is stratified and fixed by `--seed`: the same folder and options give
the same shards. The output is written to a temporary sibling folder and renamed
into place when complete, so an interrupted run never leaves a half-written
output, and an existing output is only replaced with `--overwrite`.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np

from data_pipeline.metadata import FORMAT_VERSION, METADATA_FILE, DataError, shard_name

log = logging.getLogger("data_pipeline.build_shards")

# Formats tf.io.decode_image reads; the value is the record's `image/format`.
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".bmp": "bmp"}


@dataclass(frozen=True)
class Source:
    path: str
    example_id: str  # path relative to the image folder: stable across machines
    label: int


def scan_folder(images_dir: str) -> tuple[list[str], list[Source]]:
    """Lists classes (sorted subfolder names) and their image files, in a fixed order."""
    if not os.path.isdir(images_dir):
        raise DataError(f"image folder {images_dir!r} does not exist")
    class_names = sorted(
        d for d in os.listdir(images_dir) if not d.startswith(".") and os.path.isdir(os.path.join(images_dir, d))
    )
    if not class_names:
        raise DataError(f"image folder {images_dir!r} has no class subfolders")
    sources = []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(images_dir, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(dirpath, fname)
                found.append(Source(path, os.path.relpath(path, images_dir), label))
        if not found:
            raise DataError(f"class folder {name!r} in {images_dir!r} has no images")
        sources.extend(sorted(found, key=lambda s: s.example_id))
    return class_names, sources


def stratified_split(sources: list[Source], val_fraction: float, seed: int) -> tuple[list[Source], list[Source]]:
    """Puts round(n * val_fraction) images of each class into validation, chosen by `seed`."""
    by_class: dict[int, list[Source]] = {}
    for s in sources:
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = np.random.default_rng([seed, label]).permutation(len(items))
        n_val = int(round(len(items) * val_fraction))
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)  # every class on both sides of the split
        val.extend(items[i] for i in order[:n_val])
        train.extend(items[i] for i in order[n_val:])
    return train, val


def _read_image(src: Source) -> tuple[bytes, str, tuple[int, int, int]]:
    import tensorflow as tf

    with open(src.path, "rb") as f:
        data = f.read()
    try:
        shape = tuple(int(d) for d in tf.io.decode_image(data, expand_animations=False).shape)
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot decode image {src.path!r}: {reason}") from None
    return data, IMAGE_EXTENSIONS[os.path.splitext(src.path)[1].lower()], shape


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(
    sources: list[Source], out_dir: str, split: str, num_shards: int, class_names: list[str], seed: int
) -> tuple[dict, set]:
    """Writes one split, record i of a seeded permutation going to shard i % num_shards.

    Streams one image at a time, so memory does not grow with the data set.
    Returns the split's metadata and the set of image shapes seen.
    """
    import tensorflow as tf

    from data_pipeline.records import encode_example

    order = np.random.default_rng([seed, len(split)]).permutation(len(sources))
    names = [shard_name(split, i, num_shards) for i in range(num_shards)]
    counts = [0] * num_shards
    per_class = [0] * len(class_names)
    shapes = set()
    writers = [tf.io.TFRecordWriter(os.path.join(out_dir, n)) for n in names]
    try:
        for i, idx in enumerate(order):
            src = sources[idx]
            data, fmt, shape = _read_image(src)
            shapes.add(shape)
            record = encode_example(data, fmt, shape, src.label, class_names[src.label], src.example_id)
            writers[i % num_shards].write(record)
            counts[i % num_shards] += 1
            per_class[src.label] += 1
    finally:
        for w in writers:
            w.close()
    shards = [
        {"file": n, "num_examples": c, "sha256": _sha256(os.path.join(out_dir, n))} for n, c in zip(names, counts)
    ]
    meta = {
        "num_examples": len(sources),
        "per_class": dict(zip(class_names, per_class)),
        "shards": shards,
    }
    return meta, shapes


def build(
    images_dir: str,
    out_dir: str,
    num_shards: int,
    val_fraction: float,
    num_val_shards: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Converts `images_dir` into shards under `out_dir`; returns the metadata written."""
    if num_shards < 1:
        raise DataError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if num_val_shards < 0:
        raise DataError(f"--num-val-shards must be at least 0, got {num_val_shards}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise DataError(f"output folder {out_dir!r} already exists (pass --overwrite to replace it)")

    class_names, sources = scan_folder(images_dir)
    train, val = stratified_split(sources, val_fraction, seed)
    if len(train) < num_shards:
        raise DataError(f"--num-shards {num_shards} is more than the {len(train)} training images")
    if not num_val_shards:
        num_val_shards = max(1, round(num_shards * val_fraction / (1 - val_fraction)))
    num_val_shards = min(num_val_shards, max(1, len(val)))

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(tmp_dir, mode=0o750)
    try:
        splits, shapes = {}, set()
        for split, items, n in (("train", train, num_shards), ("validation", val, num_val_shards)):
            if items:
                splits[split], seen = write_split(items, tmp_dir, split, n, class_names, seed)
                shapes |= seen
        channels = 1 if all(c in (1, 2) for _, _, c in shapes) else 3
        shape = next(iter(shapes)) if len(shapes) == 1 else None
        meta = {
            "format_version": FORMAT_VERSION,
            "class_names": class_names,
            "num_classes": len(class_names),
            # [h, w, c] when every image has the same size; otherwise null and the
            # model's input size must be set in the config.
            "image_shape": [shape[0], shape[1], channels] if shape else None,
            "channels": channels,
            "splits": splits,
            "options": {
                "images": os.path.abspath(images_dir),
                "num_shards": num_shards,
                "num_val_shards": num_val_shards,
                "val_fraction": val_fraction,
                "seed": seed,
            },
        }
        with open(os.path.join(tmp_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return meta


def _replace_dir(new: str, target: str) -> None:
    """Moves `new` to `target`; an old `target` is removed only once `new` is in place."""
    old = None
    if os.path.exists(target):
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.build_shards", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder with one subfolder of images per class")
    parser.add_argument("--out", required=True, help="output folder for shards and metadata.json")
    parser.add_argument("--num-shards", type=int, default=8, help="number of training shards")
    parser.add_argument("--num-val-shards", type=int, default=0, help="validation shards (0: in proportion)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of each class kept for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the record order")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = build(
            args.images, args.out, args.num_shards, args.val_fraction, args.num_val_shards, args.seed, args.overwrite
        )
    except DataError as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s}={m['num_examples']}" for s, m in meta["splits"].items())
    log.info("wrote %s: %d classes, %s, image shape %s", args.out, meta["num_classes"], counts, meta["image_shape"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
