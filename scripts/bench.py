"""Throughput benchmark of the data-parallel trainer (`make bench`), not a test.

ResNet-20 on synthetic 32x32 inputs, 64 images per replica, 1 thread per process:
  (a) plain single-process Keras model.fit
  (b) this trainer at np=1 (horovodrun -np 1)
  (c) this trainer at np=2
  (d) two plain Keras processes at once, their throughputs summed: the most two
      ranks can get from this machine
  (e) plain Keras with 2 threads
  (f) as (c), with Horovod's background cycle at its own default, 1 ms, instead of
      the launcher's (50 ms under Gloo, woken on enqueue)
Ratios: overhead_ratio = b/a, scaling_efficiency = c/d, dp_vs_threads = c/e,
and scaling_efficiency_cycle1ms = f/d.

Input pipeline (scripts/bench_input.py): `loader_images_per_sec_per_core` (the
reader alone, 224x224 training preprocessing of ~500x375 JPEGs, 1 tf.data
thread), `deterministic_order_cpu_ratio` (images per CPU second of the default
ordered reader / with data.deterministic_order=false, 2 threads each), and
`input_efficiency` = (g) this trainer at np=1 on real 32x32 shards with crop
and flip / (h) the same on synthetic tensors, and `deterministic_order_ratio` =
(g) / (i) the same as (g) with data.deterministic_order=false (parallel reads
handing out whatever is ready first), all alternated per repetition.
`input_recipe`: `input_efficiency` of (r) the same as (g) with RandAugment (2 ops,
magnitude 0.5) and mixup (0.2) on / (h), with (g) alongside.

The machine is noisy, so the variants alternate within each repetition, each
measurement covers >= 20 s of steady-state steps after a warm-up epoch, and the
ratios are taken per repetition (side by side) and reported as median, min and
max. Results are merged into bench/results.json.

    python scripts/bench.py [--repeats 3] [--epoch-seconds 11]
        [--only conversion,loader,input,input_recipe,predict,trainer,precision,jit,accumulation,nonfinite,
                models,scaling,keras_cost,peers,network,network_knobs]
        [--scaling-variants default,cycle_1ms,...] [--peer-steps 5]

`peers` and `keras_cost` are scripts/bench_peers.py: ResNet-50 against Horovod's
own benchmark method and MultiWorkerMirroredStrategy on tf-keras (ratios
trainer/peer), and single-process Keras 3 against tf-keras.
`conversion` is scripts/bench_conversion.py (build_shards throughput and peak
memory); `loader` and `input` use scripts/bench_input.py; `predict` is
scripts/bench_predict.py (python -m trainer.predict on 2,000 images: images/s
and peak RSS). `precision`, `jit`, `accumulation` and `nonfinite` are scripts/bench_features.py
(the training step's options side by side), with epochs of --feature-epoch-seconds.
`models` is scripts/bench_models.py: EfficientNetV2B0 and MobileNetV3Small at
np=1 and np=2, with the fused BatchNorm and with Keras's (ratios fused/keras).
`network` is scripts/bench_network.py: allreduce and training across emulated
nodes (network namespaces, tc-shaped links; needs root) against the cost model;
`network_knobs` is its knobs alone (with the link and one sweep they need).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import bench_conversion
import bench_features
import bench_input
import bench_models
import bench_network
import bench_peers
import bench_predict
import bench_scaling
from bench_common import RESULTS, ROOT, bench_env, machine, merge_results, stats, timestamp, trainer_summary

PY = sys.executable
BATCH = 64
EPOCHS = 3  # the first is warm-up; the other two are the steady-state measurement
SECTIONS = ("conversion", "loader", "input", "input_recipe", "predict", "trainer", *bench_features.SECTIONS, "models",
            "scaling", "keras_cost", "peers", "network", "network_knobs")


def plain(threads: int, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "scripts/bench_plain_keras.py", "--threads", str(threads), "--batch", str(BATCH),
         "--steps", str(steps), "--epochs", str(EPOCHS)],
        cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def plain_rate(proc: subprocess.Popen) -> float:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"plain Keras run failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def trainer_rate(np_: int, steps: int, *launch_options: str, sets: tuple[str, ...] = (), env=None) -> float:
    return trainer_summary(
        np_, "configs/bench_resnet20.yaml",
        (f"data.global_batch_size={BATCH * np_}", f"train.steps_per_epoch={steps}", f"train.epochs={EPOCHS}", *sets),
        launch_options, env=env)["images_per_sec"]


def calibrate(epoch_seconds: float) -> int:
    """Steps per epoch such that one epoch of (a) takes about `epoch_seconds`."""
    probe = plain_rate(plain(1, 5))
    steps = max(5, round(epoch_seconds * probe / BATCH))
    print(f"calibration: plain Keras {probe:.1f} images/s -> {steps} steps per epoch", flush=True)
    return steps


def loader_bench(args, work: str) -> dict:
    images, shards = os.path.join(work, "jpeg"), os.path.join(work, "jpeg-shards")
    bench_input.write_images(images, args.loader_images, 500, 375)
    bench_input.build_shards(images, shards, 8)
    runs, ordered, unordered = [], [], []
    for _ in range(args.repeats):
        runs.append(bench_input.loader_run(shards, threads=1, seconds=args.loader_seconds))
        # With 2 threads the decodes run in parallel too: the default ordered reader against the unordered one.
        ordered.append(bench_input.loader_run(shards, threads=2, seconds=args.loader_seconds))
        unordered.append(bench_input.loader_run(shards, threads=2, seconds=args.loader_seconds, ordered=False))
    per_core = stats([r["images_per_cpu_sec"] for r in runs])
    order = stats([o["images_per_cpu_sec"] / u["images_per_cpu_sec"] for o, u in zip(ordered, unordered)])
    print(f"loader: {per_core['median']:.1f} images per CPU second (median of {len(runs)}), "
          f"{statistics.median(r['images_per_sec'] for r in runs):.1f} images/s wall with 1 tf.data thread; "
          f"ordered / unordered per CPU second, 2 threads: median {order['median']:.3f} "
          f"(min {order['min']:.3f}, max {order['max']:.3f})", flush=True)
    return {"loader_images_per_sec_per_core": per_core, "deterministic_order_cpu_ratio": order, "runs": runs,
            "ordered_runs_2_threads": ordered, "unordered_runs_2_threads": unordered, "images": args.loader_images,
            "image_size": "500x375 JPEG -> 224x224", "preprocessing": "random resized crop (0.08-1) + flip",
            "published_range": "40-120", "machine": machine(), "date": timestamp()}


def cifar_shards(work: str) -> str:
    """2,560 generated 32x32 JPEGs in 8 shards, made once per bench run."""
    images, shards = os.path.join(work, "cifar"), os.path.join(work, "cifar-shards")
    if not os.path.isdir(shards):
        bench_input.write_images(images, 2560, 32, 32)
        bench_input.build_shards(images, shards, 8)
    return shards


def crop_flip_sets(shards: str) -> tuple[str, ...]:
    return ("data.synthetic=false", f"data.dir={shards}", "data.augment.random_resized_crop=true",
            "data.augment.crop_area_min=0.35", "data.augment.flip=true")


RECIPE_SETS = ("data.augment.randaugment_layers=2", "data.augment.randaugment_magnitude=0.5",
               "data.augment.mixup_alpha=0.2")


def input_recipe_bench(args, work: str) -> dict:
    """As input_bench, with RandAugment (2 ops, 0.5) and mixup (0.2) on top of the crop and flip.

    Against the plain synthetic run: everything the recipe adds (RandAugment
    per image, the mix and the one-hot labels per batch, the categorical loss)
    counts against it. The crop and flip alone run alongside, for reference.
    """
    shards = cifar_shards(work)
    steps = calibrate(args.epoch_seconds)
    runs = {"r_trainer_np1_recipe": [], "g_trainer_np1_real_shards": [], "h_trainer_np1_synthetic": []}
    for rep in range(args.repeats):
        runs["r_trainer_np1_recipe"].append(trainer_rate(1, steps, sets=(*crop_flip_sets(shards), *RECIPE_SETS)))
        runs["g_trainer_np1_real_shards"].append(trainer_rate(1, steps, sets=crop_flip_sets(shards)))
        runs["h_trainer_np1_synthetic"].append(trainer_rate(1, steps))
        latest = ", ".join(f"{k.split('_')[0]}={v[-1]:.1f}" for k, v in runs.items())
        print(f"repeat {rep + 1}/{args.repeats}: {latest}", flush=True)
    r, g, h = runs.values()
    ratio, crop = stats([a / b for a, b in zip(r, h)]), stats([a / b for a, b in zip(g, h)])
    print(f"input_efficiency with RandAugment + mixup: median {ratio['median']:.3f} (min {ratio['min']:.3f}, "
          f"max {ratio['max']:.3f}), target >= 0.95; crop + flip alone: median {crop['median']:.3f} "
          f"(min {crop['min']:.3f}, max {crop['max']:.3f})", flush=True)
    return {"input_efficiency": ratio, "input_efficiency_crop_flip": crop,
            "images_per_sec": {k: stats(v) for k, v in runs.items()}, "model": "resnet20",
            "per_replica_batch_size": BATCH, "steps_per_epoch": steps, "target": 0.95,
            "augment": "random resized crop (0.35-1) + flip + RandAugment (2 ops, magnitude 0.5) + mixup (alpha 0.2)",
            "machine": machine(), "date": timestamp()}


def input_bench(args, work: str) -> dict:
    shards = cifar_shards(work)
    steps = calibrate(args.epoch_seconds)
    real_sets = crop_flip_sets(shards)
    real, synthetic, unordered = [], [], []
    for rep in range(args.repeats):
        real.append(trainer_rate(1, steps, sets=real_sets))
        synthetic.append(trainer_rate(1, steps))
        unordered.append(trainer_rate(1, steps, sets=(*real_sets, "data.deterministic_order=false")))
        print(f"repeat {rep + 1}/{args.repeats}: real shards {real[-1]:.1f} (unordered {unordered[-1]:.1f}), "
              f"synthetic {synthetic[-1]:.1f} images/s", flush=True)
    ratio = stats([r / s for r, s in zip(real, synthetic)])
    order = stats([r / u for r, u in zip(real, unordered)])
    print(f"input_efficiency: median {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f}), "
          "target >= 0.95", flush=True)
    print(f"deterministic_order_ratio: median {order['median']:.3f} (min {order['min']:.3f}, "
          f"max {order['max']:.3f})", flush=True)
    return {"input_efficiency": ratio, "deterministic_order_ratio": order,
            "images_per_sec": {"g_trainer_np1_real_shards": stats(real), "h_trainer_np1_synthetic": stats(synthetic),
                               "i_trainer_np1_real_shards_unordered": stats(unordered)},
            "model": "resnet20", "per_replica_batch_size": BATCH,
            "steps_per_epoch": steps, "target": 0.95, "augment": "random resized crop (0.35-1) + flip",
            "machine": machine(), "date": timestamp()}


def trainer_bench(args) -> None:
    steps = calibrate(args.epoch_seconds)

    runs = {k: [] for k in ("a_plain_keras_1thread", "b_trainer_np1", "c_trainer_np2",
                            "d_two_plain_keras_1thread_summed", "e_plain_keras_2threads", "f_trainer_np2_cycle1ms")}
    started = time.time()
    for rep in range(args.repeats):
        runs["a_plain_keras_1thread"].append(plain_rate(plain(1, steps)))
        runs["b_trainer_np1"].append(trainer_rate(1, steps))
        runs["c_trainer_np2"].append(trainer_rate(2, steps))
        pair = [plain(1, steps), plain(1, steps)]
        runs["d_two_plain_keras_1thread_summed"].append(sum(plain_rate(q) for q in pair))
        runs["e_plain_keras_2threads"].append(plain_rate(plain(2, steps)))
        runs["f_trainer_np2_cycle1ms"].append(trainer_rate(2, steps, "--cycle-time-ms", "1"))
        latest = ", ".join(f"{k.split('_')[0]}={v[-1]:.1f}" for k, v in runs.items())
        print(f"repeat {rep + 1}/{args.repeats}: {latest}", flush=True)

    a, b, c, d, e, f = (runs[k] for k in runs)
    ratios = {
        "overhead_ratio": stats([bi / ai for ai, bi in zip(a, b)]),
        "scaling_efficiency": stats([ci / di for ci, di in zip(c, d)]),
        "dp_vs_threads": stats([ci / ei for ci, ei in zip(c, e)]),
        "scaling_efficiency_cycle1ms": stats([fi / di for fi, di in zip(f, d)]),
    }
    targets = {"overhead_ratio": 0.97, "scaling_efficiency": 0.90}
    result = {
        "model": "resnet20", "input": "synthetic 32x32x3", "per_replica_batch_size": BATCH,
        "steps_per_epoch": steps, "timed_epochs": EPOCHS - 1, "repeats": args.repeats,
        "images_per_sec": {k: stats(v) for k, v in runs.items()},
        **ratios,
        "targets": targets,
        "machine": machine(),
        "date": timestamp(),
        "bench_seconds": round(time.time() - started, 1),
    }
    merge_results(args.out, "trainer_throughput", result)

    print(f"\n{'run':<36}{'median':>10}{'min':>10}{'max':>10}  images/s")
    for k, v in result["images_per_sec"].items():
        print(f"{k:<36}{v['median']:>10.1f}{v['min']:>10.1f}{v['max']:>10.1f}")
    print(f"\n{'ratio':<36}{'median':>10}{'min':>10}{'max':>10}  target")
    for k, v in ratios.items():
        target = f">= {targets[k]}" if k in targets else "-"
        print(f"{k:<36}{v['median']:>10.3f}{v['min']:>10.3f}{v['max']:>10.3f}  {target}")


def network_sections(args, parts: set[str]) -> None:
    """`network` and `network_knobs` (scripts/bench_network.py): emulated nodes in a temporary folder each."""
    for section in ("network", "network_knobs"):
        if section in parts:
            with tempfile.TemporaryDirectory(prefix="bench-network-") as work:
                result = getattr(bench_network, section)(args.network_repeats, work)
            merge_results(args.out, section, {**result, "machine": machine(), "date": timestamp()})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epoch-seconds", type=float, default=11.0, help="target length of one timed epoch")
    # network_knobs is a part of network measured again alone: not run twice by default.
    p.add_argument("--only", default=",".join(x for x in SECTIONS if x != "network_knobs"),
                   help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--feature-epoch-seconds", type=float, default=5.0,
                   help="target length of one timed epoch in the precision, jit and accumulation sections")
    p.add_argument("--digits-epochs", type=int, default=20, help="epochs of the precision section's digits runs")
    p.add_argument("--scaling-variants", default=",".join(bench_scaling.VARIANTS),
                   help="comma list of the `scaling` part's variants (scripts/bench_scaling.py)")
    p.add_argument("--peer-steps", type=int, default=5,
                   help="ResNet-50 runs: warm-up steps; twice as many are timed")
    p.add_argument("--conversion-images", type=int, default=1000, help="images in the conversion's 1x set")
    p.add_argument("--loader-images", type=int, default=1000, help="JPEGs generated for the loader benchmark")
    p.add_argument("--loader-seconds", type=float, default=20.0, help="length of one loader measurement")
    p.add_argument("--network-repeats", type=int, default=2, help="repetitions of the network section's training")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    parts = set(args.only.split(","))
    if not parts or parts - set(SECTIONS):
        p.error(f"--only {args.only!r}: expected a comma list of {', '.join(SECTIONS)}")
    variants = tuple(args.scaling_variants.split(","))
    if set(variants) - set(bench_scaling.VARIANTS) or "default" not in variants:
        p.error(f"--scaling-variants {args.scaling_variants!r}: expected default and any of "
                f"{', '.join(bench_scaling.VARIANTS)}")
    if "conversion" in parts:
        merge_results(args.out, "conversion", bench_conversion.run(args.conversion_images))
    with tempfile.TemporaryDirectory(prefix="bench-input-") as work:
        if "loader" in parts:
            merge_results(args.out, "loader", loader_bench(args, work))
        if "input" in parts:
            merge_results(args.out, "input_efficiency", input_bench(args, work))
        if "input_recipe" in parts:
            merge_results(args.out, "input_efficiency_recipe", input_recipe_bench(args, work))
    if "predict" in parts:
        merge_results(args.out, "predict", bench_predict.run(2000, args.repeats))
    if "trainer" in parts:
        trainer_bench(args)
    if "scaling" in parts:
        result = bench_scaling.scaling_bench(args, calibrate(args.epoch_seconds), trainer_rate, plain, plain_rate,
                                             variants)
        merge_results(args.out, "scaling_settings", result)
    features = [x for x in bench_features.SECTIONS if x in parts]
    if features:
        steps = calibrate(args.feature_epoch_seconds)
        for section in features:
            merge_results(args.out, f"step_{section}", bench_features.run(section, steps, args.repeats,
                                                                          args.digits_epochs))
    if "models" in parts:
        merge_results(args.out, "applications", bench_models.run(args.repeats))
    if "keras_cost" in parts:
        merge_results(args.out, "keras_cost", bench_peers.keras_cost(args.repeats, 2 * args.peer_steps))
    if "peers" in parts:
        merge_results(args.out, "peers", bench_peers.peers(args.repeats, args.peer_steps))
    network_sections(args, parts)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
