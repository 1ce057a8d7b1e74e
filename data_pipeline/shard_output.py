"""The end of a conversion: metadata.json from the shards' done-records, and the output folder put in place."""

import json
import os
from dataclasses import asdict

from data_pipeline import atomic
from data_pipeline.images import ImageOptions, normalisation_record
from data_pipeline.metadata import FORMAT_VERSION, METADATA_FILE
from data_pipeline.shard_plan import PLAN_FILE
from data_pipeline.shard_writer import DONE_SUFFIX, ShardTask
from data_pipeline.sources import Inventory


def collect_metadata(tasks: list[ShardTask], inv: Inventory, work_dir: str, opts: ImageOptions, options: dict) -> dict:
    """metadata.json from the shards' done-records (which survive a resume)."""
    splits, skipped, shapes = {}, [], []
    for t in tasks:
        with open(os.path.join(work_dir, t.name + DONE_SUFFIX), encoding="utf-8") as f:
            done = json.load(f)
        s = splits.setdefault(t.split, {"num_examples": 0, "per_class": [0] * len(inv.class_names),
                                        "num_skipped": 0, "shards": []})
        s["num_examples"] += done["num_examples"]
        s["num_skipped"] += len(done["skipped"])
        s["per_class"] = [a + b for a, b in zip(s["per_class"], done["per_class"])]
        s["shards"].append({"file": t.name, "num_examples": done["num_examples"], "sha256": done["sha256"]})
        skipped.extend(done["skipped"])
        if done["num_examples"]:
            shapes.append(tuple(done["shape"]) if done["shape"] else None)
    for s in splits.values():
        s["per_class"] = dict(zip(inv.class_names, s["per_class"]))
    shape = shapes[0] if shapes and None not in shapes and len(set(shapes)) == 1 else None
    return {
        "format_version": FORMAT_VERSION,
        "class_names": inv.class_names,
        "num_classes": len(inv.class_names),
        # [h, w, c] when every image has the same size; otherwise null and the
        # model's input size must be set in the config.
        "image_shape": list(shape) if shape else None,
        "channels": opts.channels,
        "splits": splits,
        "skipped": sorted(skipped, key=lambda x: x["path"]),
        "ignored": inv.ignored,
        "empty_classes": inv.empty_classes,
        "options": {**options, **asdict(opts)},
        # What the serving export must repeat on an original file to give the model these pixels.
        "normalisation": normalisation_record(opts),
    }


def publish(tasks: list[ShardTask], meta: dict, work_dir: str, out_dir: str) -> None:
    """Writes metadata.json into the work folder, drops the resume files, and moves it to `out_dir`."""
    for t in tasks:
        os.remove(os.path.join(work_dir, t.name + DONE_SUFFIX))
    os.remove(os.path.join(work_dir, PLAN_FILE))
    atomic.write_json(os.path.join(work_dir, METADATA_FILE), meta)
    atomic.replace_dir(work_dir, out_dir)

