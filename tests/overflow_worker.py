"""One Horovod worker of tests/test_step_features.py: a step that overflows on rank 1 alone, under mixed_float16.

    horovodrun -np 2 python tests/overflow_worker.py plain accumulate xla

For each mode given (`plain`, `accumulate`: 2 micro-batches, `xla`: the
compiled parts), a BatchNorm model takes one finite step (so that the
momentum slots and the moving statistics hold values), then one step where
half of rank 1's batch is 1e6 times larger: float16 turns it into inf, so
rank 1's activations, BatchNorm statistics, loss and gradients are not
finite, rank 0's are. Then three finite steps. Each rank prints one line
`REPORT {json}` per mode.
"""

import json
import sys

import horovod.tensorflow as hvd
import keras
import numpy as np

from trainer.distributed import weights_digest
from trainer.step import DataParallelModel

# What a skipped step moves, as documented: the loss scale halves, its growth
# counter restarts, and the step counter counts the batch.
MOVES = ("iteration", "dynamic_scale", "step_counter")


def build(mode: str):
    keras.utils.set_random_seed(hvd.rank())  # different starts: the broadcast must align them
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((6, 6, 1))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
        x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(x))
        net = keras.Model(inputs, keras.layers.Dense(5, activation="softmax", dtype="float32")(x))
    finally:
        keras.config.set_dtype_policy("float32")
    model = DataParallelModel.wrap(net, compile_parts=mode == "xla",
                                   accumulation_steps=2 if mode == "accumulate" else 1)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**8)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=False)
    optimizer.build(model.trainable_variables)
    for v in [*model.variables, *optimizer.variables]:
        v.assign(hvd.broadcast(v.value, 0, name=f"{mode}.{v.path}"))
    return model, optimizer


def report(mode: str) -> dict:
    model, optimizer = build(mode)
    rng = np.random.default_rng(hvd.rank())
    x = rng.random((8, 6, 6, 1), dtype=np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    variables = [*model.variables, *optimizer.variables]

    def fit(inputs, epochs=1):
        model.fit(inputs, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)

    fit(x)
    before = {v.path: v.numpy().copy() for v in variables}
    huge = x.copy()
    if hvd.rank() == 1:
        huge[4:] *= 1e6  # the second micro-batch, with accumulation
    fit(huge)
    moved = sorted(v.path for v in variables
                   if v.path.split("/")[-1] not in MOVES and not np.array_equal(v.numpy(), before[v.path]))
    result = {
        "mode": mode, "moved": moved, "digest": weights_digest(variables),
        "scale": float(optimizer.dynamic_scale.numpy()), "iterations": int(optimizer.iterations.numpy()),
        "inference_finite": bool(np.isfinite(np.asarray(model(x, training=False))).all()),
    }
    fit(x, epochs=3)
    result["end"] = weights_digest(variables)
    kernel = model.trainable_variables[0]
    result["end_changed"] = not np.array_equal(kernel.numpy(), before[kernel.path])
    return result


if __name__ == "__main__":
    hvd.init()
    for name in sys.argv[1:]:
        sys.stdout.write("REPORT " + json.dumps(report(name)) + "\n")
    sys.stdout.flush()
