"""Checkpoint atomicity, compatibility, kills during a save, and exact data positions on resume."""

import os
import signal
import subprocess
import sys
import time

import keras
import pytest
import tensorflow as tf

from data_pipeline.positions import records_per_pass, stream_position
from data_pipeline.reader import shard_records, training_records
from helpers import ROOT, checkpoint_step
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.resume import fit_phases

SIGNATURE = {"name": "tiny", "input_shape": [4], "num_classes": 3}


def tiny_model(seed=0, classes=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize(
    "start, phases",
    [
        (0, [(0, 4, 10)]),
        (20, [(2, 4, 10)]),
        (23, [(2, 3, 7), (3, 4, 10)]),
        (37, [(3, 4, 3)]),
        (40, []),
    ],
)
def test_fit_phases_finish_an_interrupted_epoch_first(start, phases):
    assert fit_phases(start, steps_per_epoch=10, epochs=4) == phases


def test_records_per_pass_matches_what_the_reader_reads(tmp_path):
    counts = [5, 3, 4]
    files = []
    for i, n in enumerate(counts):
        path = str(tmp_path / f"s{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for j in range(n):
                w.write(f"{i}-{j}".encode())
        files.append(path)
    for num_shards in (1, 2, 3, 4, 5):
        for index in range(num_shards):
            read = sum(1 for _ in shard_records(files, num_shards, index))
            assert records_per_pass(counts, num_shards, index) == read


def test_training_stream_resumes_exactly_where_it_stopped(tmp_path):
    counts = [4, 6]
    files = []
    for i, n in enumerate(counts):
        files.append(str(tmp_path / f"s{i}.tfrecord"))
        with tf.io.TFRecordWriter(files[-1]) as w:
            for j in range(n):
                w.write(b"%d" % (10 * i + j))

    def stream(skip=0, count=35):
        first, offset = stream_position(counts, 1, 0, seed=7, skip=skip)
        ds = training_records(files, 1, 0, seed=7, shuffle_buffer=4, first_pass=first, offset=offset, count=count)
        return [(int(r), tuple(s)) for r, s in ds.as_numpy_iterator()]

    full = stream()
    records = [r for r, _ in full]
    assert len(full) == 35
    # Each pass is a permutation of the records, and passes differ.
    expected = sorted([*range(4), *range(10, 16)])
    assert sorted(records[:10]) == sorted(records[10:20]) == expected and records[:10] != records[10:20]
    # The augmentation seeds are positions too: unique, and the same on resume.
    assert len({s for _, s in full}) == 35
    for skip in (0, 3, 10, 17, 30):
        assert stream(skip, 35 - skip) == full[skip:]
    # Without a count, the stream goes on forever.
    endless = [int(r) for r, _ in training_records(files, 1, 0, seed=7, shuffle_buffer=4).take(30)]
    assert endless == records[:30]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(tiny_model(), {"epoch": 0, "model": SIGNATURE})
    other = {**SIGNATURE, "num_classes": 5}
    with pytest.raises(CheckpointError) as e:
        mgr.restore(tiny_model(classes=5), path, other)
    assert str(e.value) == (
        f"checkpoint {path!r} was written for model tiny with 3 classes and input 4; "
        "this run builds model tiny with 5 classes and input 4"
    )


WRITER = """
import sys, keras, numpy as np
sys.path.insert(0, sys.argv[2])
from trainer.checkpoint import CheckpointManager
inputs = keras.Input((2048,))
model = keras.Model(inputs, keras.layers.Dense(4096)(inputs))  # 32 MB of weights
model.compile(optimizer=keras.optimizers.Adam(), loss="mse", jit_compile=False)
model.optimizer.build(model.trainable_variables)
mgr = CheckpointManager(sys.argv[1], keep=2)
step = 0
while True:
    step += 1
    model.optimizer.iterations.assign(step)
    mgr.save(model, {"epoch": step})
    if step == 1:
        print("saved once", flush=True)
"""


def wait_for_a_save_in_progress(proc, ckpt, inside: str) -> None:
    """Returns once a temporary checkpoint folder holds `inside` (or, with "", exists): a save is under way."""
    deadline = time.time() + 60
    while not [p for p in ckpt.glob("*.tmp-*") if not inside or (p / inside).exists()]:
        assert proc.poll() is None and time.time() < deadline, "no save started"
        time.sleep(0.001)


def test_killing_the_writer_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    # Killed as a save starts, and while it writes the weights: not at delays that may fall between saves.
    for inside in ("", "model.weights.h5", "", "model.weights.h5"):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt), str(ROOT)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved once"
        wait_for_a_save_in_progress(proc, ckpt, inside)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The kill did interrupt a save: its temporary folder is still there.
        assert [p for p in os.listdir(ckpt) if ".tmp-" in p], os.listdir(ckpt)
        latest = CheckpointManager(str(ckpt)).latest()
        assert latest is not None
        inputs = keras.Input((2048,))
        model = keras.Model(inputs, keras.layers.Dense(4096)(inputs))
        model.compile(optimizer=keras.optimizers.Adam(), loss="mse", jit_compile=False)
        state = CheckpointManager(str(ckpt)).restore(model, latest)
        assert state["global_step"] == state["epoch"] == int(model.optimizer.iterations.numpy())
        # The interrupted write left at most a temporary folder, never a partial checkpoint.
        partial = [p for p in os.listdir(ckpt) if checkpoint_step(p) is None]
        assert all(".tmp-" in p for p in partial)
        # What the next start's rank 0 clears away.
        CheckpointManager(str(ckpt)).remove_leftovers()
        assert not [p for p in os.listdir(ckpt) if ".tmp-" in p or ".old-" in p]
