"""Facts from an encoded file's header that TensorFlow's decoders do not report, read in graph ops.

The serving export (data_pipeline.source_image) needs them to treat a file
as the converter did, or to refuse it: whether a CMYK JPEG carries Adobe's
APP14 marker (TensorFlow inverts CMYK by it, Pillow always inverts), whether a
GIF's first frame has a transparent colour or leaves part of the screen
uncovered (TensorFlow paints both black), and a BMP's depth, compression and
palette (TensorFlow returns an 8-bit BMP's indices, not its colours). Walks
that cannot finish on a truncated file stop at its end; the decoder then
reports the damage.
"""

import tensorflow as tf

_ADOBE = (65, 100, 111, 98, 101)  # b"Adobe"


def _bytes(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    data = tf.io.decode_raw(encoded, tf.uint8)
    return data, tf.size(data)


def _reader(data: tf.Tensor, n: tf.Tensor):
    """at(i): byte i as int32, 0 past the end."""
    def at(i):
        inside = tf.logical_and(i >= 0, i < n)
        return tf.where(inside, tf.cast(tf.gather(data, tf.clip_by_value(i, 0, tf.maximum(n - 1, 0))), tf.int32), 0)
    return at


def jpeg_has_adobe_marker(encoded: tf.Tensor) -> tf.Tensor:
    """Whether an APP14 "Adobe" segment of at least 12 data bytes comes before the first scan, as libjpeg decides."""
    data, n = _bytes(encoded)
    at = _reader(data, n)

    def step(pos, found, done):
        marker = at(pos + 1)
        length = at(pos + 2) * 256 + at(pos + 3)
        stop = tf.reduce_any([pos + 3 >= n, at(pos) != 0xFF, marker == 0xDA, marker == 0xD9])
        named = tf.reduce_all([at(pos + 4 + i) == c for i, c in enumerate(_ADOBE)])
        adobe = tf.reduce_all([marker == 0xEE, length >= 14, named])
        # SOI, TEM and RSTn stand alone; 0xFF is a fill byte; every other marker has a length.
        alone = tf.logical_or(tf.logical_or(marker == 0x01, marker == 0xD8),
                              tf.logical_and(marker >= 0xD0, marker <= 0xD7))
        size = tf.where(marker == 0xFF, 1, tf.where(alone, 2, 2 + length))
        return pos + size, tf.logical_or(found, tf.logical_and(adobe, tf.logical_not(stop))), stop

    _, found, _ = tf.while_loop(lambda pos, found, done: tf.logical_not(tf.logical_or(found, done)), step,
                                (tf.constant(2), tf.constant(False), tf.constant(False)))
    return found


def _le16(at, i):
    return at(i) + at(i + 1) * 256


def gif_first_frame(encoded: tf.Tensor) -> dict:
    """{"transparency", "covers_screen", "palette"} of a GIF's first image (booleans).

    transparency: a Graphic Control Extension before the first image sets the
    transparent-colour flag (Pillow then composites that colour on white).
    """
    data, n = _bytes(encoded)
    at = _reader(data, n)
    packed = at(10)
    global_table = tf.bitwise.bitwise_and(packed, 0x80) > 0
    start = 13 + tf.where(global_table, 3 * tf.bitwise.left_shift(2, tf.bitwise.bitwise_and(packed, 7)), 0)

    def step(pos, in_blocks, transparency, done):
        size = at(pos)
        # Inside an extension: sub-blocks of `size` bytes, ended by a zero size.
        block_next = tf.where(size == 0, pos + 1, pos + 1 + size)
        extension = tf.logical_and(size == 0x21, tf.logical_not(in_blocks))
        gce = tf.logical_and(extension, at(pos + 1) == 0xF9)
        flagged = tf.logical_and(gce, tf.bitwise.bitwise_and(at(pos + 3), 1) > 0)
        stop = tf.logical_or(pos >= n, tf.logical_and(tf.logical_not(in_blocks), size != 0x21))
        next_pos = tf.where(in_blocks, block_next, pos + 2)
        next_in_blocks = tf.where(in_blocks, size != 0, extension)
        return (tf.where(stop, pos, next_pos), tf.logical_and(next_in_blocks, tf.logical_not(stop)),
                tf.logical_or(transparency, flagged), stop)

    pos, _, transparency, _ = tf.while_loop(
        lambda pos, in_blocks, transparency, done: tf.logical_not(done), step,
        (start, tf.constant(False), tf.constant(False), tf.constant(False)))
    image = at(pos) == 0x2C
    covers = tf.reduce_all([image, _le16(at, pos + 1) == 0, _le16(at, pos + 3) == 0,
                            _le16(at, pos + 5) == _le16(at, 6), _le16(at, pos + 7) == _le16(at, 8)])
    local_table = tf.bitwise.bitwise_and(at(pos + 9), 0x80) > 0
    return {"transparency": transparency, "covers_screen": covers,
            "palette": tf.logical_and(image, tf.logical_or(global_table, local_table))}


def bmp_header(encoded: tf.Tensor) -> dict:
    """{"header_size", "bits", "compression", "colors"} (int32) of a BMP, and "palette": uint8 [256, 3] RGB.

    The palette holds the file's colour table (BGRX entries after the header), zeros past its end.
    """
    head = tf.io.decode_raw(tf.strings.substr(encoded, 0, 54), tf.uint8)
    head = tf.cast(tf.pad(head, [[0, 54 - tf.size(head)]]), tf.int32)

    def le(i, count):
        return tf.add_n([head[i + k] * (1 << (8 * k)) for k in range(count)])

    header_size, bits, colors = le(14, 4), le(28, 2), le(46, 4)
    colors = tf.where(colors == 0, tf.bitwise.left_shift(1, tf.minimum(bits, 8)), colors)
    table = tf.io.decode_raw(tf.strings.substr(encoded, 14 + header_size, 4 * tf.minimum(colors, 256)), tf.uint8)
    table = tf.reshape(tf.pad(table, [[0, 1024 - tf.size(table)]]), [256, 4])
    return {"header_size": header_size, "bits": bits, "compression": le(30, 4), "colors": colors,
            "palette": tf.reverse(table[:, :3], axis=[1])}
