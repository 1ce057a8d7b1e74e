"""Gradient accumulation with a BatchNorm model on 2 ranks (real horovodrun) against its documented semantics.

docs/training.md: each rank runs its batch as N micro-batches one after
another; BatchNorm normalizes each micro-batch with its own statistics and
moves its moving statistics with each of them; the N gradients are averaged,
then averaged over ranks together with the moving statistics in the step's
one allreduce, and applied once. The reference below does exactly that with
a plain Keras model, step by step, in one process without Horovod.
"""

import numpy as np
import pytest

from helpers import worker_reports

N, MICRO, STEPS = 2, 4, 3

COMMON = f"""
import json, sys
import keras
import numpy as np
import tensorflow as tf
from trainer.batchnorm import BatchNormalization

N, MICRO, STEPS = {N}, {MICRO}, {STEPS}


def net(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(BatchNormalization(momentum=0.5)(x))  # the fused one
    x = keras.layers.Conv2D(3, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization(momentum=0.6)(x))  # Keras's
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))


# data[step, rank]: a batch of N micro-batches, each with statistics of its own.
rng = np.random.default_rng(0)
shift = np.repeat(np.arange(2 * N, dtype=np.float32).reshape(2, N), MICRO, axis=1)[None, :, :, None, None, None]
x = (rng.normal(size=(STEPS, 2, N * MICRO, 6, 6, 2)) * (1 + shift) + shift).astype(np.float32)
y = rng.integers(0, 5, (STEPS, 2, N * MICRO)).astype(np.int32)


def values(model):
    # [(variable name without its layer's, value)] in the model's order: the layers' auto-names differ per model.
    return [(v.path.split("/")[-1], v.numpy().tolist()) for v in model.variables]
"""

RANKS = COMMON + """
import horovod.tensorflow as hvd
from trainer.step import DataParallelModel

hvd.init()
rank = hvd.rank()
results = {}
for xla in (False, True):
    model = DataParallelModel.wrap(net(rank), accumulation_steps=N, compile_parts=xla)  # ranks start apart
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                  jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    for v in [*model.variables, *model.optimizer.variables]:
        v.assign(hvd.broadcast(v.value, 0, name=v.path + str(xla)))
    ds = tf.data.Dataset.from_tensor_slices((x[:, rank], y[:, rank]))
    model.fit(ds, epochs=1, steps_per_epoch=STEPS, verbose=0, shuffle=False)
    results[xla] = values(model)
sys.stdout.write("REPORT " + json.dumps({"rank": rank, "plain": results[False], "xla": results[True]}) + "\\n")
"""

REFERENCE = COMMON + """
model = net(0)  # rank 0's start, which the broadcast gives every rank
optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
optimizer.build(model.trainable_variables)
loss_fn = keras.losses.SparseCategoricalCrossentropy()
moving = model.non_trainable_variables
for step in range(STEPS):
    start = [v.numpy() for v in moving]
    grads, ends = [], []
    for rank in range(2):
        for v, value in zip(moving, start):
            v.assign(value)
        for i in range(N):
            part = slice(i * MICRO, (i + 1) * MICRO)
            with tf.GradientTape() as tape:
                loss = loss_fn(y[step, rank, part], model(x[step, rank, part], training=True))
            grads.append(tape.gradient(loss, model.trainable_variables))
        ends.append([v.numpy() for v in moving])
    for j, v in enumerate(moving):
        v.assign(np.mean([end[j] for end in ends], axis=0))
    optimizer.apply([tf.add_n(list(g)) / len(grads) for g in zip(*grads)], model.trainable_variables)
sys.stdout.write("REPORT " + json.dumps({"rank": 0, "variables": values(model)}) + "\\n")
"""


@pytest.mark.horovod
def test_accumulating_batchnorm_ranks_follow_the_documented_semantics(tmp_path):
    r0, r1 = worker_reports(tmp_path, RANKS)
    (ref,) = worker_reports(tmp_path, REFERENCE, ranks=1)
    expected = ref["variables"]
    stats = [(name, value) for name, value in expected if name.startswith("moving_")]
    assert len(stats) == 4
    for mode in ("plain", "xla"):
        assert r0[mode] == r1[mode], mode  # every variable identical on both ranks
        assert [name for name, _ in r0[mode]] == [name for name, _ in expected]
        for i, ((name, got), (_, value)) in enumerate(zip(r0[mode], expected)):
            np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-5, err_msg=f"{mode} variable {i} {name}")
    # The statistics moved far from their start (0 and 1): the comparison is not of initial values.
    assert all(np.abs(np.asarray(value) - (0.0 if "mean" in name else 1.0)).max() > 0.3 for name, value in stats)
