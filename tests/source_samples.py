"""Image files of every kind the converter reads, made in memory: the inputs of the train/serve agreement tests.

Textures of several sizes and aspect ratios (noise, a checkerboard, gradients,
a photo-like mix of waves and grain) as JPEG and PNG, and one file of each
mode that build_shards treats specially: alpha, 16 bits, palettes with and
without transparency, CMYK, EXIF orientation, 8-bit BMP, GIF. Seeded: the same
bytes on every run.
"""

import io

import numpy as np
import tensorflow as tf
from PIL import Image

KINDS = ("noise", "checker", "gradient", "photo")
# (height, width): square, wide, tall, odd sizes, and big enough for libjpeg's 1/2, 1/4 and 1/8 draft at
# the tests' max_side.
SIZES = ((61, 97), (160, 160), (12, 230), (230, 12), (250, 333), (480, 360), (37, 5), (120, 119))


def texture(height: int, width: int, kind: str, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "noise":
        image = rng.integers(0, 256, (height, width, 3)).astype(np.float64)
    elif kind == "checker":
        image = np.repeat((((x // 3 + y // 3) % 2) * 255)[..., None], 3, axis=2)
    elif kind == "gradient":
        image = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                          (x + y) * 255 / max(height + width - 2, 1)], axis=-1)
    else:
        image = np.stack([128 + 100 * np.sin(x / 7 + y / 13), 128 + 100 * np.cos(x / 5 - y / 9),
                          (x * y) % 256], axis=-1) + rng.normal(0, 15, (height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode(image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt, **options)
    return buf.getvalue()


def textures() -> dict[str, bytes]:
    """{file name: bytes}: every size of SIZES in one kind each (kinds in turn), as JPEG and as PNG."""
    files = {}
    for i, (h, w) in enumerate(SIZES):
        kind = KINDS[i % len(KINDS)]
        image = texture(h, w, kind, seed=i)
        files[f"{kind}-{h}x{w}.jpg"] = encode(image, "JPEG", quality=90)
        files[f"{kind}-{h}x{w}.png"] = encode(texture(h, w, KINDS[(i + 1) % len(KINDS)], seed=100 + i), "PNG")
    return files


def without_adobe_marker(jpeg: bytes) -> bytes:
    """The JPEG with its APP14 "Adobe" segment turned into a comment (COM) of the same length."""
    at = jpeg.find(b"\xff\xee")
    return jpeg[:at] + b"\xff\xfe" + jpeg[at + 2:]


def modes(height: int = 45, width: int = 70) -> dict[str, bytes]:
    """{file name: bytes}: one file per mode rule of the converter (data_pipeline.images._to_mode)."""
    rng = np.random.default_rng(7)
    rgb = texture(height, width, "photo", seed=7)
    alpha = rng.choice(np.array([0, 1, 17, 128, 254, 255], np.uint8), (height, width))
    rgba = np.dstack([rgb, alpha])
    palette = Image.fromarray(rgb).quantize(60)
    wide = rng.integers(0, 65536, (height, width, 4), dtype=np.uint16)
    cmyk = np.dstack([rgb, rng.integers(0, 256, (height, width), dtype=np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    return {
        "rgba.png": encode(rgba, "PNG"),
        "la.png": encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"),
        "gray.png": encode(rgb[..., 0], "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette-transparent-index.png": encode(palette, "PNG", transparency=3),
        "palette-alpha-table.png": encode(palette, "PNG", transparency=bytes(rng.integers(0, 256, 60, np.uint8))),
        "palette-4bit.png": encode(Image.fromarray(rgb).quantize(16), "PNG", bits=4),
        "rgb-trns-colour.png": encode(rgb, "PNG", transparency=tuple(int(v) for v in rgb[0, 0])),
        "bilevel.png": encode(rgb[..., 0] > 128, "PNG"),
        "gray16.png": tf.io.encode_png(wide[..., :1]).numpy(),
        "gray-alpha16.png": tf.io.encode_png(wide[..., :2]).numpy(),
        "rgb16.png": tf.io.encode_png(wide[..., :3]).numpy(),
        "rgba16.png": tf.io.encode_png(wide).numpy(),
        "gray.jpg": encode(rgb[..., 0], "JPEG", quality=90),
        "progressive.jpg": tf.io.encode_jpeg(rgb, progressive=True, quality=90).numpy(),
        "cmyk-adobe.jpg": encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95),
        "exif-rotated.jpg": encode(rgb, "JPEG", quality=90, exif=exif.tobytes()),
        "exif-rotated.png": encode(rgb, "PNG", exif=exif.tobytes()),
        "rgb24.bmp": encode(rgb, "BMP"),
        "rgbx32.bmp": encode(rgba, "BMP"),
        "palette8.bmp": encode(palette, "BMP"),
        "gray8.bmp": encode(rgb[..., 1], "BMP"),
        "palette.gif": encode(palette, "GIF"),
    }


def refused() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, what the export's message says)}: files the converter reads and the export refuses."""
    rgb = texture(20, 30, "photo", seed=3)
    palette = Image.fromarray(rgb).quantize(40)
    cmyk = encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "CMYK"), "JPEG", quality=95)
    partial = bytearray(encode(palette, "GIF"))
    descriptor = partial.find(b"\x2c\x00\x00\x00\x00")
    partial[descriptor + 5:descriptor + 7] = (29).to_bytes(2, "little")  # the first frame one column narrower
    return {
        "transparent.gif": (encode(palette, "GIF", transparency=3), "a GIF with a transparent colour"),
        "partial.gif": (bytes(partial), "a GIF whose first frame does not cover its screen"),
        "bilevel.bmp": (encode(rgb[..., 0] > 128, "BMP"), "a BMP that is not 8-, 24- or 32-bit uncompressed"),
        "cmyk-plain.jpg": (without_adobe_marker(cmyk), "a CMYK JPEG without the Adobe APP14 marker"),
    }
