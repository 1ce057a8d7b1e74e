"""Link rates and durations as people write them: `25Gbit`, `100mbit` (tc's notation), `1.25GB/s`, `20us`."""

import math
import re

_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BANDWIDTH_UNITS = "bit, Kbit, Mbit, Gbit, Tbit or Kbps ... Tbps (bits); B, KB, MB, GB, TB (bytes); optional /s"
_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "ns": 1e9}  # divided by: 20us is 2e-05 exactly


def _number(text: str, what: str, units: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([^\s\d.+-][^\s]*)?\s*", text)
    if not m:
        raise ValueError(f"{what} {text!r}: not a number with a unit ({units})")
    value = float(m.group(1))
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r}: not a finite number")
    if value < 0:
        raise ValueError(f"{what} {text!r}: is negative")
    return value, m.group(2) or ""


def parse_bandwidth(text: str) -> float:
    """Bytes per second from `25Gbit`, `100mbit` (tc's notation), `10Gbps`, `1.25GB/s`, `500MB`.

    Decimal prefixes (1 Gbit = 1e9 bits), case-insensitive; `bps` means bits
    per second (the network convention; tc itself reads `mbps` as bytes).
    A byte unit ends in a capital B (`MB`, `kB`), so `mb` is refused as
    ambiguous. ValueError for an unknown unit, zero, a negative or a
    non-finite value.
    """
    value, unit = _number(text, "bandwidth", _BANDWIDTH_UNITS)
    unit = unit[:-2] if unit.lower().endswith("/s") else unit
    bits = re.fullmatch(r"([kKmMgGtT]?)(?:bit|bits|bps)", unit, re.IGNORECASE)
    octets = re.fullmatch(r"([kKmMgGtT]?)B", unit)
    if bits:
        rate = value * _PREFIX[bits.group(1).lower()] / 8
    elif octets:
        rate = value * _PREFIX[octets.group(1).lower()]
    else:
        why = "no unit" if not unit else f"unknown unit {unit!r}"
        raise ValueError(f"bandwidth {text!r}: {why} (use {_BANDWIDTH_UNITS})")
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"bandwidth {text!r}: must be a positive, finite rate")
    return rate


def parse_duration(text: str) -> float:
    """Seconds from `20us`, `1.5ms`, `0.2s`, `50ns`; a bare `0` is allowed. ValueError otherwise."""
    value, unit = _number(text, "duration", "s, ms, us, ns")
    if not unit and value == 0:
        return 0.0
    if unit.lower() not in _PER_SECOND:
        why = "no unit" if not unit else f"unknown unit {unit!r}"
        raise ValueError(f"duration {text!r}: {why} (use s, ms, us or ns)")
    return value / _PER_SECOND[unit.lower()]
