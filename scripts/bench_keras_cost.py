"""Keras 3's own cost on the CPU: single-process `fit` of ResNet-50, one thread, one fixed batch.

    python scripts/bench_keras_cost.py --impl keras3 [--steps 10 --warmup 3] [--profile DIR]

--impl keras3        keras.applications.ResNet50(weights=None) as Keras 3 builds it;
--impl keras3-fused  the same with trainer.batchnorm's fused BatchNormalization (what trainer.models builds);
--impl tf-keras      tf.keras.applications.ResNet50 from tf-keras (run with TF_USE_LEGACY_KERAS=1 and
                     tf-keras on PYTHONPATH; scripts/bench_peers.py installs it into its own folder).
Batch 16, 224x224, 1000 classes, SGD(0.01), sparse cross-entropy, no XLA. Prints one JSON
line: {"images_per_sec": ..., "images_per_cpu_sec": ..., "ops_sec_per_step": {...}}
(images per second of the process's CPU time: steadier than the wall clock on a
shared machine); with --profile, "ops_sec_per_step" holds the seconds each
TensorFlow op type took over the profiled steps (TensorFlow profiler trace, host plane).
"""

import argparse
import glob
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH, SIZE, CLASSES = 16, 224, 1000


def build(impl: str):
    import tensorflow as tf

    if impl == "tf-keras":
        keras = tf.keras  # tf-keras, when TF_USE_LEGACY_KERAS=1
        if not keras.__name__.startswith("tf_keras"):
            raise SystemExit("--impl tf-keras: tf.keras is not tf-keras; set TF_USE_LEGACY_KERAS=1")
        return keras, keras.applications.ResNet50(weights=None)
    import keras

    model = keras.applications.ResNet50(weights=None)
    if impl == "keras3-fused":
        from trainer.batchnorm import fuse_batchnorm

        model = fuse_batchnorm(model)
    return keras, model


def op_seconds(logdir: str) -> dict:
    """Seconds per TensorFlow op type on the host plane of the trace in `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = defaultdict(float)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # TF op events are "scope/op_name:OpType" (executor and tf.data events have "::" or no scope).
                op, _, op_type = name.rpartition(":")
                if "/" not in op or "::" in name:
                    continue
                seconds = event.duration_ps / 1e12
                totals[op_type] += seconds
                totals["(all ops)"] += seconds
                # ResNet-50's BatchNorm layers are named *_bn, in Keras 3 and in tf-keras.
                if "_bn" in op:
                    totals["(BatchNorm layers, forward and backward)"] += seconds
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("keras3", "keras3-fused", "tf-keras"), required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", help="trace 3 steps after the timed ones into this folder")
    args = p.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras, model = build(args.impl)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", jit_compile=False)
    x = tf.random.uniform([BATCH, SIZE, SIZE, 3])
    y = tf.random.uniform([BATCH, 1], minval=0, maxval=CLASSES, dtype=tf.int64)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()

    ends, cpu = [], []  # wall clock and this process's CPU time at each step's end
    profiled = args.warmup + args.steps + 3 if args.profile else 0

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if args.profile and batch == args.warmup + args.steps:
                tf.profiler.experimental.start(args.profile)

        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            if args.profile and batch == profiled - 1:
                tf.profiler.experimental.stop()

    model.fit(data, steps_per_epoch=max(profiled, args.warmup + args.steps), epochs=1, verbose=0,
              callbacks=[Clock()])
    timed = ends[args.warmup - 1:args.warmup + args.steps]
    rate = BATCH * args.steps / (timed[-1] - timed[0])
    # One thread: CPU time is the step's own work, which other jobs on the machine do not stretch.
    cpu_rate = BATCH * args.steps / (cpu[args.warmup + args.steps - 1] - cpu[args.warmup - 1])
    ops = {k: round(v / 3, 4) for k, v in op_seconds(args.profile).items()} if args.profile else {}
    print(json.dumps({"impl": args.impl, "images_per_sec": rate, "images_per_cpu_sec": cpu_rate,
                      "ops_sec_per_step": ops}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
