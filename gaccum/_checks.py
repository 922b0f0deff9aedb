"""The one int check every argument validator shares."""

from __future__ import annotations

from typing import Any


def is_int(x: Any) -> bool:
    """An int, and not a bool: ``True`` is an int to Python but never a count to gaccum."""
    return isinstance(x, int) and not isinstance(x, bool)


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` pointed at the user's line: the first frame outside the gaccum package."""
    import os
    import sys
    import warnings

    import contextlib

    import torch

    # gaccum's own frames, and the context managers and autograd it runs the user's code through
    inner = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep,
             os.path.abspath(contextlib.__file__))
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inner):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
