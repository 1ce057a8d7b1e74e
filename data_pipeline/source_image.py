"""The converter's normalisation of one encoded file, in TensorFlow ops: what the serving export feeds the eval crop.

build_shards stores every image as Pillow normalised it (data_pipeline.images:
mode rules, then the --max-side downscale). A served file arrives as it was
before that, so the export repeats those steps in its graph, with Pillow's own
integer formulas, and the model sees the pixels the validation stream saw:
  - JPEG: libjpeg's accurate integer DCT (Pillow's; TensorFlow's default is
    the fast one), at the draft scale Pillow would pick; CMYK as TensorFlow
    converts it (within 1 of Pillow's cmyk2rgb), and only with Adobe's marker.
  - PNG: 16-bit samples keep their high byte; gray+alpha, RGBA and palettes
    with transparency are composited on white; a gray or RGB tRNS colour is
    ignored, as Pillow's convert() ignores it.
  - GIF: the first frame, refused where TensorFlow hides what Pillow shows (a
    transparent colour, a frame smaller than the screen, no colour table).
  - BMP: 8-, 24- and 32-bit uncompressed (an 8-bit file through its palette);
    other variants are refused.
  - RGB to gray by Pillow's L24; gray to RGB by repetition.
EXIF orientation is ignored, as by the converter (normalisation.exif_orientation).
Refusals are InvalidArgumentError whose message says what the export cannot
reproduce. The pixels are those before the converter's re-encoding: a record
stored as JPEG differs from them by that encoding's loss.
"""

import tensorflow as tf

from data_pipeline import image_headers, pillow_resize
from data_pipeline.normalisation import Normalisation

# The leading bytes of JPEG, PNG, GIF and BMP files: image_format's indices.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def image_format(encoded: tf.Tensor) -> tf.Tensor:
    """0 (JPEG), 1 (PNG), 2 (GIF) or 3 (BMP) by a file's first bytes, -1 for none of them."""
    found = tf.constant(-1)
    for i, magic in reversed(list(enumerate(_MAGIC))):
        found = tf.where(tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic), i, found)
    return found


def _refuse_unless(ok: tf.Tensor, message: str):
    return tf.debugging.Assert(ok, [f"image_bytes: {message}"])


def _after_checks(checks: list, make):
    """`make()`'s tensor, its ops created after `checks` ran: a decode that would fail on a file a check
    refuses must not run first, or its own error would come out instead of the check's reason (the
    ops of a graph without a dependency between them run in any order)."""
    with tf.control_dependencies(checks):
        return tf.identity(make())


def _jpeg(encoded: tf.Tensor, norm: Normalisation) -> tf.Tensor:
    height, width, components = tf.unstack(tf.image.extract_jpeg_shape(encoded))
    branches = [lambda r=r: tf.io.decode_jpeg(encoded, channels=0, ratio=r, dct_method="INTEGER_ACCURATE")
                for r in (1, 2, 4, 8)]
    # TensorFlow converts CMYK by Adobe's marker (inverted) or without it (plain); Pillow always inverts.
    cmyk_ok = tf.cond(components == 4, lambda: image_headers.jpeg_has_adobe_marker(encoded), lambda: tf.constant(True))
    check = _refuse_unless(cmyk_ok, "a CMYK JPEG without the Adobe APP14 marker: the converter reads it inverted, "
                                    "TensorFlow does not; convert it to RGB")
    if not norm.max_side:
        return _after_checks([check], branches[0])
    scale = pillow_resize.jpeg_draft_scale(height, width, norm.max_side)
    index = tf.where(scale == 8, 3, tf.where(scale == 4, 2, tf.where(scale == 2, 1, 0)))
    return _after_checks([check], lambda: tf.switch_case(index, branches))


def _png(encoded: tf.Tensor) -> tf.Tensor:
    # uint8 decoding keeps the high byte of 16-bit samples. Alpha (a 2nd or 4th channel) comes from an
    # alpha channel or a palette's tRNS, never from a gray or RGB tRNS colour: as in Pillow's modes.
    return tf.io.decode_png(encoded, channels=0)


def _gif(encoded: tf.Tensor) -> tf.Tensor:
    frame = image_headers.gif_first_frame(encoded)
    checks = [
        _refuse_unless(tf.logical_not(frame["transparency"]),
                       "a GIF with a transparent colour: the TensorFlow decoder paints it black, the converter "
                       "white; convert it to PNG"),
        _refuse_unless(frame["covers_screen"], "a GIF whose first frame does not cover its screen; convert it to PNG"),
        _refuse_unless(frame["palette"], "a GIF without a colour table; convert it to PNG"),
    ]
    return _after_checks(checks, lambda: tf.io.decode_gif(encoded)[0])


def _bmp(encoded: tf.Tensor) -> tf.Tensor:
    header = image_headers.bmp_header(encoded)
    bits = header["bits"]
    supported = tf.reduce_all([header["header_size"] >= 40, header["compression"] == 0,
                               tf.reduce_any([bits == 8, bits == 24, bits == 32])])
    check = _refuse_unless(supported, "a BMP that is not 8-, 24- or 32-bit uncompressed (with a header of 40 "
                                      "bytes or more); convert it to PNG")
    pixels = _after_checks([check], lambda: tf.io.decode_bmp(encoded, channels=0))

    def through_palette():
        indices = tf.cast(pixels[:, :, 0], tf.int32)
        inside = _refuse_unless(tf.reduce_max(indices) < header["colors"], "a BMP with a pixel outside its palette")
        return _after_checks([inside], lambda: tf.gather(header["palette"], indices))

    # 32-bit BI_RGB: Pillow reads BGRX, the fourth byte is not alpha.
    return tf.cond(bits == 8, through_palette, lambda: pixels[:, :, :3])


def composite_on_white(color: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """Image.alpha_composite(white, image): AlphaComposite.c with an opaque white destination, in integers."""
    src, a = tf.cast(color, tf.int32), tf.cast(alpha, tf.int32)
    # coef1 = a * 255 * 255 * 128 // (255 * 255) and coef2 = 255 * 128 - coef1, as the C code has them.
    coef1 = a * 128
    tmp = src * coef1 + 255 * (255 * 128 - coef1) + (0x80 << 7)
    out = tf.bitwise.right_shift(tf.bitwise.right_shift(tf.bitwise.right_shift(tmp, 8) + tmp, 8), 7)
    return tf.cast(tf.where(a == 0, 255, out), tf.uint8)


def _without_alpha(pixels: tf.Tensor) -> tf.Tensor:
    """L, LA, RGB or RGBA (1 to 4 channels) to L or RGB, the alpha composited on white."""
    n = tf.shape(pixels)[2]
    return tf.cond(tf.logical_or(n == 2, n == 4),
                   lambda: composite_on_white(pixels[:, :, : n - 1], pixels[:, :, n - 1 :]), lambda: pixels)


def to_gray(rgb: tf.Tensor) -> tf.Tensor:
    """Pillow's RGB to L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
    v = tf.cast(rgb, tf.int32)
    l24 = v[:, :, 0:1] * 19595 + v[:, :, 1:2] * 38470 + v[:, :, 2:3] * 7471 + 0x8000
    return tf.cast(tf.bitwise.right_shift(l24, 16), tf.uint8)


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """L or RGB uint8 [h, w, 1 or 3] as Pillow converts it to `channels`."""
    n = tf.shape(image)[2]
    if channels == 1:
        return tf.cond(n == 1, lambda: image, lambda: to_gray(image))
    return tf.cond(n == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)


def stored_unchanged(encoded: tf.Tensor, norm: Normalisation) -> tf.Tensor:
    """Whether build_shards stored this file's own bytes (encoding `auto`, a JPEG of the records'
    mode that needs no resize): the reader then decodes those bytes with its own decoder."""
    if norm.encoding != "auto":
        return tf.constant(False)

    def jpeg_kept():
        height, width, components = tf.unstack(tf.image.extract_jpeg_shape(encoded))
        small = tf.maximum(height, width) <= norm.max_side if norm.max_side else tf.constant(True)
        return tf.logical_and(components == norm.channels, small)

    return tf.cond(tf.equal(image_format(encoded), 0), jpeg_kept, lambda: tf.constant(False))


def normalise(encoded: tf.Tensor, norm: Normalisation) -> tf.Tensor:
    """uint8 [h, w, norm.channels]: the pixels build_shards made of this file, before it encoded them."""
    fmt = image_format(encoded)
    known = _refuse_unless(fmt >= 0, "not a JPEG, PNG, GIF or BMP image")
    with tf.control_dependencies([known]):
        fmt = tf.identity(fmt)
    pixels = tf.switch_case(tf.maximum(fmt, 0), [
        lambda: _jpeg(encoded, norm), lambda: _png(encoded), lambda: _gif(encoded), lambda: _bmp(encoded)])
    pixels.set_shape([None, None, None])
    image = to_channels(_without_alpha(pixels), norm.channels)
    image.set_shape([None, None, norm.channels])
    if norm.max_side:
        image = pillow_resize.shrink_like_converter(image, norm.max_side, norm.reducing_gap, norm.pass_order)
    return image


def as_read(pixels: tf.Tensor, encoded: tf.Tensor, norm: Normalisation, channels: int) -> tf.Tensor:
    """The record's pixels as the reader decodes them to `channels` when the model's differ from the records'.

    Gray to RGB repeats the gray. RGB to gray is libpng's formula for a PNG
    record (so the pixels go through a PNG in memory, exactly) and libjpeg's Y
    (Pillow's L24 before the JPEG loss) for a JPEG record.
    """
    if channels == norm.channels:
        return pixels
    if channels == 3:
        return tf.tile(pixels, [1, 1, 3])
    def through_png():
        return tf.io.decode_png(tf.io.encode_png(pixels), channels=1)

    if norm.encoding != "auto":  # decided here: grappler cannot sort a graph with a cond on a constant
        return through_png() if norm.encoding == "png" else to_gray(pixels)
    return tf.cond(image_format(encoded) != 0, through_png, lambda: to_gray(pixels))
