"""The conversion plan: which image goes into which shard, and the work folder that holds it.

The plan is a pure function of the inventory, the options and the seed, so an
interrupted conversion is recognised (and resumed) by its fingerprint in
`<out>.partial/plan.json`.
"""

import json
import math
import os
import shutil

import numpy as np

from data_pipeline import atomic
from data_pipeline.images import ImageOptions
from data_pipeline.metadata import DataError
from data_pipeline.shard_writer import ShardTask
from data_pipeline.sources import Inventory, Source, stratified_split

PLAN_FILE = "plan.json"


def _shard_count(items: list[Source], requested: int, shard_size_mb: float) -> int:
    if shard_size_mb:
        # Estimated from the source files: re-encoding and --max-side change the real size.
        requested = math.ceil(sum(max(s.size, 0) for s in items) / (shard_size_mb * 2**20))
    return max(1, min(requested, len(items)))


def plan(inv: Inventory, num_shards: int, num_val_shards: int, val_fraction: float, seed: int,
         shard_size_mb: float) -> list[ShardTask]:
    """Which image goes into which shard, in which order: record i of a seeded
    permutation of the split goes to shard i % shards."""
    if "validation" in inv.splits:
        train, val = inv.splits["train"], inv.splits["validation"]
    else:
        train, val = stratified_split(inv.splits["train"], val_fraction, seed)
    if not train:
        raise DataError("no training images found")
    if not shard_size_mb and len(train) < num_shards:
        raise DataError(f"--num-shards {num_shards} is more than the {len(train)} training images")
    if not num_val_shards:
        num_val_shards = max(1, round(num_shards * len(val) / len(train)))
    counts = {"train": _shard_count(train, num_shards, shard_size_mb),
              "validation": _shard_count(val, num_val_shards, shard_size_mb)}
    tasks = []
    for split, items in (("train", train), ("validation", val)):
        if not items:
            continue
        n = counts[split]
        order = np.random.default_rng([seed, len(split)]).permutation(len(items))
        for k in range(n):
            chosen = tuple(items[i] for i in order[k::n])
            tasks.append(ShardTask(split, k, n, chosen, tuple(inv.class_names)))
    return tasks


def plan_fingerprint(tasks: list[ShardTask], opts: ImageOptions) -> list[str]:
    return [t.key(opts) for t in tasks]


def prepare_work_dir(work_dir: str, fingerprint: list[str], overwrite: bool) -> None:
    """Creates the work folder, or checks that an interrupted one was doing the same conversion."""
    plan_path = os.path.join(work_dir, PLAN_FILE)
    if os.path.isdir(work_dir):
        try:
            with open(plan_path, encoding="utf-8") as f:
                same = json.load(f) == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return
        if not overwrite:
            raise DataError(
                f"{work_dir!r} holds an interrupted conversion of other files or options: rerun it with "
                "the same input and options to resume, or pass --overwrite to start over"
            )
        shutil.rmtree(work_dir)
    os.makedirs(os.path.dirname(work_dir), exist_ok=True)
    os.makedirs(work_dir, mode=0o750)
    atomic.write_json(plan_path, fingerprint)
