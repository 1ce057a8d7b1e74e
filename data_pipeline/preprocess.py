"""Image preprocessing of the reader: decode, crop, flip, resize, scale.

Training randomness comes from stateless ops seeded per record (see
data_pipeline.reader), never from a global generator: a record at a given
position gets the same crop and flip in a resumed run as in the uninterrupted
one.
"""

import tensorflow as tf

from data_pipeline import source_image
from data_pipeline.augment import Augment
from data_pipeline.normalisation import Normalisation


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes to uint8 [height, width, channels]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _to_float(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def center_crop(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """Evaluation geometry: the central square holding `crop_fraction` of the shorter side, resized.

    Cropping before resizing gives the same pixels as resizing the shorter side
    to image_size / crop_fraction and cropping image_size, at less cost. With
    crop_fraction 1 a square image is only resized.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction), tf.int32)
    side = tf.maximum(side, 1)
    top, left = (height - side) // 2, (width - side) // 2
    return _to_float(image[top : top + side, left : left + side], image_size)


def source_pixels(encoded: tf.Tensor, channels: int, source: Normalisation) -> tf.Tensor:
    """uint8 [h, w, channels] of an original image file, as the reader would decode the record build_shards made of it.

    The file's own bytes where build_shards stored them unchanged, else the
    converter's normalisation `source` (data_pipeline.source_image).
    """
    def normalised():
        return source_image.as_read(source_image.normalise(encoded, source), encoded, source, channels)

    # switch_case rather than cond: a lowered cond around the normaliser's loops and checks makes
    # grappler log a warning at every load of the export.
    image = tf.switch_case(tf.cast(source_image.stored_unchanged(encoded, source), tf.int32),
                           [normalised, lambda: decode(encoded, channels)])
    image.set_shape([None, None, channels])
    return image


def eval_image(encoded: tf.Tensor, channels: int, image_size: int, crop_fraction: float = 1.0,
               source: Normalisation | None = None) -> tf.Tensor:
    """Encoded bytes to the evaluation input, float32 [image_size, image_size, channels] in [0, 1].

    The one definition for the evaluation stream and the serving export
    (trainer.export): a served model sees the pixels it was validated on. A
    record (source None) is decoded as it is; an original file (the export)
    goes first through the normalisation `source` that build_shards applied
    to make the record.
    """
    image = decode(encoded, channels) if source is None else source_pixels(encoded, channels, source)
    return center_crop(image, image_size, crop_fraction)


def augment(image: tf.Tensor, seed: tf.Tensor, image_size: int, aug: Augment, crop_fraction: float = 1.0) -> tf.Tensor:
    """Training geometry: random resized crop and/or flip, seeded by `seed` (int64 [2])."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if aug.random_resized_crop:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(aug.crop_area_min, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        out = _to_float(tf.slice(image, begin, size), image_size)
    else:
        out = center_crop(image, image_size, crop_fraction)
    if aug.flip:
        out = tf.image.stateless_random_flip_left_right(out, flip_seed)
    return out
