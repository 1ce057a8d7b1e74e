"""Plain single-process Keras `model.fit`: the baseline of the throughput benchmark.

    python scripts/bench_plain_keras.py --threads 1 --steps 20 --epochs 3

Same model, data, loss and optimizer as the trainer's ResNet-20 benchmark run,
with no Horovod. Prints one JSON line: {"images_per_sec": ..., "epoch_rates": [...]}.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()

    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    from data_pipeline.reader import synthetic_dataset
    from trainer.callbacks import EpochTimer
    from trainer.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("resnet20", (32, 32, 3), 10)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1 * args.batch / 256, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=False,  # as in the trainer, whose Horovod ops have no XLA kernels
    )
    history = model.fit(
        synthetic_dataset(args.batch, 32, 3, 10), epochs=args.epochs, steps_per_epoch=args.steps,
        callbacks=[EpochTimer(args.batch)], verbose=0,
    ).history
    rates = history["images_per_sec"]
    print(json.dumps({"images_per_sec": statistics.median(rates[1:] or rates), "epoch_rates": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
