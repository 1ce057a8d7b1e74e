"""Decodes one image file of any common mode and re-encodes it in a normal form.

Pillow does the decoding, not tf.image: it reads CMYK and Adobe-inverted JPEGs,
16-bit PNGs, GIF frames and every BMP variant, tells a truncated file from a
complete one, and says what a file's bytes really are, whatever its
extension. It is also much lighter to import in worker processes.

Every record holds 8-bit RGB (or grayscale with `channels=1`), so the reader
never meets a mode it cannot decode. EXIF orientation is not applied: pixels
stay in the order the file stores them, as TensorFlow's decoders (and so the
serving export) read them. metadata.json records these rules
(`normalisation_record`) and the serving export repeats them on a served file
(data_pipeline.source_image): change one, change the other.
"""

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import PIL
from PIL import Image

from data_pipeline import normalisation

# Pillow's format name for each extension the converter reads.
EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP"}
ENCODINGS = ("auto", "jpeg", "png")
# Pillow's own refusal threshold (twice its warning level): a decoded RGB image stays under about 540 MB.
MAX_PIXELS = 178956970

# What Pillow raises on bad bytes: unidentified or truncated files (OSError),
# broken headers (SyntaxError, struct.error, EOFError), impossible sizes
# (ValueError) and oversized images (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class BrokenImage(Exception):
    """A file that is not a usable image; the message says why."""


@dataclass(frozen=True)
class ImageOptions:
    """How every image is normalised.

    Attributes:
      channels: 3 (RGB) or 1 (grayscale).
      encoding: `auto` keeps a JPEG's bytes when they are already what the
        record needs (RGB or gray as asked, no resize) and otherwise re-encodes
        JPEG sources as JPEG and lossless sources as PNG; `jpeg` or `png`
        re-encode everything in that format.
      jpeg_quality: quality of re-encoded JPEGs.
      max_side: longer side at most this many pixels (0: keep the size).
      max_pixels: an image whose header claims more pixels (width x height)
        is skipped as broken before it is decoded: a decompression bomb (a
        small file that decodes to gigabytes) costs nothing.
    """

    channels: int = 3
    encoding: str = "auto"
    jpeg_quality: int = 95
    max_side: int = 0
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class Normalised:
    data: bytes
    format: str  # "jpeg" or "png": the record's image/format
    shape: tuple[int, int, int]  # stored height, width, channels
    original_size: tuple[int, int]  # height, width of the source


def normalisation_record(opts: ImageOptions) -> dict:
    """metadata.json's `normalisation`: how normalise() treats every image with these options, by this Pillow."""
    return normalisation.record(opts.channels, opts.encoding, opts.max_side, PIL.__version__)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """8-bit L or RGB; alpha is composited on white, 16-bit scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: keep the high byte. Pillow's convert() would clip
        # everything above 255 to white instead.
        arr = np.asarray(img).astype(np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _resized(img: Image.Image, max_side: int) -> Image.Image:
    w, h = img.size
    if not max_side or max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def normalise(data: bytes, extension: str, opts: ImageOptions) -> Normalised:
    """The record form of one file's bytes; raises BrokenImage with the reason."""
    expected = EXTENSIONS.get(extension.lower())
    # Pillow's own bomb check (in open) follows the cap, so it holds also for a
    # cap above Pillow's default; its warning is dropped, as the check below decides.
    Image.MAX_IMAGE_PIXELS = opts.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format != expected:
            raise BrokenImage(f"content is {img.format or 'unknown'}, not the {expected} its extension says")
        if img.width * img.height > opts.max_pixels:
            raise BrokenImage(f"{img.width}x{img.height} pixels is over --max-pixels {opts.max_pixels}")
        original = (img.height, img.width)
        if img.format == "JPEG" and opts.max_side:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still
            # leaves at least max_side pixels: much faster for big photos.
            scale = opts.max_side / max(img.size)
            img.draft(img.mode, (int(img.width * scale) + 1, int(img.height * scale) + 1))
        img.seek(0)  # GIF and other multi-frame files: the first frame
        img.load()  # decodes everything, so truncated files fail here
        source_mode = img.mode
        out = _resized(_to_mode(img, opts.channels), opts.max_side)
    except BrokenImage:
        raise
    except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit of 2 x the cap ..."
        raise BrokenImage(f"{str(e).split(' exceeds')[0]} is over --max-pixels {opts.max_pixels}") from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names a memory address: not stable across runs.
        raise BrokenImage("not an image Pillow can identify") from None
    except _DECODE_ERRORS as e:
        raise BrokenImage(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    channels = 1 if out.mode == "L" else 3
    shape = (out.height, out.width, channels)
    keep = (
        opts.encoding == "auto"
        and expected == "JPEG"
        and source_mode == out.mode
        and (out.height, out.width) == original
    )
    if keep:
        return Normalised(data, "jpeg", shape, original)
    fmt = opts.encoding if opts.encoding != "auto" else ("jpeg" if expected == "JPEG" else "png")
    buf = io.BytesIO()
    if fmt == "jpeg":
        out.save(buf, "JPEG", quality=opts.jpeg_quality, optimize=False, progressive=False)
    else:
        out.save(buf, "PNG", compress_level=6)
    return Normalised(buf.getvalue(), fmt, shape, original)
