"""Peer of the benchmark: Horovod's own synthetic-benchmark method, on tf-keras.

    TF_USE_LEGACY_KERAS=1 PYTHONPATH=<tf-keras folder> horovodrun -np 2 --gloo \
        python scripts/peer_horovod.py --batch 16 --warmup 5 --steps 10

Written after the method of Horovod's examples/tensorflow2/tensorflow2_synthetic_benchmark.py
(which Horovod's sdist does not ship, and which runs on Keras 2 only): tf-keras's
ResNet50(weights=None), one fixed random batch, SGD(0.01), a tf.function step
with hvd.DistributedGradientTape, the broadcast of the model and optimizer
variables after the first step, warm-up steps, then timed steps. One intra-op
and one inter-op thread per rank, as every run of the benchmark. Rank 0 prints
one JSON line: {"images_per_sec": <all ranks>, ...}.
"""

import argparse
import json
import sys
import time
from importlib import metadata


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16, help="images per rank")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    args = p.parse_args()

    import horovod.tensorflow as hvd
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    if not tf.keras.__name__.startswith("tf_keras"):
        raise SystemExit(f"tf.keras is {tf.keras.__name__}, not tf-keras: run with TF_USE_LEGACY_KERAS=1 and tf-keras")

    model = tf.keras.applications.ResNet50(weights=None)
    opt = tf.keras.optimizers.SGD(0.01)
    data = tf.random.uniform([args.batch, 224, 224, 3])
    target = tf.random.uniform([args.batch, 1], minval=0, maxval=999, dtype=tf.int64)

    @tf.function
    def step(first_batch):
        with tf.GradientTape() as tape:
            probs = model(data, training=True)
            loss = tf.keras.losses.sparse_categorical_crossentropy(target, probs)
        tape = hvd.DistributedGradientTape(tape)
        gradients = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(gradients, model.trainable_variables))
        # After the first step, so that the optimizer's variables exist to be broadcast.
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(opt.variables(), root_rank=0)

    # A Python bool, as in Horovod's benchmark: two traced graphs, only the first with the broadcast.
    step(True)
    for _ in range(args.warmup - 1):
        step(False)
    started = time.perf_counter()
    for _ in range(args.steps):
        step(False)
    # Every step waits for the allreduce of all ranks, so rank 0's clock times the run.
    elapsed = time.perf_counter() - started
    if hvd.rank() == 0:
        print(json.dumps({"images_per_sec": args.batch * hvd.size() * args.steps / elapsed, "ranks": hvd.size(),
                          "keras": "tf-keras " + metadata.version("tf-keras")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
