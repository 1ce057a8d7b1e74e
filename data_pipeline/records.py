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
) -> bytes:
    """Serialises one image record: encoded bytes, label and shape."""
    height, width, channels = shape
    features = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(image_format.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/channels": _int(channels),
        "image/class/label": _int(label),
        "image/class/name": _bytes(class_name.encode()),
        "image/id": _bytes(example_id.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, FEATURES)
