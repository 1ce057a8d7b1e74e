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
) -> tf.data.Dataset:
    """The stream of (image, label) batches of one rank.

    Args:
      files: every shard of the split, in a fixed order (the same on all ranks).
      num_shards: number of input pipelines (the world size when training).
      shard_index: this pipeline's index (the rank).
      per_replica_batch_size: examples per batch on this rank.
      image_size, channels: the model's input shape.
      training: shuffle and repeat forever; the caller bounds each epoch with
        steps_per_epoch, which is what keeps every rank at the same step count.
      seed: shuffle seed; reshuffled every pass.
      shuffle_buffer: records held for shuffling.
      drop_remainder: keep every batch at the full per-replica size.
    """
    ds = shard_records(files, num_shards, shard_index)
    if training:
        # Shuffle the small serialized records before decoding, not the decoded
        # images: the buffer then costs bytes per image, not height*width*3 floats.
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()

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
