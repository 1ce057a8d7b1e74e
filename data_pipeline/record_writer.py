"""tf.train.Example records and TFRecord files, written without TensorFlow.

Conversion workers only decode and re-encode images; importing TensorFlow
in each of them would cost seconds of start-up and hundreds of MB of memory
per process. Both formats are small and stable: an Example is a protobuf map
of named byte or int64 lists, and a TFRecord file frames each record with its
length and masked CRC32C checksums. The bytes written are the ones
TensorFlow's deterministic serialisation gives (the tests compare them).
"""

import struct

import google_crc32c


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s take ten bytes, as in protobuf
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: bytes | int) -> bytes:
    # Feature: bytes_list = 1 or int64_list = 3; each holds `repeated value = 1`
    # (int64s packed).
    if isinstance(value, bytes):
        return _len_field(1, _len_field(1, value))
    return _len_field(3, _len_field(1, _varint(value)))


def serialize_example(features: dict[str, bytes | int]) -> bytes:
    """A tf.train.Example of single-value features, keys in sorted order."""
    entries = b"".join(
        _len_field(1, _len_field(1, key.encode()) + _len_field(2, _feature(features[key])))
        for key in sorted(features)
    )
    return _len_field(1, entries)  # Example.features = 1, Features.feature = 1 (map entries)


def encode_example(
    encoded: bytes,
    image_format: str,
    shape: tuple[int, int, int],
    label: int,
    class_name: str,
    example_id: str,
    original_size: tuple[int, int] | None = None,
) -> bytes:
    """Serialises one image record: encoded bytes, label, shape and the source's size
    (the schema is data_pipeline.records.FEATURES)."""
    height, width, channels = shape
    original_height, original_width = original_size or (height, width)
    return serialize_example({
        "image/encoded": encoded,
        "image/format": image_format.encode(),
        "image/height": height,
        "image/width": width,
        "image/channels": channels,
        "image/class/label": label,
        "image/class/name": class_name.encode(),
        "image/id": example_id.encode(),
        "image/original_height": original_height,
        "image/original_width": original_width,
    })


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordFile:
    """Appends records to a new TFRecord file (uncompressed)."""

    def __init__(self, path: str):
        self._f = open(path, "wb")

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._f.write(length + _masked_crc(length) + record + _masked_crc(record))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TFRecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
