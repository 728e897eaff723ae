"""Byte sizes and fractions as people write them in configs: "20GiB", "512MB", "1.5 GB", "33%"."""
from __future__ import annotations

import re

from ..errors import ConfigError, brief

DIRECT_IO_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this
HUGE_PAGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB base pages)
READ_CHUNK = 8 << 20  # the reader splits loads into requests of this size, spread over its threads
MAX_SIZE = 1 << 60  # 1 EiB: larger sizes in a config are refused, not overflowed
# the memory bounds of one forward pass, which the planner's workspace counts
SCORE_BYTES = 32 << 20  # the largest fp32 attention score tensor one query chunk builds (engine.attention)
PREFILL_TOKENS = 512  # the most tokens of one sequence in one pass when a prompt is fed (Model.prefill)


# Binary prefixes (KiB..TiB, and the bare K/M/G/T that most tools treat as binary) and decimal ones.
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
    "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def parse_size(value: object, *, field: str, path: str | None = None) -> int:
    """Bytes from an int or a string with an optional unit; ConfigError naming `field` otherwise
    (negative, fractional byte counts, or more than MAX_SIZE)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"expected a size such as 8GiB, 512MB or a byte count, got {brief(value)}",
                          path=path, field=field)
    if isinstance(value, (int, float)):
        number, unit = value, ""
        if isinstance(value, float) and not value.is_integer():  # nan and inf included
            raise ConfigError(f"a byte count must be a whole number, got {brief(value)}", path=path, field=field)
    else:
        m = _SIZE_RE.match(value) if len(value) <= 64 else None
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read {brief(value)} as a size (use e.g. 20GiB, 512MB, 1.5 GB or bytes; "
                              f"units: {', '.join(u for u in _UNITS if u)})", path=path, field=field)
        number, unit = float(m.group(1)), m.group(2).lower()
    if number < 0:
        raise ConfigError(f"size must not be negative, got {brief(value)}", path=path, field=field)
    if number > MAX_SIZE / _UNITS[unit]:  # compared before any conversion: no OverflowError, no inf
        raise ConfigError(f"size {brief(value)} is larger than {format_size(MAX_SIZE)}", path=path, field=field)
    return int(round(number * _UNITS[unit]))


def parse_percent(value: str, *, field: str, path: str | None = None) -> float | None:
    """"33%" -> 0.33; None if `value` is not written as a percentage; ConfigError if out of (0, 100]."""
    m = _PERCENT_RE.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if m is None:
        return None
    pct = float(m.group(1))
    if not 0 < pct <= 100:
        raise ConfigError(f"percentage must be in (0, 100], got {brief(value)}", path=path, field=field)
    return pct / 100.0


def format_size(n: float) -> str:
    """Human-readable binary size: 495 MiB, 1.25 GiB, 512 B."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.3g} GB/s"


def format_seconds(s: float) -> str:
    """0.000123 -> "123 us", 0.0456 -> "45.6 ms", 72.6 -> "72.6 s"."""
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"
