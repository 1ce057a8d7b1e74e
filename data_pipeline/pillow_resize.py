"""Pillow's downscale of the converter (data_pipeline.images), in TensorFlow ops, to the same integers.

The converter shrinks an image whose longer side is over --max-side with
`Image.resize(size, BICUBIC, reducing_gap=3.0)`, after letting libjpeg decode
a JPEG at 1/2, 1/4 or 1/8 scale (`img.draft`). A served image must go through
the same steps, or the model sees other pixels than it was validated on.
`tf.image.resize(antialias=True)` is close, not equal: this module follows
Pillow's C code (src/libImaging/Reduce.c and Resample.c, Pillow 9 to 13)
operation by operation, in the same order and precision (float64 where
Pillow uses double, float32 where it uses float, integer fixed point where it
rounds), so that the result is the same bytes. Sizes are tensors: the graph
serves images of any size.
"""

import tensorflow as tf

from data_pipeline.normalisation import PASS_ORDERS

# Resample.c: 8 bits of result, 2 for overshoot, the rest of an int32 for the coefficients.
_PRECISION_BITS = 22
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5


def jpeg_draft_scale(height: tf.Tensor, width: tf.Tensor, max_side: int) -> tf.Tensor:
    """libjpeg's scale denominator (1, 2, 4 or 8) that JpegImageFile.draft picks for the converter's request.

    The converter asks for (int(w * r) + 1, int(h * r) + 1), r = max_side / max(w, h);
    draft takes the largest of 8, 4, 2, 1 not above min(w // asked_w, h // asked_h).
    """
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    ratio = tf.constant(float(max_side), tf.float64) / tf.maximum(h, w)
    asked_w = tf.cast(tf.floor(w * ratio), tf.int64) + 1
    asked_h = tf.cast(tf.floor(h * ratio), tf.int64) + 1
    fits = tf.minimum(tf.cast(width, tf.int64) // asked_w, tf.cast(height, tf.int64) // asked_h)
    return tf.cast(tf.where(fits >= 8, 8, tf.where(fits >= 4, 4, tf.where(fits >= 2, 2, 1))), tf.int32)


def target_size(height: tf.Tensor, width: tf.Tensor, max_side: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of images._resized: each side times max_side / longer side, rounded as Python's round."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    scale = tf.constant(float(max_side), tf.float64) / tf.maximum(h, w)
    return (tf.maximum(tf.cast(tf.round(h * scale), tf.int32), 1),
            tf.maximum(tf.cast(tf.round(w * scale), tf.int32), 1))


def _reduce_counts(size: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Source pixels in each output cell along one axis: `factor`, and fewer in a last partial cell."""
    starts = tf.range((size + factor - 1) // factor) * factor
    return tf.minimum(factor, size - starts)


def reduce(image: tf.Tensor, factor_y: tf.Tensor, factor_x: tf.Tensor) -> tf.Tensor:
    """Image.reduce((factor_x, factor_y)): box averages, last row and column over the pixels there are.

    Reduce.c rounds each cell of n pixels as ((sum + n // 2) * m) >> 24 with
    m = (uint32)(2^32 / (256 n)) computed in float32; every special case
    (2x2, 3x3, ..., the corners) is that formula.
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    out_h, out_w = (height + factor_y - 1) // factor_y, (width + factor_x - 1) // factor_x
    padded = tf.pad(image, [[0, out_h * factor_y - height], [0, out_w * factor_x - width], [0, 0]])
    # int32 holds a cell's sum up to 8 million pixels (a shrink by thousands); the rounding below needs int64.
    cells = tf.reshape(tf.cast(padded, tf.int32), [out_h, factor_y, out_w, factor_x, -1])
    sums = tf.cast(tf.reduce_sum(tf.reduce_sum(cells, axis=1), axis=2), tf.int64)
    n = tf.cast(_reduce_counts(height, factor_y)[:, None] * _reduce_counts(width, factor_x)[None, :], tf.int64)
    multiplier = tf.cast(tf.constant(2.0**32, tf.float32) / tf.cast(256 * n, tf.float32), tf.int64)
    out = tf.bitwise.right_shift((sums + (n // 2)[..., None]) * multiplier[..., None], tf.constant(24, tf.int64))
    return tf.cast(out, tf.uint8)


def _bicubic(x: tf.Tensor) -> tf.Tensor:
    """Resample.c's bicubic_filter (a = -0.5), with its operations in its order."""
    x = tf.abs(x)
    near = ((_BICUBIC_A + 2.0) * x - (_BICUBIC_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * _BICUBIC_A
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _coefficients(in_size: tf.Tensor, in_extent: tf.Tensor, out_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(first source index [out], int32 fixed-point weights [out, ksize]): Resample.c's precompute_coeffs
    and normalize_coeffs_8bpc.

    `in_extent` is the float32 box side Pillow passes (after a reduce, size / factor, not an integer).
    """
    scale = tf.cast(in_extent, tf.float64) / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; a negative start is clamped to 0 anyway.
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
    taps = tf.range(ksize)
    arg = (tf.cast(taps[None, :] + xmin[:, None], tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = tf.where(taps[None, :] < xmax[:, None], _bicubic(arg), tf.zeros_like(arg))
    # The C loop sums left to right; the same order gives the same rounding of the total.
    total = tf.foldl(lambda acc, column: acc + column, tf.transpose(weights),
                     initializer=tf.zeros([out_size], tf.float64))
    divisor = tf.where(total == 0.0, tf.ones_like(total), total)  # Pillow leaves all-zero weights as they are
    weights = weights / divisor[:, None]
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = tf.cast(tf.where(weights < 0.0, scaled - 0.5, scaled + 0.5), tf.int32)  # round half away from zero
    return xmin, fixed


def _resample_rows(image: tf.Tensor, in_extent: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
    """One pass of ImagingResample along axis 1 of a uint8 [rows, columns, channels] image, clipped to uint8."""
    xmin, fixed = _coefficients(tf.shape(image)[1], in_extent, out_size)
    source = tf.cast(image, tf.int32)
    last = tf.shape(image)[1] - 1
    rounding = tf.fill(tf.stack([tf.shape(image)[0], out_size, tf.shape(image)[2]]), 1 << (_PRECISION_BITS - 1))

    # Tap by tap: the int32 sums of the C code (which cannot overflow), without a
    # [rows, out, ksize, channels] intermediate. Taps past a window's end weigh 0.
    def add_tap(acc, k):
        columns = tf.gather(source, tf.minimum(xmin + k, last), axis=1)
        return acc + columns * fixed[:, k][None, :, None]

    total = tf.foldl(add_tap, tf.range(tf.shape(fixed)[1]), initializer=rounding)
    # clip8: an arithmetic shift, then saturation to [0, 255].
    return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(total, _PRECISION_BITS), 0, 255), tf.uint8)


def vertical_first(in_h: tf.Tensor, in_w: tf.Tensor, out_h: tf.Tensor, out_w: tf.Tensor, pass_order: str) -> tf.Tensor:
    """Whether the recorded Pillow resamples the columns before the rows (the order changes the rounding).

    Pillow 10 to 12.1 always go rows first (resize does not ask); 12.2 and 12.3 go columns first for an
    image over 100 times taller than wide that shrinks in height (Image.resize); 13 when the height shrinks
    by more than twice as many pixels as the width (ImagingResampleInner). Sizes are those after the reduce.
    """
    if pass_order == PASS_ORDERS[1]:
        return tf.logical_and(in_h > in_w * 100, out_h < in_h)
    return tf.logical_and(in_h - out_h > 0, in_h - out_h > (in_w - out_w) * 2)


def resize(image: tf.Tensor, out_h: tf.Tensor, out_w: tf.Tensor, reducing_gap: float, pass_order: str) -> tf.Tensor:
    """Image.resize((out_w, out_h), BICUBIC, reducing_gap=reducing_gap) of a uint8 [h, w, channels] L or RGB image."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    # Image.resize: reduce by int(side / out / gap) (at least 1) over the whole image, then resample
    # the box (0, 0, w / fx, h / fy), which Pillow hands to C as float32.
    factor_x = tf.maximum(tf.cast(tf.cast(width, tf.float64) / tf.cast(out_w, tf.float64) / reducing_gap, tf.int32), 1)
    factor_y = tf.maximum(tf.cast(tf.cast(height, tf.float64) / tf.cast(out_h, tf.float64) / reducing_gap, tf.int32), 1)
    reduced = tf.cond(tf.logical_or(factor_x > 1, factor_y > 1),
                      lambda: reduce(image, factor_y, factor_x), lambda: image)
    extent_w = tf.cast(tf.cast(width, tf.float64) / tf.cast(factor_x, tf.float64), tf.float32)
    extent_h = tf.cast(tf.cast(height, tf.float64) / tf.cast(factor_y, tf.float64), tf.float32)

    def rows(img):
        return _resample_rows(img, extent_w, out_w)

    def columns(img):
        return tf.transpose(_resample_rows(tf.transpose(img, [1, 0, 2]), extent_h, out_h), [1, 0, 2])

    # Each pass is rounded to uint8, as Pillow's are, so the order matters. (No cond on a constant:
    # grappler then fails to sort the graph, and says so at every load.)
    if pass_order == PASS_ORDERS[0]:
        return columns(rows(reduced))
    in_h, in_w = tf.shape(reduced)[0], tf.shape(reduced)[1]
    return tf.cond(vertical_first(in_h, in_w, out_h, out_w, pass_order),
                   lambda: rows(columns(reduced)), lambda: columns(rows(reduced)))


def shrink_like_converter(image: tf.Tensor, max_side: int, reducing_gap: float, pass_order: str) -> tf.Tensor:
    """images._resized: the image itself when its longer side is at most max_side, else Pillow's resize to fit."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if not max_side:
        return image
    out_h, out_w = target_size(height, width, max_side)
    return tf.cond(tf.maximum(height, width) <= max_side, lambda: image,
                   lambda: resize(image, out_h, out_w, reducing_gap, pass_order))
