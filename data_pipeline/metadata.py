"""`metadata.json`: what a shard folder holds, written by build_shards."""

import hashlib
import json
import os
import re

from data_pipeline import normalisation

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


class DataError(ValueError):
    """A data folder, shard or image that cannot be used; the message names it."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def load_metadata(data_dir: str) -> dict:
    """Reads and checks `metadata.json`; raises DataError naming what is wrong."""
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder {data_dir!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is missing: build shards with python -m data_pipeline.build_shards")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path!r} is not readable JSON: {e}") from None
    check_metadata(meta, path)
    for split in SPLITS:
        shards = meta["splits"].get(split, {}).get("shards", [])
        for shard in shards:
            if not os.path.isfile(os.path.join(data_dir, shard["file"])):
                raise DataError(f"shard {shard['file']!r} listed in {path!r} is missing")
    if not meta["splits"].get("train", {}).get("shards"):
        raise DataError(f"no train shards in {data_dir!r}")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_metadata(meta, path: str) -> None:
    """Checks that `meta` holds what the reader and the trainer use, of the right types and consistent.

    A metadata.json edited by hand, cut short or written by another tool then
    stops the run with one line naming the key, not a KeyError deep inside.
    """
    def fail(what: str):
        raise DataError(f"{path!r}: {what}")

    if not isinstance(meta, dict):
        fail("expected a JSON object")
    for key in ("class_names", "image_shape", "channels", "splits"):
        if key not in meta:
            fail(f"has no {key!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if not _is_count(version) or not 1 <= version <= FORMAT_VERSION:
        fail(f"format_version={version!r}: this code reads versions 1 to {FORMAT_VERSION}; rebuild the shards with it")
    names = meta["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        fail(f"class_names={names!r}: expected a non-empty list of names")
    if len(set(names)) != len(names):
        fail(f"class_names={names!r}: a name appears twice")
    num_classes = meta.get("num_classes", len(names))
    if not _is_count(num_classes) or num_classes != len(names):
        fail(f"num_classes={num_classes!r}: class_names has {len(names)}")
    # Not `in (1, 3)` alone: True == 1 and 3.0 == 3.
    if not _is_count(meta["channels"]) or meta["channels"] not in (1, 3):
        fail(f"channels={meta['channels']!r}: expected 1 or 3")
    shape = meta["image_shape"]
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                  and all(_is_count(d) and d > 0 for d in shape)):
        fail(f"image_shape={shape!r}: expected null or [height, width, channels]")
    if not isinstance(meta["splits"], dict):
        fail("splits: expected an object")
    files = set()
    for split in SPLITS:
        info = meta["splits"].get(split, {})
        if not isinstance(info, dict):
            fail(f"splits.{split}={info!r}: expected an object")
        for shard in _checked_shards(info.get("shards", []), f"splits.{split}.shards", fail):
            if shard["file"] in files:
                fail(f"splits.{split}.shards: {shard['file']!r} is listed twice")
            files.add(shard["file"])
        total = sum(s["num_examples"] for s in info.get("shards", []))
        count = info.get("num_examples", total)
        if not _is_count(count) or count != total:
            fail(f"splits.{split}.num_examples={count!r}: its shards hold {total}")
    # Adopted shards (data_pipeline.adopt_shards) keep labels counted from 1: the reader subtracts this.
    offset = meta.get("label_offset", 0)
    if not _is_count(offset) or offset not in (0, 1):
        fail(f"label_offset={offset!r}: expected 0 or 1")
    try:  # read again by the serving export, at the end of training: a bad record must stop the start
        normalisation.from_metadata(meta)
    except ValueError as e:
        fail(str(e))


def _checked_shards(shards, where: str, fail) -> list:
    """The shard entries, each a {file, num_examples[, sha256]} whose file is a name in the data folder."""
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and _is_count(s.get("num_examples"))
        for s in shards
    ):
        fail(f"{where}: expected a list of {{file, num_examples}}")
    for s in shards:
        # A bare name: a path would read a file outside the data folder.
        if not s["file"] or s["file"] in (".", "..") or "/" in s["file"] or os.sep in s["file"]:
            fail(f"{where}: file {s['file']!r} is not a file name in the data folder")
        if "sha256" in s and not (isinstance(s["sha256"], str) and _SHA256.fullmatch(s["sha256"])):
            fail(f"{where}: sha256 {s['sha256']!r} of {s['file']!r} is not 64 hexadecimal digits")
    return shards


def num_examples(meta: dict, split: str) -> int:
    return int(meta["splits"].get(split, {}).get("num_examples", 0))


def label_offset(meta: dict) -> int:
    """What the reader subtracts from every stored label: 1 for shards whose labels count from 1 (adopted), else 0."""
    return int(meta.get("label_offset", 0))


def shard_files(data_dir: str, meta: dict, split: str) -> list[str]:
    """Shard paths of a split, in the order the writer numbered them."""
    return [os.path.join(data_dir, s["file"]) for s in meta["splits"].get(split, {}).get("shards", [])]


def sha256_file(path: str) -> str:
    """The checksum metadata.json holds for each shard."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corrupt_shards(data_dir: str, meta: dict, num_shards: int = 1, shard_index: int = 0) -> list[str]:
    """Shards among this pipeline's share (every num_shards-th) whose SHA-256 differs from metadata.json."""
    listed = [s for split in SPLITS for s in meta["splits"].get(split, {}).get("shards", [])]
    return [
        os.path.join(data_dir, s["file"])
        for s in listed[shard_index::num_shards]
        if "sha256" in s and sha256_file(os.path.join(data_dir, s["file"])) != s["sha256"]
    ]
