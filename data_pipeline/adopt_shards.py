"""Adopts existing ImageNet-format TFRecord shards: writes the metadata.json the trainer reads, and nothing else.

    python -m data_pipeline.adopt_shards DIR [--synsets FILE] [--label-offset auto|0|1] [--force]

DIR holds shards in the layout of the TPU / Model Garden ImageNet converter
(imagenet_to_gcs.py): `train-00000-of-01024` ... and `validation-00000-of-00128`
..., no extension, each record a tf.train.Example with `image/encoded` (a JPEG
as the converter stored it), `image/class/label` counted from 1,
`image/class/synset` and the converter's other features. Every shard is read
once, in place (none is modified, copied or renamed): its records are counted
and CRC-checked, the file hashed (SHA-256, so data.verify_checksums works as
for build_shards' shards), and the labels and synsets collected. The class
names come from `--synsets` (one synset per line, in label order, as the
converter's imagenet_lsvrc_2015_synsets.txt) or from the records' synsets.

`--label-offset auto` shifts labels by 1 when their minimum is 1 and their
maximum the class count (the converter's, with 0 the unused background);
metadata.json records the offset and the reader subtracts it. The shards hold
the images as their converter stored them, so metadata.json records the
normalisation `as_stored`: the serving export decodes a served file as the
reader decodes a record.

Bad input (no such shards, a missing or unreadable shard, labels the class
count does not allow, a synsets file that does not fit the records, an
existing metadata.json without --force) is one line and exit 2, and no
metadata.json is written.
"""

import hashlib
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from data_pipeline import atomic
from data_pipeline.arguments import ArgumentParser
from data_pipeline.metadata import FORMAT_VERSION, METADATA_FILE, DataError
from data_pipeline.normalisation import AS_STORED
from data_pipeline.record_reader import RecordError, example_features, read_records
from data_pipeline.textfile import TextFileError, read_utf8

log = logging.getLogger("data_pipeline.adopt_shards")

LAYOUT = "imagenet_tfrecord"
SHARD_NAME = re.compile(r"(train|validation)-(\d{5})-of-(\d{5})")
_FEATURES = ("image/encoded", "image/class/label", "image/class/synset", "image/class/text", "image/height",
             "image/width")


@dataclass
class ShardScan:
    """What one pass over a shard found."""

    file: str
    num_examples: int = 0
    sha256: str = ""
    labels: Counter = field(default_factory=Counter)
    synsets: dict = field(default_factory=dict)  # label -> synset
    texts: dict = field(default_factory=dict)  # label -> image/class/text
    sizes: set = field(default_factory=set)  # (height, width)


def find_shards(data_dir: str) -> dict[str, list[str]]:
    """The shard file names of each split, in order; DataError when there are none or one is missing."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir!r} is not a folder")
    found: dict[str, dict[int, int]] = {}
    for name in os.listdir(data_dir):
        m = SHARD_NAME.fullmatch(name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = int(m.group(3))
    if "train" not in found:
        raise DataError(f"{data_dir!r} holds no train shards named like train-00000-of-01024 "
                        "(the ImageNet converter's layout)")
    splits = {}
    for split, shards in sorted(found.items()):
        totals = sorted(set(shards.values()))
        if len(totals) > 1:
            raise DataError(f"{data_dir!r}: {split} shards of {totals[0]} and of {totals[1]} files")
        total = totals[0]
        for index in range(total):
            if index not in shards:
                raise DataError(f"shard {split}-{index:05d}-of-{total:05d} is missing from {data_dir!r} "
                                f"({len(shards)} of {total} present)")
        if max(shards) >= total:
            raise DataError(f"shard {split}-{max(shards):05d}-of-{total:05d} in {data_dir!r}: index past the count")
        splits[split] = [f"{split}-{i:05d}-of-{total:05d}" for i in range(total)]
    return splits


def _one(features: dict, key: str, where: str, required: bool = True):
    values = features.get(key, [])
    if len(values) != 1:
        if not required and not values:
            return None
        raise DataError(f"{where}: {key} holds {len(values)} values, expected 1")
    return values[0]


def scan_shard(data_dir: str, name: str) -> ShardScan:
    """One pass over a shard: count, SHA-256, labels and their synsets; DataError naming the shard if it fails."""
    path, scan, digest = os.path.join(data_dir, name), ShardScan(name), hashlib.sha256()
    try:
        for index, record in enumerate(read_records(path, digest)):
            where = f"shard {path!r}, record {index}"
            features = example_features(record, _FEATURES)
            label = _one(features, "image/class/label", where)
            if not isinstance(label, int) or not isinstance(_one(features, "image/encoded", where), bytes):
                raise DataError(f"{where}: image/class/label is not an int64 or image/encoded not bytes")
            scan.labels[label] += 1
            synset = _one(features, "image/class/synset", where, required=False)
            if synset is not None:
                synset = synset.decode("utf-8", "replace")
                if scan.synsets.setdefault(label, synset) != synset:
                    raise DataError(f"{where}: label {label} with synset {synset!r}, earlier records of label "
                                    f"{label} have {scan.synsets[label]!r}")
            text = _one(features, "image/class/text", where, required=False)
            if text is not None:
                scan.texts.setdefault(label, text.decode("utf-8", "replace"))
            size = (_one(features, "image/height", where, False), _one(features, "image/width", where, False))
            scan.sizes.add(size if None not in size else None)
            scan.num_examples += 1
    except RecordError as e:
        raise DataError(f"shard {path!r} is unreadable ({e}); no metadata.json written") from None
    except OSError as e:
        raise DataError(f"shard {path!r} cannot be read ({e.strerror}); no metadata.json written") from None
    scan.sha256 = digest.hexdigest()
    return scan


def read_synsets(path: str) -> list[str]:
    """The synsets file: one synset per line, in label order."""
    try:
        synsets = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    except TextFileError as e:
        raise DataError(f"--synsets {path!r}: {e}") from None
    if not synsets:
        raise DataError(f"--synsets {path!r}: holds no synsets")
    repeated = next((s for s, n in Counter(synsets).items() if n > 1), None)
    if repeated:
        raise DataError(f"--synsets {path!r}: {repeated!r} appears twice")
    return synsets


def decide_offset(low: int, high: int, num_classes: int, requested: str) -> tuple[int, str]:
    """The label offset (0 or 1) and the log line saying why; DataError when the labels do not fit it."""
    if requested == "auto":
        offset = 1 if low == 1 and high == num_classes else 0
        why = (f"labels {low}..{high} with {num_classes} classes are counted from 1 (0 the unused background): "
               "each label is read as label - 1" if offset else
               f"labels {low}..{high} with {num_classes} classes are counted from 0: read as they are")
        why = f"label offset {offset} (auto): {why}"
    else:
        offset = int(requested)
        why = f"label offset {offset} (--label-offset): labels {low}..{high} read as {low - offset}..{high - offset}"
    if low - offset < 0 or high - offset >= num_classes:
        raise DataError(f"labels {low}..{high} do not fit {num_classes} classes at label offset {offset} "
                        f"(labels {offset}..{num_classes - 1 + offset} allowed); check --synsets or --label-offset")
    return offset, why


def class_names(scans: list[ShardScan], synsets_path: str | None, requested: str) -> tuple[list[str], int, str]:
    """The class names in label order, the label offset and the line saying how it was decided."""
    by_label: dict[int, str] = {}
    for scan in scans:
        for label, synset in scan.synsets.items():
            if by_label.setdefault(label, synset) != synset:
                raise DataError(f"label {label} has synset {synset!r} in {scan.file!r} and {by_label[label]!r} "
                                "in an earlier shard")
    labels = sorted({label for scan in scans for label in scan.labels})
    if not labels:
        raise DataError("the shards hold no records")
    if synsets_path:
        names = read_synsets(synsets_path)
    else:
        unnamed = [label for label in labels if label not in by_label]
        if unnamed:
            raise DataError(f"records of label {unnamed[0]} have no image/class/synset: give the class names "
                            "with --synsets FILE")
        names = [by_label[label] for label in labels]
        twice = next((s for s, n in Counter(names).items() if n > 1), None)
        if twice:
            raise DataError(f"synset {twice!r} has two labels in the records: give the class names with --synsets")
    offset, why = decide_offset(labels[0], labels[-1], len(names), requested)
    if not synsets_path and labels != list(range(offset, offset + len(names))):
        raise DataError(f"labels {labels[0]}..{labels[-1]} skip some: give the class names with --synsets FILE")
    for label, synset in sorted(by_label.items()):
        if names[label - offset] != synset:
            raise DataError(f"--synsets {synsets_path!r} ({len(names)} synsets): line {label - offset + 1} is "
                            f"{names[label - offset]!r}, but the records of label {label} have synset {synset!r}: "
                            "not the converter's synsets file, or not its --label-offset")
    return names, offset, why


def _split_record(scans: list[ShardScan], names: list[str], offset: int) -> dict:
    per_class = Counter()
    for scan in scans:
        per_class.update(scan.labels)
    return {"num_examples": sum(s.num_examples for s in scans),
            "per_class": {name: per_class.get(i + offset, 0) for i, name in enumerate(names)},
            "labels": [min(per_class), max(per_class)] if per_class else [],
            "shards": [{"file": s.file, "num_examples": s.num_examples, "sha256": s.sha256} for s in scans]}


def adopt(data_dir: str, synsets_path: str | None = None, label_offset: str = "auto", force: bool = False) -> dict:
    """Reads the shards of `data_dir` and writes its metadata.json; returns it. DataError for bad input."""
    if label_offset not in ("auto", "0", "1"):
        raise DataError(f"--label-offset {label_offset!r}: must be auto, 0 or 1")
    path = os.path.join(data_dir, METADATA_FILE)
    shards = find_shards(data_dir)
    if os.path.exists(path) and not force:
        raise DataError(f"{path!r} already exists: it is kept (pass --force to replace it)")
    scans = {split: [scan_shard(data_dir, name) for name in names] for split, names in shards.items()}
    names, offset, why = class_names([s for split in scans.values() for s in split], synsets_path, label_offset)
    log.info("%s", why)
    sizes = {size for split in scans.values() for s in split for size in s.sizes}
    texts = {label: text for split in scans.values() for s in split for label, text in s.texts.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "class_names": names,
        "num_classes": len(names),
        # The converter keeps each JPEG's own size: null unless every image has the same one.
        "image_shape": [*sizes.pop(), 3] if len(sizes) == 1 and None not in sizes else None,
        "channels": 3,  # the converter stores RGB JPEGs (a gray JPEG as it is; the reader decodes it to RGB)
        "splits": {split: _split_record(s, names, offset) for split, s in scans.items()},
        "label_offset": offset,
        "normalisation": AS_STORED,
        "adopted": {"layout": LAYOUT, "synsets": synsets_path and os.path.abspath(synsets_path),
                    "label_offset": label_offset, "decision": why,
                    "class_texts": [texts.get(i + offset, "") for i in range(len(names))] if texts else None},
    }
    atomic.write_json(path, meta, durable=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m data_pipeline.adopt_shards", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder of train-00000-of-01024, ..., validation-00000-of-00128, ... shards")
    p.add_argument("--synsets",
                   help="class names: one synset per line, in label order (imagenet_lsvrc_2015_synsets.txt)")
    p.add_argument("--label-offset", default="auto", choices=("auto", "0", "1"),
                   help="subtracted from every label (auto: 1 when the labels run from 1 to the class count)")
    p.add_argument("--force", action="store_true", help="replace an existing metadata.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = adopt(args.dir, args.synsets, args.label_offset, args.force)
    except DataError as e:
        print(f"adopt_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # metadata.json could not be written (a read-only folder, a full disk)
        print(f"adopt_shards: error: {e.strerror}: {e.filename!r}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{s}={m['num_examples']} in {len(m['shards'])} shards" for s, m in meta["splits"].items())
    log.info("wrote %s: %d classes, %s", os.path.join(args.dir, METADATA_FILE), meta["num_classes"], counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
