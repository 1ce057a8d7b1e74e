"""Input pipeline benchmarks, run by scripts/bench.py (`make bench`, or `--only loader,input`).

loader: the reader alone (data_pipeline.reader.train_stream) on ImageNet-like
  JPEGs (about 500x375) with the 224x224 training preprocessing (random resized
  crop, flip), in a process of its own with a tf.data pool of `threads`
  threads. `loader_images_per_sec_per_core` = images / CPU seconds the process
  used, which is images/s per fully used core.
input: trainer throughput (ResNet-20, 32x32, np=1) on real shards divided by
  the same run on synthetic in-memory tensors (`input_efficiency`), alternated
  within each repetition.

  With --unordered, the reader hands out whatever is ready first (the opt-out
  data.deterministic_order=false); bench.py's `loader` part runs both.

    python scripts/bench_input.py loader --shards DIR [--threads 1] [--seconds 20] [--unordered]
        [--image-size 224] [--recipe]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from bench_common import ROOT

sys.path.insert(0, ROOT)  # the loader subprocess imports data_pipeline from this checkout


def write_images(out: str, count: int, width: int, height: int, classes: int = 10, seed: int = 0) -> None:
    """JPEGs with smooth gradients, shapes and mild noise: about as compressible as photos."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        label = i % classes
        os.makedirs(os.path.join(out, f"class{label:02d}"), exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b + label), np.sin((xx + yy) * c)], -1) * 80 + 128
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(height / 8, height / 3)
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(-60, 60, 3)
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        with open(os.path.join(out, f"class{label:02d}", f"im{i:05d}.jpg"), "wb") as f:
            f.write(tf.io.encode_jpeg(pixels, quality=90).numpy())


def build_shards(images: str, out: str, num_shards: int) -> None:
    """Through the converter's own command line."""
    subprocess.run(
        [sys.executable, "-m", "data_pipeline.build_shards", "--images", images, "--out", out,
         "--num-shards", str(num_shards), "--val-fraction", "0.05"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )


def measure_loader(shards: str, threads: int, seconds: float, batch: int = 64, ordered: bool = True,
                   image_size: int = 224, recipe: bool = False) -> dict:
    """Images/s and images per CPU second of the training reader, after a warm-up.

    `ordered`: the default deterministic record order (data.deterministic_order).
    `recipe`: RandAugment (2 ops, magnitude 0.5) and mixup (0.2) on top of the crop and flip.
    """
    from data_pipeline.augment import Augment
    from data_pipeline.metadata import load_metadata, shard_files
    from data_pipeline.reader import train_stream
    from data_pipeline.stream_options import TrainOptions

    meta = load_metadata(shards)
    counts = [s["num_examples"] for s in meta["splits"]["train"]["shards"]]
    more = {"randaugment_layers": 2, "randaugment_magnitude": 0.5, "mixup_alpha": 0.2} if recipe else {}
    options = TrainOptions(
        per_replica_batch_size=batch, image_size=image_size, channels=3, seed=0, shuffle_buffer=1024,
        augment=Augment(random_resized_crop=True, crop_area_min=0.08, flip=True, **more), threads=threads,
        deterministic=ordered, num_records=10**9, shard_counts=counts, num_classes=len(meta["class_names"]),
    )
    ds = train_stream(shard_files(shards, meta, "train"), options)
    it = iter(ds)
    for _ in range(5):  # warm-up: graph building, buffers
        next(it)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0, images = usage.ru_utime + usage.ru_stime, time.perf_counter(), 0
    while time.perf_counter() - wall0 < seconds:
        x, _ = next(it)
        images += int(x.shape[0])
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    return {"threads": threads, "ordered": ordered, "image_size": image_size, "recipe": recipe, "images": images,
            "wall_sec": round(wall, 2), "cpu_sec": round(cpu, 2), "images_per_sec": images / wall,
            "images_per_cpu_sec": images / cpu}


def loader_run(shards: str, threads: int, seconds: float, ordered: bool = True) -> dict:
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "loader", "--shards", shards, "--threads", str(threads),
         "--seconds", str(seconds), *([] if ordered else ["--unordered"])],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if res.returncode:
        raise RuntimeError(f"loader benchmark failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("loader", help="measure the reader on a shard folder (prints JSON)")
    lp.add_argument("--shards", required=True)
    lp.add_argument("--threads", type=int, default=1)
    lp.add_argument("--seconds", type=float, default=20.0)
    lp.add_argument("--unordered", action="store_true", help="data.deterministic_order=false")
    lp.add_argument("--image-size", type=int, default=224, help="the model's input side")
    lp.add_argument("--recipe", action="store_true", help="RandAugment (2 ops, 0.5) and mixup (0.2) too")
    args = p.parse_args()
    print(json.dumps(measure_loader(args.shards, args.threads, args.seconds, ordered=not args.unordered,
                                    image_size=args.image_size, recipe=args.recipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
