"""TFRecord files and tf.train.Example records read without TensorFlow: record_writer's other half.

data_pipeline.adopt_shards reads every byte of every shard once, to count its
records, check their CRC32C, hash the file and read each record's label and
synset. Doing that in Python with google_crc32c and hashlib takes one pass
over the file (TensorFlow's TFRecordDataset would need a second one for the
SHA-256), starts without TensorFlow, and says at which record and byte a file
goes wrong.
"""

import hashlib
import struct

import google_crc32c

_HEADER = 12  # uint64 length, uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data
_BLOCK = 1 << 20


class RecordError(ValueError):
    """A TFRecord file or an Example that cannot be read; the message says where."""


def _masked_crc(data) -> int:
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str, digest=None):
    """The records of a TFRecord file, in order, each checked against its CRC32C.

    `digest` (a hashlib object) is updated with every byte of the file as it
    is read. Raises RecordError naming the record and the byte offset of a
    truncated or damaged record; OSError when the file cannot be read.
    """
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        offset, index = 0, 0
        while True:
            header = f.read(_HEADER)
            digest.update(header)
            if not header:
                return
            if len(header) < _HEADER:
                raise RecordError(f"truncated: record {index} at byte {offset} has a header of {len(header)} bytes")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise RecordError(f"record {index} at byte {offset}: its length fails its CRC32C")
            data = f.read(length + _FOOTER)
            digest.update(data)
            if len(data) < length + _FOOTER:
                held = f"{len(data)} of its {length} bytes" if len(data) < length else "its data, not its whole CRC"
                raise RecordError(f"truncated: record {index} at byte {offset} holds {held}")
            record, (data_crc,) = data[:length], struct.unpack("<I", data[length:])
            if _masked_crc(record) != data_crc:
                raise RecordError(f"record {index} at byte {offset}: its data fails its CRC32C")
            yield record
            offset += _HEADER + length + _FOOTER
            index += 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise RecordError("not a tf.train.Example: a varint runs past its message")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of a protobuf message: an int for varints, a (start, end) span otherwise."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value = (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value = (pos, pos + size)
            pos += size
        else:
            raise RecordError(f"not a tf.train.Example: wire type {wire}")
        if pos > end:
            raise RecordError("not a tf.train.Example: a field runs past its message")
        yield number, wire, value


def _feature_values(buf: bytes, start: int, end: int) -> list:
    """A Feature's values: bytes of a bytes_list (1), ints of an int64_list (3); floats (2) are not read."""
    values = []
    for kind, _, (lo, hi) in ((n, w, v) for n, w, v in _fields(buf, start, end) if w == 2):
        for number, wire, value in _fields(buf, lo, hi):
            if number != 1:
                continue
            if kind == 1 and wire == 2:
                values.append(bytes(buf[value[0]:value[1]]))
            elif kind == 3 and wire == 0:
                values.append(value - (1 << 64) if value >= 1 << 63 else value)
            elif kind == 3 and wire == 2:  # packed int64s
                pos = value[0]
                while pos < value[1]:
                    v, pos = _varint(buf, pos)
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values


def example_features(record: bytes, wanted: tuple[str, ...]) -> dict[str, list]:
    """The values of the `wanted` features of a serialized tf.train.Example (absent ones are left out)."""
    found = {}
    for number, wire, span in _fields(record):
        if number != 1 or wire != 2:
            continue
        for entry_number, entry_wire, entry_span in _fields(record, *span):  # Features.feature: map entries
            if entry_number != 1 or entry_wire != 2:
                continue
            key, feature = None, None
            for n, w, v in _fields(record, *entry_span):
                if n == 1 and w == 2:
                    key = bytes(record[v[0]:v[1]]).decode("utf-8", "replace")
                elif n == 2 and w == 2:
                    feature = v
            if key in wanted:
                found[key] = [] if feature is None else _feature_values(record, *feature)
    return found
