"""Prediction benchmark, run by scripts/bench.py (`make bench`, or `--only predict`).

`python -m trainer.predict` over 2,000 generated 96x96 JPEGs with the serving
export (trainer.export) of an untrained ResNet-20 at 32x32x3 (the weights do
not change the cost): centre crop, resize, model, top-3, one CSV row per image.
Each repetition runs predict on all images and on one batch of them (64),
alternated; `images_per_sec` = the difference in images over the difference in
wall time, which leaves out the start (TensorFlow import, model load) that
`images_per_sec_end_to_end` includes. Peak RSS is the predict process's
(getrusage of that child), for both counts: flat memory means they are close.

    python scripts/bench_predict.py [--images 2000] [--repeats 3]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from bench_common import ROOT, machine, stats, timestamp

sys.path.insert(0, ROOT)  # the export is written with trainer.export from this checkout

BATCH = 64
SIZE, CHANNELS, CLASSES = 32, 3, 10


def write_export(path: str) -> None:
    from trainer.export import ExportInfo, export_serving
    from trainer.models import build_model

    model = build_model("resnet20", (SIZE, SIZE, CHANNELS), CLASSES)
    export_serving(model, path, ExportInfo(tuple(f"class{i:02d}" for i in range(CLASSES)), SIZE, CHANNELS,
                                           crop_fraction=0.875))


def predict_once(export: str, inputs: str, out_dir: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one predict process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(os.path.join(out_dir, "stderr.txt"), "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.predict", "--model", export, inputs, "--batch-size", str(BATCH),
             "--output", os.path.join(out_dir, "p.csv")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        with open(os.path.join(out_dir, "stderr.txt")) as f:
            raise RuntimeError(f"predict failed: {f.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # KB on Linux


def run(images: int = 2000, repeats: int = 3) -> dict:
    import bench_input

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as work:
        every, one_batch = os.path.join(work, "all"), os.path.join(work, "batch")
        bench_input.write_images(every, images, 96, 96)
        bench_input.write_images(one_batch, BATCH, 96, 96)
        export = os.path.join(work, "export")
        write_export(export)
        rates, end_to_end, rss_all, rss_batch = [], [], [], []
        for rep in range(repeats):
            t_all, m_all = predict_once(export, every, work)
            t_batch, m_batch = predict_once(export, one_batch, work)
            rates.append((images - BATCH) / (t_all - t_batch))
            end_to_end.append(images / t_all)
            rss_all.append(m_all)
            rss_batch.append(m_batch)
            print(f"repeat {rep + 1}/{repeats}: {images} images in {t_all:.2f} s, {BATCH} in {t_batch:.2f} s: "
                  f"{rates[-1]:.1f} images/s; peak RSS {m_all:.0f} MB ({m_batch:.0f} MB for {BATCH})", flush=True)
    return {"images_per_sec": stats(rates), "images_per_sec_end_to_end": stats(end_to_end),
            "peak_rss_mb": stats(rss_all), f"peak_rss_mb_{BATCH}_images": stats(rss_batch), "images": images,
            "input": "96x96 JPEG -> 32x32x3 (crop 0.875)", "model": "resnet20", "batch_size": BATCH,
            "machine": machine(), "date": timestamp()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    result = run(args.images, args.repeats)
    print(f"predict: {result['images_per_sec']['median']:.1f} images/s, "
          f"peak RSS {result['peak_rss_mb']['median']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
