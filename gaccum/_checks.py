"""The one int check every argument validator shares."""

from __future__ import annotations

from typing import Any


def is_int(x: Any) -> bool:
    """An int, and not a bool: ``True`` is an int to Python but never a count to gaccum."""
    return isinstance(x, int) and not isinstance(x, bool)
