"""How the converter normalised images: the `normalisation` record of metadata.json.

data_pipeline.images applies these rules with Pillow and build_shards records
them; the serving export reads the record and applies the same rules to a
served file in TensorFlow ops (data_pipeline.source_image), so that a deployed
model sees the pixels the validation stream saw. Neither Pillow nor
TensorFlow is imported here: the converter's workers and the export both read it.

Shards written before the record existed carry `options.max_side` only; they
were made by the same algorithm, so the record is rebuilt from their options,
with the resize pass order of the Pillow installed where the export runs (the
one fact that depends on Pillow's version, see PASS_ORDERS).
"""

from dataclasses import asdict, dataclass, fields
from importlib import metadata as package_metadata

# How Pillow orders the two passes of a resize; each pass rounds to 8 bits, so the order shows in the
# pixels. Pillow 10 to 12.1: rows first. 12.2 and 12.3: columns first for an image over 100 times taller
# than wide whose height shrinks. 13: columns first when the height loses more than twice as many pixels
# as the width (data_pipeline.pillow_resize.vertical_first).
PASS_ORDERS = ("rows_first", "columns_first_if_100x_tall", "columns_first_if_height_shrinks_2x_more")
ENCODINGS = ("auto", "jpeg", "png")
# The `normalisation` of shards another converter wrote (data_pipeline.adopt_shards): the records hold the
# files as that converter stored them, and a served file is decoded as the reader decodes a record.
AS_STORED = "as_stored"


def pass_order_of(pillow_version: str) -> str:
    """The PASS_ORDERS entry of a Pillow version string ("12.3.0", "13.0.0.dev0")."""
    major, minor = (int(part) for part in (pillow_version.split(".") + ["0"])[:2])
    if (major, minor) >= (13, 0):
        return PASS_ORDERS[2]
    return PASS_ORDERS[1] if (major, minor) >= (12, 2) else PASS_ORDERS[0]


@dataclass(frozen=True)
class Normalisation:
    """What build_shards did to every image before storing it (the rules are fixed; the record names them).

    Attributes:
      channels: 3 (RGB records) or 1 (grayscale records).
      encoding: --encoding: `auto` stores an RGB (or, for 1 channel, gray) JPEG
        that needs no resize as its own bytes, which the reader decodes itself.
      max_side: --max-side (0: no resize).
      resize_filter: Image.resize's filter, with support scaled by the shrink.
      reducing_gap: Image.resize's reducing_gap: a box reduce() by whole
        factors first, then the filter over the last factor of at least 3.
      jpeg_draft: a JPEG over max_side is decoded by libjpeg at 1/2, 1/4 or
        1/8 scale first (JpegImageFile.draft), as far as that keeps max_side.
      pass_order: the PASS_ORDERS rule of the converter's Pillow.
      alpha: RGBA, LA and palettes with transparency are composited on white
        (Image.alpha_composite, integer).
      sixteen_bit: 16-bit samples keep their high byte.
      cmyk: CMYK JPEGs are read as Adobe-inverted (Pillow's assumption) and
        converted by Pillow's cmyk2rgb.
      palette: palettes become RGB (RGBA when the file has transparency).
      grayscale: RGB to gray is Pillow's (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
      exif_orientation: `ignored`: pixels stay in the stored order (as Keras,
        tf.data and torchvision read images by default).
      pillow_version: the converter's Pillow; "" for shards written before it was recorded.
    """

    channels: int = 3
    encoding: str = "auto"
    max_side: int = 0
    resize_filter: str = "bicubic"
    reducing_gap: float = 3.0
    jpeg_draft: bool = True
    pass_order: str = PASS_ORDERS[2]
    alpha: str = "composite_on_white"
    sixteen_bit: str = "high_byte"
    cmyk: str = "adobe_inverted"
    palette: str = "rgb_or_rgba_if_transparency"
    grayscale: str = "pillow_l24"
    exif_orientation: str = "ignored"
    pillow_version: str = ""


# The rules source_image reproduces; a record naming another cannot be served faithfully.
_FIXED = {f.name: f.default for f in fields(Normalisation)
          if f.name not in ("channels", "encoding", "max_side", "pass_order", "pillow_version")}


def record(channels: int, encoding: str, max_side: int, pillow_version: str) -> dict:
    """The metadata.json record of a conversion with these options by this Pillow."""
    return asdict(Normalisation(channels, encoding, max_side, pass_order=pass_order_of(pillow_version),
                                pillow_version=pillow_version))


def installed_pillow() -> str:
    try:
        return package_metadata.version("pillow")
    except package_metadata.PackageNotFoundError:
        return ""


def from_metadata(meta: dict) -> Normalisation | None:
    """The normalisation of a shard folder's metadata.json; ValueError naming the key when it cannot be served.

    None for AS_STORED (adopted shards): the export decodes a served file as a record.
    """
    recorded = meta.get("normalisation")
    if recorded == AS_STORED:
        return None
    if recorded is None:  # shards from before the record: the same algorithm, with the options it had
        options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
        pillow = installed_pillow()
        recorded = {"channels": meta.get("channels", 3), "encoding": options.get("encoding", "auto"),
                    "max_side": options.get("max_side", 0), "pass_order": pass_order_of(pillow or "13.0")}
    if not isinstance(recorded, dict):
        raise ValueError(f"normalisation={recorded!r}: expected an object")
    known = {f.name for f in fields(Normalisation)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ValueError(f"normalisation.{unknown[0]}: not a rule the serving export knows")
    norm = Normalisation(**recorded)
    checks = [("channels", norm.channels in (1, 3) and not isinstance(norm.channels, bool), "1 or 3"),  # True == 1
              ("encoding", norm.encoding in ENCODINGS, " or ".join(ENCODINGS)),
              ("max_side", isinstance(norm.max_side, int) and not isinstance(norm.max_side, bool)
               and norm.max_side >= 0, "a count of pixels (0: no resize)"),
              ("pass_order", norm.pass_order in PASS_ORDERS, " or ".join(PASS_ORDERS))]
    checks += [(name, getattr(norm, name) == value, repr(value)) for name, value in _FIXED.items()]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"normalisation.{name}={getattr(norm, name)!r}: "
                             f"the serving export reproduces only {expected}")
    return norm
