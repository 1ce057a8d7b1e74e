"""Throughput benchmark of the data-parallel trainer (`make bench`), not a test.

ResNet-20 on synthetic 32x32 inputs, 64 images per replica, 1 thread per process:
  (a) plain single-process Keras model.fit
  (b) this trainer at np=1 (horovodrun -np 1)
  (c) this trainer at np=2
  (d) two plain Keras processes at once, their throughputs summed: the most two
      ranks can get from this machine
  (e) plain Keras with 2 threads
  (f) as (c), with Horovod's background cycle at 5 ms instead of 1 ms
Ratios: overhead_ratio = b/a, scaling_efficiency = c/d, dp_vs_threads = c/e,
and scaling_efficiency_cycle5ms = f/d.

The machine is noisy, so the variants alternate within each repetition, each
measurement covers >= 20 s of steady-state steps after a warm-up epoch, and the
ratios are taken per repetition (side by side) and reported as median, min and
max. Results are merged into bench/results.json.

    python scripts/bench.py [--repeats 3] [--epoch-seconds 11] [--only all|training|conversion]

`--only conversion` runs only scripts/bench_conversion.py (build_shards
throughput and peak memory), which `all` runs first.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BATCH = 64
EPOCHS = 3  # the first is warm-up; the other two are the steady-state measurement


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def plain(threads: int, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "scripts/bench_plain_keras.py", "--threads", str(threads), "--batch", str(BATCH),
         "--steps", str(steps), "--epochs", str(EPOCHS)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def plain_rate(proc: subprocess.Popen) -> float:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"plain Keras run failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def trainer_rate(np_: int, steps: int, *launch_options: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [PY, "-m", "launch", "--np", str(np_), *launch_options, "--config", "configs/bench_resnet20.yaml",
             "--set", f"run_dir={tmp}/run", "--set", f"data.global_batch_size={BATCH * np_}",
             "--set", f"train.steps_per_epoch={steps}", "--set", f"train.epochs={EPOCHS}",
             "--set", "runtime.intra_op_threads=1", "--set", "runtime.inter_op_threads=1"],
            cwd=ROOT, env=_env(), capture_output=True, text=True,
        )
        if res.returncode:
            raise RuntimeError(f"trainer np={np_} failed: {res.stderr[-2000:]}")
        with open(os.path.join(tmp, "run", "summary.json"), encoding="utf-8") as f:
            return json.load(f)["images_per_sec"]


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": [round(v, 3) for v in values]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epoch-seconds", type=float, default=11.0, help="target length of one timed epoch")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    p.add_argument("--only", choices=("all", "training", "conversion"), default="all")
    p.add_argument("--conversion-images", type=int, default=1000, help="images in the conversion's 1x set")
    args = p.parse_args()
    if args.only != "training":
        import bench_conversion  # scripts/ is on sys.path: this script's folder

        bench_conversion.main(["--out", args.out, "--images", str(args.conversion_images)])
        if args.only == "conversion":
            return 0

    # Calibrate steps per epoch so that one epoch of (a) takes about --epoch-seconds.
    probe = plain_rate(plain(1, 5))
    steps = max(5, round(args.epoch_seconds * probe / BATCH))
    print(f"calibration: plain Keras {probe:.1f} images/s -> {steps} steps per epoch", flush=True)

    runs = {k: [] for k in ("a_plain_keras_1thread", "b_trainer_np1", "c_trainer_np2",
                            "d_two_plain_keras_1thread_summed", "e_plain_keras_2threads", "f_trainer_np2_cycle5ms")}
    started = time.time()
    for rep in range(args.repeats):
        runs["a_plain_keras_1thread"].append(plain_rate(plain(1, steps)))
        runs["b_trainer_np1"].append(trainer_rate(1, steps))
        runs["c_trainer_np2"].append(trainer_rate(2, steps))
        pair = [plain(1, steps), plain(1, steps)]
        runs["d_two_plain_keras_1thread_summed"].append(sum(plain_rate(q) for q in pair))
        runs["e_plain_keras_2threads"].append(plain_rate(plain(2, steps)))
        runs["f_trainer_np2_cycle5ms"].append(trainer_rate(2, steps, "--cycle-time-ms", "5"))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k.split('_')[0]}={v[-1]:.1f}" for k, v in runs.items()),
              flush=True)

    a, b, c, d, e, f = (runs[k] for k in runs)
    ratios = {
        "overhead_ratio": stats([bi / ai for ai, bi in zip(a, b)]),
        "scaling_efficiency": stats([ci / di for ci, di in zip(c, d)]),
        "dp_vs_threads": stats([ci / ei for ci, ei in zip(c, e)]),
        "scaling_efficiency_cycle5ms": stats([fi / di for fi, di in zip(f, d)]),
    }
    targets = {"overhead_ratio": 0.97, "scaling_efficiency": 0.90}
    result = {
        "model": "resnet20", "input": "synthetic 32x32x3", "per_replica_batch_size": BATCH,
        "steps_per_epoch": steps, "timed_epochs": EPOCHS - 1, "repeats": args.repeats,
        "images_per_sec": {k: stats(v) for k, v in runs.items()},
        **ratios,
        "targets": targets,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bench_seconds": round(time.time() - started, 1),
    }
    results = {}
    if os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            results = json.load(f)
    results["trainer_throughput"] = result
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)

    print(f"\n{'run':<36}{'median':>10}{'min':>10}{'max':>10}  images/s")
    for k, v in result["images_per_sec"].items():
        print(f"{k:<36}{v['median']:>10.1f}{v['min']:>10.1f}{v['max']:>10.1f}")
    print(f"\n{'ratio':<36}{'median':>10}{'min':>10}{'max':>10}  target")
    for k, v in ratios.items():
        target = f">= {targets[k]}" if k in targets else "-"
        print(f"{k:<36}{v['median']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}  {target}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
