"""Peer of the benchmark: tf.distribute.MultiWorkerMirroredStrategy with tf-keras `model.fit`.

    TF_CONFIG='{"cluster": {"worker": ["localhost:P0", "localhost:P1"]}, "task": {"type": "worker", "index": I}}' \
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=<tf-keras folder> python scripts/peer_mwms.py --batch 16 --warmup 5 --steps 10

One process per worker, each started with its own TF_CONFIG (scripts/bench_peers.py
starts them). Written as the strategy's users write it (TensorFlow's "Multi-worker
training with Keras" tutorial): the model and optimizer built and compiled inside
strategy.scope(), a global batch of batch x workers, a dataset batched by the
global batch, which each worker reads whole (auto-sharding off: the data is one synthetic batch), model.fit.
tf-keras's ResNet50(weights=None), SGD(0.01), one intra-op and one inter-op
thread per worker. The chief prints one JSON line: {"images_per_sec": <all workers>}.
"""

import argparse
import json
import sys
import time
from importlib import metadata


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16, help="images per worker")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    args = p.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if not tf.keras.__name__.startswith("tf_keras"):
        raise SystemExit(f"tf.keras is {tf.keras.__name__}, not tf-keras: run with TF_USE_LEGACY_KERAS=1 and tf-keras")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync
    resolver = strategy.cluster_resolver

    images = tf.random.uniform([args.batch * workers, 224, 224, 3])
    labels = tf.random.uniform([args.batch * workers], maxval=1000, dtype=tf.int64)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # Batched by the global batch, as the tutorial does: fit splits it into the per-worker batch.
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(args.batch * workers)
    dataset = dataset.with_options(options)

    with strategy.scope():
        model = tf.keras.applications.ResNet50(weights=None)
        model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")

    ends = []

    class Clock(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(dataset, epochs=1, steps_per_epoch=args.warmup + args.steps, verbose=0, callbacks=[Clock()])
    elapsed = ends[-1] - ends[args.warmup - 1]
    if resolver.task_id == 0:
        print(json.dumps({"images_per_sec": args.batch * workers * args.steps / elapsed, "workers": workers,
                          "keras": "tf-keras " + metadata.version("tf-keras")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
