"""Conversion benchmark: build_shards throughput and peak memory on ImageNet-like JPEGs.

    python scripts/bench_conversion.py [--images 1000] [--out bench/results.json]

Generates `--images` x 4 photo-like 500x375 JPEGs in 10 classes, then times
`python -m data_pipeline.build_shards` over the first quarter (1x) and over
all of them (4x) with one worker per core, the 1x set with a single worker,
and the 1x set with `--max-side 256` (decode, resize, re-encode). Peak memory
is the largest sum of RSS over the converter and all its worker processes,
sampled every 20 ms; flat memory means peak_rss_4x / peak_rss_1x stays near 1.
Results go under "conversion" in bench/results.json (`make bench` runs this
after the training benchmark).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
from PIL import Image

from bench_common import RESULTS, ROOT, machine, merge_results, timestamp

CLASSES = 10


_GRID = np.mgrid[0:375, 0:500].astype(np.float32) / 40


def photo(rng: np.random.Generator) -> Image.Image:
    """Smooth colour waves, a few blobs and mild noise: JPEG sizes like real photos (~45 kB)."""
    y, x = _GRID
    img = np.empty((375, 500, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 90 * np.sin(a * x + b * y + p * 6)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 12.5), rng.uniform(0, 9.4), rng.uniform(0.5, 2.2)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(root: str, n: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        folder = os.path.join(root, f"class{i % CLASSES:02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img{i:06d}.jpg")
        photo(rng).save(path, "JPEG", quality=90)
        total += os.path.getsize(path)
    return total


def link_subset(src: str, dst: str, n: int) -> None:
    """The first n images of src as hard links: same bytes, no copy."""
    for i in range(n):
        rel = os.path.join(f"class{i % CLASSES:02d}", f"img{i:06d}.jpg")
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        os.link(os.path.join(src, rel), os.path.join(dst, rel))


def convert(images: str, out: str, workers: int, *extra: str) -> dict:
    """Runs the converter; returns wall time and the peak RSS summed over its process tree."""
    argv = [sys.executable, "-m", "data_pipeline.build_shards", "--images", images, "--out", out,
            "--num-shards", "16", "--val-fraction", "0.1", "--workers", str(workers), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        rss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                rss += p.memory_info().rss
        except psutil.Error:  # a worker ended between listing and reading
            pass
        peak = max(peak, rss)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"build_shards failed: {err[-2000:]}")
    with open(os.path.join(out, "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    n = sum(s["num_examples"] for s in meta["splits"].values())
    return {"images": n, "seconds": round(seconds, 2), "images_per_sec": round(n / seconds, 1),
            "peak_rss_mb": round(peak / 2**20, 1), "workers": workers, "options": list(extra)}


def run(images: int) -> dict:
    """Converts `images` and 4x `images` generated JPEGs; returns the figures."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        big, small = os.path.join(tmp, "x4"), os.path.join(tmp, "x1")
        t0 = time.perf_counter()
        size = generate(big, 4 * images)
        link_subset(big, small, images)
        print(f"generated {4 * images} JPEGs, {size / 2**20:.0f} MiB, in {time.perf_counter() - t0:.0f} s",
              flush=True)
        runs = {
            "x1_parallel": convert(small, os.path.join(tmp, "o1"), cores),
            "x4_parallel": convert(big, os.path.join(tmp, "o4"), cores),
            "x1_one_worker": convert(small, os.path.join(tmp, "o1w"), 1),
            "x1_parallel_max_side_256": convert(small, os.path.join(tmp, "o1r"), cores, "--max-side", "256"),
        }
    for name, r in runs.items():
        print(f"{name:<28}{r['images']:>7} images {r['images_per_sec']:>8.1f} images/s "
              f"peak RSS {r['peak_rss_mb']:>7.1f} MB", flush=True)
    result = {
        "source": f"generated 500x375 JPEGs (quality 90), {CLASSES} classes",
        "runs": runs,
        "peak_rss_ratio_x4_vs_x1": round(runs["x4_parallel"]["peak_rss_mb"] / runs["x1_parallel"]["peak_rss_mb"], 3),
        "parallel_speedup": round(runs["x1_parallel"]["images_per_sec"] / runs["x1_one_worker"]["images_per_sec"], 3),
        "machine": machine(),
        "date": timestamp(),
    }
    print(f"peak RSS 4x / 1x: {result['peak_rss_ratio_x4_vs_x1']}, "
          f"{cores} workers / 1 worker: {result['parallel_speedup']}x")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images in the 1x set (the 4x set has 4 times more)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    merge_results(args.out, "conversion", run(args.images))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
