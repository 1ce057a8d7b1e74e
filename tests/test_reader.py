"""The per-rank reader: sharding per pass, uneven shards, augmentation, corrupt shards, input wait."""

import logging
import shutil
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.augment import Augment
from data_pipeline.metadata import DataError, corrupt_shards, load_metadata
from data_pipeline.positions import pass_files, records_per_pass
from data_pipeline.preprocess import augment, center_crop
from data_pipeline.reader import corrupt_shard_error, eval_stream, train_stream, training_records
from data_pipeline.records import encode_example, parse_example
from data_pipeline.stream_options import EvalOptions, TrainOptions
from helpers import run


def write_shards(tmp_path, counts, size=(6, 9)):
    """TFRecord shards holding counts[i] PNG records each; record ids are 'i-j', labels j % 3."""
    rng = np.random.default_rng(1)
    files = []
    for i, n in enumerate(counts):
        files.append(str(tmp_path / f"train-{i:05d}-of-{len(counts):05d}.tfrecord"))
        with tf.io.TFRecordWriter(files[-1]) as w:
            for j in range(n):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                w.write(encode_example(tf.io.encode_png(pixels).numpy(), "png", (*size, 3), j % 3, "c", f"{i}-{j}"))
    return files


def ids(ds) -> list[str]:
    return [parse_example(r)["image/id"].numpy().decode() for r, _ in ds]


def test_each_pass_deals_all_files_out_anew_and_disjointly(tmp_path):
    counts = [9, 1, 2, 30, 4]
    files = write_shards(tmp_path, counts)
    every = sorted(f"{i}-{j}" for i, n in enumerate(counts) for j in range(n))
    for p in range(2):
        seen = []
        for rank in range(2):
            n = records_per_pass(counts, 2, rank, seed=3, pass_index=p)
            got = ids(training_records(files, 2, rank, seed=3, shuffle_buffer=8, first_pass=p, count=n))
            assert len(got) == n
            seen += got
        assert sorted(seen) == every  # disjoint and complete in every pass
    assignments = {tuple(pass_files(files, 2, 0, 3, p)) for p in range(8)}
    assert len(assignments) > 1, "the file order is the same in every pass"


def test_uneven_shards_give_every_rank_exactly_its_steps(tmp_path, caplog):
    # Rank 1's files hold far fewer records in most passes; both must still run every step.
    counts = [40, 1, 2, 1]
    files = write_shards(tmp_path, counts)
    global_batch, epochs = 8, 3
    steps = sum(counts) // global_batch * epochs
    for ranks in (2, 6):  # file-level, then element-level sharding
        per_replica = global_batch // 2 if ranks == 2 else 1
        for rank in range(ranks):
            ds = train_stream(files, TrainOptions(
                num_shards=ranks, shard_index=rank, per_replica_batch_size=per_replica, image_size=4, channels=3,
                seed=1, shuffle_buffer=16, num_records=steps * per_replica, shard_counts=counts, threads=1))
            shapes = [x.shape for x, _ in ds]
            assert len(shapes) == steps and set(shapes) == {(per_replica, 4, 4, 3)}
    assert "4 shard files for 6 input pipelines: sharding by element, so every pipeline reads all files" in caplog.text


def test_augmented_stream_resumes_exactly(tmp_path):
    counts = [7, 5, 6]
    files = write_shards(tmp_path, counts)
    aug = Augment(random_resized_crop=True, crop_area_min=0.2, flip=True)

    def batches(skip_steps):
        ds = train_stream(files, TrainOptions(
            num_shards=2, shard_index=1, per_replica_batch_size=3, image_size=5, channels=3, seed=4,
            shuffle_buffer=4, augment=aug, skip_records=skip_steps * 3, num_records=(10 - skip_steps) * 3,
            shard_counts=counts))
        return [x.numpy() for x, _ in ds]

    full = batches(0)
    assert len(full) == 10
    for skip in (1, 4):
        resumed = batches(skip)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, full[skip:])), skip
    # The crops differ from the plain centre crop.
    plain = train_stream(files, TrainOptions(num_shards=2, shard_index=1, per_replica_batch_size=3, image_size=5,
                                             channels=3, seed=4, shuffle_buffer=4, num_records=30, shard_counts=counts))
    assert any(not np.array_equal(a, b.numpy()) for a, (b, _) in zip(full, plain))


def test_augmentation_is_seeded_per_record():
    image = tf.constant(np.arange(10 * 16 * 3, dtype=np.uint8).reshape(10, 16, 3))
    aug = Augment(random_resized_crop=True, crop_area_min=0.1, flip=True)
    outs = [augment(image, tf.constant([7, i], tf.int64), 8, aug).numpy() for i in range(6)]
    assert all(o.shape == (8, 8, 3) and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert len({o.tobytes() for o in outs}) == 6
    again = augment(image, tf.constant([7, 3], tf.int64), 8, aug).numpy()
    assert np.array_equal(again, outs[3])
    flipped = augment(image, tf.constant([0, 0], tf.int64), 8, Augment(flip=True))
    plain = center_crop(image, 8)
    flips = {np.array_equal(augment(image, tf.constant([0, i], tf.int64), 8, Augment(flip=True)),
                            plain[:, ::-1]) for i in range(16)}
    assert flips == {True, False} and flipped.shape == (8, 8, 3)


def test_evaluation_takes_the_centre_crop():
    # 4 rows x 8 columns, every column its own value: the centre square is columns 2..5.
    image = tf.constant(np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))[..., None])
    np.testing.assert_allclose(center_crop(image, 4).numpy()[0, :, 0], np.array([60, 90, 120, 150]) / 255, atol=1e-6)
    # With 0.5 of the shorter side: a 2x2 centre (columns 3, 4) resized to 4x4.
    np.testing.assert_allclose(center_crop(image, 2, 0.5).numpy()[0, :, 0], np.array([90, 120]) / 255, atol=1e-6)


def test_thread_pool_is_per_pipeline(tmp_path):
    files = write_shards(tmp_path, [3, 3])
    ds = eval_stream(files, EvalOptions(num_shards=2, shard_index=0, per_replica_batch_size=2, image_size=4,
                                        channels=3, threads=1))
    assert ds.options().threading.private_threadpool_size == 1
    assert ds.options().threading.max_intra_op_parallelism == 1


def test_stream_options_are_frozen_and_checked():
    from dataclasses import FrozenInstanceError

    from trainer.config import load_config

    cfg = load_config(None, ["data.augment.flip=true"])
    options = TrainOptions(per_replica_batch_size=2, image_size=4, channels=3, shard_counts=[3, 4],
                           augment=cfg.data.augment)
    cfg.data.augment.flip = False  # the config stays mutable; a built stream's options do not follow it
    assert options.augment == Augment(flip=True) and options.shard_counts == (3, 4)
    with pytest.raises(FrozenInstanceError):
        options.seed = 1
    with pytest.raises(ValueError, match=r"shard_index 2 is not in \[0, 2\)"):
        EvalOptions(per_replica_batch_size=2, image_size=4, channels=3, num_shards=2, shard_index=2)


def test_config_reads_without_tensorflow():
    # The launcher checks a config before any worker starts: the shared Augment must not pull TensorFlow in.
    code = "import sys, trainer.config; print(sorted(m for m in sys.modules if m.startswith('tensorflow')))"
    res = run([sys.executable, "-c", code], timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_corrupt_shard_is_found_named_or_skipped(tmp_path):
    counts = [20, 20]
    files = write_shards(tmp_path, counts)
    truncate(files[1])
    err = corrupt_shard_error(files, tf.errors.DataLossError(None, None, "truncated record"), counts)
    assert isinstance(err, DataError)
    assert str(err).startswith(f"shard {files[1]!r} is corrupt (")
    # Cut at a record boundary, the file reads as a shorter valid one: the listed count catches it.
    with pytest.raises((tf.errors.DataLossError, tf.errors.FailedPreconditionError)):
        for _ in eval_stream(files, EvalOptions(per_replica_batch_size=4, image_size=4, channels=3,
                                                shard_counts=counts)):
            pass
    # Skipped: the training stream still holds every record it was asked for.
    ds = train_stream(files, TrainOptions(per_replica_batch_size=4, image_size=4, channels=3, num_records=60,
                                          shard_counts=counts, skip_corrupt=True))
    assert sum(1 for _ in ds) == 15


def test_trainer_names_a_truncated_shard_in_one_line(digits_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    bad = shards / "train-00002-of-00004.tfrecord"
    truncate(bad)
    meta = load_metadata(str(shards))
    assert corrupt_shards(str(shards), meta, 2, 0) == [str(bad)]
    assert corrupt_shards(str(shards), meta, 2, 1) == []
    base = [sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml", "--set", f"data.dir={shards}",
            "--set", "train.epochs=1", "--set", "train.export=false"]
    # The checksum check at start, then (check off) the read error during training.
    res = run([*base, "--set", f"run_dir={tmp_path}/a"], timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"data error: shard '{bad}' does not match its SHA-256 in metadata.json (truncated or changed); "
        "rebuild the shards, or set data.skip_corrupt_records=true to skip its corrupt records")
    res = run([*base, "--set", f"run_dir={tmp_path}/b", "--set", "data.verify_checksums=false"], timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"data error: shard '{bad}' is corrupt ("), res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_slow_input_is_measured_and_warned_about(tmp_path, caplog):
    import horovod.tensorflow as hvd
    import keras

    from trainer import callbacks as cb
    from trainer.step import DataParallelModel
    from trainer.summaries import EpochScalars

    hvd.init()
    inputs = keras.Input((4,))
    model = DataParallelModel.wrap(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=False)

    def slow(x, y):
        def sleep(v):
            time.sleep(0.05)
            return v
        out = tf.py_function(sleep, [x], tf.float32)
        out.set_shape(x.shape)
        return out, y

    ds = tf.data.Dataset.from_tensors((tf.zeros([8, 4]), tf.zeros([8], tf.int32))).repeat().map(slow).prefetch(1)
    scalars = EpochScalars(tf.summary.create_file_writer(str(tmp_path / "tb")), str(tmp_path / "val"))
    callbacks = [cb.InputWait(), cb.InputBoundWarning(), scalars]
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks"):
        history = model.fit(ds, epochs=2, steps_per_epoch=5, callbacks=callbacks, verbose=0, shuffle=False).history
    # Each batch waits >= 50 ms for a step of about a millisecond.
    assert all(f > 0.5 for f in history["input_wait_fraction"]), history
    assert caplog.text.count("input-bound") == 2
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(str(next((tmp_path / "tb").iterdir()))):
        tags |= {v.tag for v in event.summary.value}
    assert {"input_wait_fraction", "input_wait"} <= tags


def test_fast_input_is_measured_as_not_waiting(caplog):
    import horovod.tensorflow as hvd
    import keras

    from trainer import callbacks as cb
    from trainer.step import DataParallelModel

    hvd.init()
    # Steps of some milliseconds of compute, so that time counted in the wrong place would show.
    inputs = keras.Input((512,))
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    model = DataParallelModel.wrap(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=False)
    # A batch already in memory, prefetched: each get_next returns at once.
    ds = tf.data.Dataset.from_tensors((tf.zeros([512, 512]), tf.zeros([512], tf.int32))).repeat().prefetch(4)
    callbacks = [cb.InputWait(), cb.InputBoundWarning()]
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks"):
        history = model.fit(ds, epochs=2, steps_per_epoch=20, callbacks=callbacks, verbose=0, shuffle=False).history
    assert all(f < 0.1 for f in history["input_wait_fraction"]), history
    assert all(w < 0.005 for w in history["input_wait"]), history
    assert "input-bound" not in caplog.text
