"""The per-rank reader: sharding per pass, uneven shards, augmentation, corrupt shards, input wait."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tensorflow as tf

from data_pipeline.augment import Augment
from data_pipeline.metadata import DataError, corrupt_shards, load_metadata
from data_pipeline.positions import pass_files, records_per_pass
from data_pipeline.preprocess import augment, center_crop
from data_pipeline.reader import corrupt_shard_error, eval_stream, train_stream, training_records
from data_pipeline.records import encode_example, parse_example
from data_pipeline.stream_options import EvalOptions, TrainOptions
from helpers import ROOT, run


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


def write_with_garbage_images(path, good: list[bytes], bad_at: set[int], labels: list[int]):
    """A shard of valid TFRecords (the project's writer) whose records at `bad_at` hold bytes that are no image."""
    from data_pipeline.record_writer import TFRecordFile

    with TFRecordFile(str(path)) as f:
        for j, label in enumerate(labels):
            encoded = b"\xff\xd8\xff\xe0 not a JPEG" if j in bad_at else good[j % len(good)]
            f.write(encode_example(encoded, "jpeg", (6, 9, 3), label, "c", f"{path}-{j}"))


def test_undecodable_records_are_replaced_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    good = [tf.io.encode_jpeg(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).numpy() for _ in range(3)]
    files = [str(tmp_path / f"s{i}.tfrecord") for i in range(2)]
    write_with_garbage_images(files[0], good, {1, 7, 8}, list(range(20)))
    write_with_garbage_images(files[1], good, set(), list(range(100, 120)))
    skipped = tf.Variable(0, dtype=tf.int64)
    # One example per batch; 37 decodable records per pass: two whole passes.
    options = TrainOptions(per_replica_batch_size=1, image_size=4, channels=3, num_records=74, shard_counts=[20, 20],
                           skip_corrupt=True, shuffle_buffer=1)
    labels = [int(y[0]) for _, y in train_stream(files, options, skipped)]
    # As many examples as asked for, although 3 records of the 40 do not decode: the stream reads on.
    good = [v for v in range(20) if v not in (1, 7, 8)] + list(range(100, 120))
    assert len(labels) == 74 and sorted(labels[:37]) == sorted(labels[37:]) == good
    assert int(skipped.numpy()) == 6
    # Counted as each batch is handed out, not as the pipeline reads ahead (it holds 3 bad records by now).
    skipped.assign(0)
    it = iter(train_stream(files, options, skipped))
    next(it)
    time.sleep(0.5)
    assert int(skipped.numpy()) == 0
    rest = sum(1 for _ in it)
    assert rest == 73 and int(skipped.numpy()) == 6


def test_undecodable_records_are_counted_exactly_when_decodes_finish_out_of_order(tmp_path):
    # Large images among small ones make parallel decodes finish out of order. In the default record order
    # (data.deterministic_order) each batch counts exactly the records skipped before its examples.
    rng = np.random.default_rng(0)
    small = tf.io.encode_png(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).numpy()
    large = tf.io.encode_png(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)).numpy()
    path, bad = tmp_path / "s.tfrecord", {1, 7, 8, 13, 19}
    write_with_garbage_images(path, [large, small, small, small, small], bad, list(range(20)))
    good_per_pass, passes = 20 - len(bad), 4
    options = TrainOptions(per_replica_batch_size=3, image_size=4, channels=3, num_records=good_per_pass * passes,
                           shard_counts=[20], skip_corrupt=True, shuffle_buffer=1, threads=2)
    skipped = tf.Variable(0, dtype=tf.int64)
    counts, labels = [], []
    for _, y in train_stream([str(path)], options, skipped):
        counts.append(int(skipped.numpy()))
        labels.append([int(v) for v in y])
    added = np.diff([0, *counts]).tolist()
    # A skipped record is counted with the batch of the example that follows it in the file: the bad
    # records at 1, 7, 8, 13 come before 2, 9, 9, 14; the one at 19 before the next pass's 0.
    before = {2: 1, 9: 2, 14: 1, 0: 1}
    expected = [sum(before.get(v, 0) for v in batch) for batch in labels]
    expected[0] -= 1  # the first pass's 0 follows no record
    assert added == expected, f"labels {labels}"
    assert counts[-1] == len(bad) * passes - 1


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


def corrupt_images(shard: Path, meta: dict, bad: set[int]) -> set[str]:
    """Rewrites `shard` with the project's record writer, the records at positions `bad` holding bytes
    that are no image; updates its SHA-256 in `meta`. Returns the ids of the damaged records."""
    from data_pipeline.metadata import sha256_file
    from data_pipeline.record_writer import TFRecordFile

    records = [parse_example(r) for r in tf.data.TFRecordDataset(str(shard))]
    with TFRecordFile(str(shard)) as f:
        for j, ex in enumerate(records):
            encoded = b"\xff\xd8\xff\xe0 not a JPEG" if j in bad else ex["image/encoded"].numpy()
            shape = tuple(int(ex[f"image/{k}"]) for k in ("height", "width", "channels"))
            f.write(encode_example(encoded, ex["image/format"].numpy().decode(), shape,
                                   int(ex["image/class/label"]), ex["image/class/name"].numpy().decode(),
                                   ex["image/id"].numpy().decode()))
    for split in meta["splits"].values():
        for s in split["shards"]:
            if s["file"] == shard.name:
                s["sha256"] = sha256_file(str(shard))
    return {records[j]["image/id"].numpy().decode() for j in bad}


def skipped_per_epoch(files, bad_ids, num_shards, per_epoch, epochs) -> list[int]:
    """Undecodable records among the raw records each epoch reads, summed over pipelines: the records
    between the last example of the previous epoch and the last of this one (seed 0, as the config)."""
    totals = [0] * epochs
    for index in range(num_shards):
        good = bad = 0
        for r, _ in training_records(files, num_shards, index, seed=0, shuffle_buffer=2048):
            if good == per_epoch * epochs:
                break
            if parse_example(r)["image/id"].numpy().decode() in bad_ids:
                bad += 1
            else:
                totals[good // per_epoch] += bad
                good, bad = good + 1, 0
    return totals


@pytest.mark.horovod
def test_undecodable_images_on_one_rank_neither_stall_nor_shorten_its_epochs(digits_shards, tmp_path):
    from test_horovod import checkpoint_steps, epoch_records, launch_argv, rank_records

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    meta = load_metadata(str(shards))
    files = [str(shards / s["file"]) for s in meta["splits"]["train"]["shards"]]
    # A shard that rank 1 (of 2) reads in the first pass, with 9 of its records damaged; 4 in validation.
    victim = Path(pass_files(files, 2, 1, 0, 0)[0])
    bad_ids = corrupt_images(victim, meta, {0, 5, 50, 51, 52, 100, 150, 170, 171})
    val = shards / meta["splits"]["validation"]["shards"][0]["file"]
    corrupt_images(val, meta, {1, 2, 3, 30})
    (shards / "metadata.json").write_text(json.dumps(meta))
    argv = launch_argv(tmp_path / "run", shards, "--set", "train.epochs=2", "--set", "train.export=false",
                       "--set", "data.skip_corrupt_records=true", "--stall-warning-sec", "2",
                       "--stall-shutdown-sec", "5")
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            p.kill()
        raise AssertionError("the ranks did not finish:\n" + proc.communicate()[0][-3000:]) from None
    assert proc.returncode == 0, out[-3000:]
    # The same steps on both ranks: every epoch on each, the last checkpoint at 2 x 22 steps.
    assert [r["epoch"] for r in rank_records(out)[0]] == [r["epoch"] for r in rank_records(out)[1]] == [1, 2]
    assert checkpoint_steps(tmp_path / "run")[-1] == 2 * 22
    records = epoch_records(tmp_path / "run")
    expected = skipped_per_epoch(files, bad_ids, 2, 22 * 32, 2)
    assert expected[0] > 0 and sum(expected) <= 2 * len(bad_ids)
    assert [r["skipped_records"] for r in records] == expected
    assert [r["val_skipped_records"] for r in records] == [4, 4]
    assert records[-1]["val_accuracy"] > 0.5
    # Checkpoint evaluation counts what it skipped instead of failing.
    res = run([sys.executable, "-m", "trainer.evaluate", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={shards}",
               "--set", "data.skip_corrupt_records=true", "--checkpoint", "latest"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.split("evaluation ", 1)[1].splitlines()[0])
    assert report["val_skipped_records"] == 4
    assert report["val_examples"] == meta["splits"]["validation"]["num_examples"] - 4


def test_slow_input_is_measured_and_warned_about(tmp_path, caplog):
    import horovod.tensorflow as hvd
    import keras

    from trainer.input_wait import InputBoundWarning, InputWait
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
    callbacks = [InputWait(), InputBoundWarning(), scalars]
    with caplog.at_level(logging.WARNING, logger="trainer.input_wait"):
        history = model.fit(ds, epochs=3, steps_per_epoch=5, callbacks=callbacks, verbose=0, shuffle=False).history
    # Each batch waits >= 50 ms for a step of about a millisecond.
    assert all(f > 0.5 for f in history["input_wait_fraction"]), history
    # A warning at the first input-bound epoch, the others counted in one line at the end.
    assert caplog.text.count("input-bound") == 2
    assert "epoch 1: input-bound" in caplog.text and "input-bound in 3 of 3 epochs" in caplog.text
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(str(next((tmp_path / "tb").iterdir()))):
        tags |= {v.tag for v in event.summary.value}
    assert {"input_wait_fraction", "input_wait"} <= tags


def test_fast_input_is_measured_as_not_waiting(caplog):
    import horovod.tensorflow as hvd
    import keras

    from trainer.input_wait import InputBoundWarning, InputWait
    from trainer.step import DataParallelModel

    hvd.init()
    # Steps of some milliseconds of compute, so that time counted in the wrong place would show.
    inputs = keras.Input((512,))
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    model = DataParallelModel.wrap(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=False)
    # A batch already in memory, prefetched: each get_next returns at once.
    ds = tf.data.Dataset.from_tensors((tf.zeros([512, 512]), tf.zeros([512], tf.int32))).repeat().prefetch(4)
    callbacks = [InputWait(), InputBoundWarning()]
    with caplog.at_level(logging.WARNING, logger="trainer.input_wait"):
        history = model.fit(ds, epochs=2, steps_per_epoch=20, callbacks=callbacks, verbose=0, shuffle=False).history
    assert all(f < 0.1 for f in history["input_wait_fraction"]), history
    assert all(w < 0.005 for w in history["input_wait"]), history
    assert "input-bound" not in caplog.text
