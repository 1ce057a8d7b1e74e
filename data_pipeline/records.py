"""The TFRecord schema shared by the shard writer and the reader."""

import tensorflow as tf

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


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def encode_example(
    encoded: bytes,
    image_format: str,
    shape: tuple[int, int, int],
    label: int,
    class_name: str,
    example_id: str,
    original_size: tuple[int, int] | None = None,
) -> bytes:
    """Serialises one image record: encoded bytes, label, shape and the source's size."""
    height, width, channels = shape
    original_height, original_width = original_size or (height, width)
    features = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(image_format.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/channels": _int(channels),
        "image/class/label": _int(label),
        "image/class/name": _bytes(class_name.encode()),
        "image/id": _bytes(example_id.encode()),
        "image/original_height": _int(original_height),
        "image/original_width": _int(original_width),
    }
    # deterministic: map fields in key order, so every process writes the same bytes.
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, FEATURES)
