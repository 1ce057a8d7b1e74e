"""`metadata.json`: what a shard folder holds, written by build_shards."""

import hashlib
import json
import os

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
    for key in ("class_names", "image_shape", "splits"):
        if key not in meta:
            raise DataError(f"{path!r} has no {key!r}")
    for split in SPLITS:
        shards = meta["splits"].get(split, {}).get("shards", [])
        for shard in shards:
            if not os.path.isfile(os.path.join(data_dir, shard["file"])):
                raise DataError(f"shard {shard['file']!r} listed in {path!r} is missing")
    if not meta["splits"].get("train", {}).get("shards"):
        raise DataError(f"no train shards in {data_dir!r}")
    return meta


def num_examples(meta: dict, split: str) -> int:
    return int(meta["splits"].get(split, {}).get("num_examples", 0))


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
