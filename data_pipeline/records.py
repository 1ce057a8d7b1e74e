"""The TFRecord schema shared by the shard writer and the reader."""

import tensorflow as tf

from data_pipeline.record_writer import encode_example  # noqa: F401  (the writer's half, without TensorFlow)

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/channels": tf.io.FixedLenFeature([], tf.int64),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/name": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string),
    # The source file's size before any --max-side resize (0 in older shards).
    "image/original_height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/original_width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, FEATURES)
