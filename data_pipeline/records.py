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


# What the reader needs of a record: these two features alone, which shards adopted from another
# converter (data_pipeline.adopt_shards: ImageNet's, without image/class/name or image/id) hold too.
READ_FEATURES = {key: FEATURES[key] for key in ("image/encoded", "image/class/label")}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, FEATURES)


def parse_image_and_label(serialized: tf.Tensor, label_offset: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """The encoded image and the int32 label of a record, the stored label less `label_offset` (metadata.json)."""
    ex = tf.io.parse_single_example(serialized, READ_FEATURES)
    return ex["image/encoded"], tf.cast(ex["image/class/label"] - label_offset, tf.int32)
