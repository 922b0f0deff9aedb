"""Memory sizes: parsing "8GiB"/"512MB"/bytes, and formatting them back."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int, or a string such as "8GiB", "512MB", "1.5 gib"."""
    if isinstance(value, bool):
        raise TypeError("gaccum: a memory size must be bytes (int) or a string like '8GiB', got a bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"gaccum: a memory size must be a finite number of bytes >= 1, got {value!r}; "
                             "pass bytes (an int) or a string like '8GiB'")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"gaccum: a memory size must be bytes (int) or a string like '8GiB', got {type(value).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"gaccum: cannot parse memory size {value!r}; use bytes or e.g. '8GiB', '512MB', '1.5GB'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"gaccum: a memory size must be > 0, got {value!r}")
    return n


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_headroom(headroom: int | float | str, limit: int) -> int:
    """Bytes kept free: a fraction of the limit in [0, 1), or bytes (an int or a string like "512MiB").

    A float is always a fraction and an int always bytes, so ``1.0`` or ``5.0``
    (a fraction that keeps everything) is an error rather than 1 or 5 bytes.
    """
    if isinstance(headroom, bool):
        raise TypeError("gaccum: headroom must be a fraction in [0, 1), bytes (int) or a size string, got a bool")
    if isinstance(headroom, float):
        if not 0.0 <= headroom < 1.0:
            raise ValueError(
                f"gaccum: headroom={headroom!r} is a float, so a fraction of the memory limit, and must be in "
                "[0, 1); for bytes pass an int or a string such as '512MiB'"
            )
        return int(limit * headroom)
    if isinstance(headroom, int):
        if headroom < 0:
            raise ValueError(f"gaccum: headroom must be >= 0 bytes, got {headroom}")
        return headroom
    if isinstance(headroom, str):
        return parse_bytes(headroom)
    raise TypeError(f"gaccum: headroom must be a fraction, bytes (int) or a size string, got {type(headroom).__name__}")
