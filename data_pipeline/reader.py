"""Per-rank tf.data input streams over the shards written by build_shards."""

import logging

import tensorflow as tf

from data_pipeline.metadata import DataError
from data_pipeline.records import parse_example

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


def shard_files_for(files: list[str], num_shards: int, shard_index: int) -> list[str] | None:
    """The files of input pipeline `shard_index`, or None when there are too few files.

    File-level sharding (every `num_shards`-th file) is the cheap way to split
    data between ranks: each rank opens only its own files. It needs at least
    one file per rank.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    if len(files) < num_shards:
        return None
    return files[shard_index::num_shards]


def shard_records(files: list[str], num_shards: int, shard_index: int) -> tf.data.Dataset:
    """The serialized records of input pipeline `shard_index`, one pass."""
    if not files:
        raise DataError("no shard files given")
    mine = shard_files_for(files, num_shards, shard_index)
    if mine is None:
        log.warning(
            "%d shard files for %d input pipelines: sharding by element, so every pipeline reads "
            "all files and keeps 1/%d of the records (slower; write at least %d shards)",
            len(files), num_shards, num_shards, num_shards,
        )
        return tf.data.TFRecordDataset(files).shard(num_shards, shard_index)
    return tf.data.TFRecordDataset(mine, num_parallel_reads=min(len(mine), 8))


def training_passes(
    records: tf.data.Dataset, shuffle_buffer: int, seed: int, skip: int = 0, per_pass: int = 0, count: int = 0
) -> tf.data.Dataset:
    """Passes over `records`, pass p shuffled with its own seed derived from (seed, p).

    With `per_pass` (records in one pass) and `count` (records wanted) given,
    the order is a function of the position alone: a resumed run that skips
    `skip` records continues exactly where its checkpoint left off, skipping
    whole passes for free and then at most one pass of undecoded records.
    Without them, passes reshuffle from `seed` forever.

    The shuffle works on the small serialized records, before decoding: its
    buffer costs bytes per image, not height x width x channels floats.
    """
    if not (per_pass and count):
        return records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    first, offset = divmod(skip, per_pass)
    n_passes = -(-(offset + count) // per_pass)
    # tf.data takes shuffle seeds as Python ints only, so each pass is its own
    # dataset; choose_from_datasets strings them together without nesting.
    passes = [
        records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + p, reshuffle_each_iteration=False)
        for p in range(first, first + n_passes)
    ]
    order = tf.data.Dataset.range(n_passes).flat_map(lambda i: tf.data.Dataset.from_tensors(i).repeat(per_pass))
    return tf.data.Dataset.choose_from_datasets(passes, order).skip(offset).take(count)


def records_per_pass(shard_counts: list[int], num_shards: int, shard_index: int) -> int:
    """How many records input pipeline `shard_index` reads in one pass (see shard_records)."""
    mine = shard_files_for(list(range(len(shard_counts))), num_shards, shard_index)
    if mine is None:  # element-level: every num_shards-th record of the concatenation
        total = sum(shard_counts)
        return max(0, (total - shard_index + num_shards - 1) // num_shards)
    return sum(shard_counts[i] for i in mine)


def decode_image(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Encoded bytes to a float32 [image_size, image_size, channels] image in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def make_dataset(
    files: list[str],
    num_shards: int,
    shard_index: int,
    per_replica_batch_size: int,
    image_size: int,
    channels: int,
    *,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    drop_remainder: bool = True,
    skip_records: int = 0,
    records_per_pass: int = 0,
    num_records: int = 0,
) -> tf.data.Dataset:
    """The stream of (image, label) batches of one rank.

    Args:
      files: every shard of the split, in a fixed order (the same on all ranks).
      num_shards: number of input pipelines (the world size when training).
      shard_index: this pipeline's index (the rank).
      per_replica_batch_size: examples per batch on this rank.
      image_size, channels: the model's input shape.
      training: shuffle, and pass over the shards again and again (see
        num_records); the caller bounds each epoch with steps_per_epoch, which
        is what keeps every rank at the same step count.
      seed: shuffle seed; every pass is shuffled differently.
      shuffle_buffer: records held for shuffling.
      drop_remainder: keep every batch at the full per-replica size.
      skip_records, records_per_pass, num_records: a training stream of
        `num_records` records that starts after `skip_records` (a resumed run),
        given that one pass over this pipeline's shards holds `records_per_pass`.
        Without them the stream repeats forever.
    """
    ds = shard_records(files, num_shards, shard_index)
    if training:
        ds = training_passes(ds, shuffle_buffer, seed, skip_records, records_per_pass, num_records)

    def parse(serialized):
        ex = parse_example(serialized)
        image = decode_image(ex["image/encoded"], image_size, channels)
        return image, tf.cast(ex["image/class/label"], tf.int32)

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(per_replica_batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(AUTOTUNE)


def synthetic_dataset(
    per_replica_batch_size: int, image_size: int, channels: int, num_classes: int, seed: int = 0
) -> tf.data.Dataset:
    """One random batch of the model's input shape, repeated forever.

    The standard way to measure training throughput without the input pipeline.
    """
    gen = tf.random.Generator.from_seed(seed)
    images = gen.uniform([per_replica_batch_size, image_size, image_size, channels])
    labels = gen.uniform([per_replica_batch_size], maxval=num_classes, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()
