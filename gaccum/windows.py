"""A plan's window: its micro-batch sizes, kept as (size, count) runs.

A balanced window is at most two distinct sizes (256 over 5 micro-steps is 1 x 52 + 4 x 51), so a
target of 10**15 samples is two runs, not a list of billions. It behaves as the sequence of sizes
(``len``, indexing, iteration, ``==`` with a list) without ever building it; ``total`` and ``largest``
answer without iterating.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Iterable, Iterator


class Window(Sequence):
    """Micro-batch sizes as runs ``[(size, count), ...]``."""

    __slots__ = ("runs",)

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for size, count in runs:
            if count <= 0:
                continue
            if merged and merged[-1][0] == size:
                merged[-1] = (size, merged[-1][1] + count)
            else:
                merged.append((int(size), int(count)))
        self.runs = merged

    @classmethod
    def of(cls, sizes: Iterable[int] | Any) -> "Window":
        """From a list of sizes, a saved ``[[size, count], ...]``, or a Window."""
        if isinstance(sizes, Window):
            return sizes
        items = list(sizes)
        if items and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in items):
            return cls((s, c) for s, c in items)
        return cls((s, len(list(g))) for s, g in itertools.groupby(items))

    @property
    def total(self) -> int:
        return sum(s * c for s, c in self.runs)

    @property
    def largest(self) -> int:
        return max(s for s, _ in self.runs)

    def __len__(self) -> int:
        return sum(c for _, c in self.runs)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("window index out of range")
        for size, count in self.runs:
            if i < count:
                return size
            i -= count
        raise IndexError("window index out of range")  # pragma: no cover

    def __iter__(self) -> Iterator[int]:
        for size, count in self.runs:
            yield from itertools.repeat(size, count)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Window):
            return self.runs == other.runs
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and Window.of(other).runs == self.runs
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __mul__(self, k: int) -> list[int]:
        return list(self) * k

    def to_json(self) -> list[list[int]]:
        return [[s, c] for s, c in self.runs]

    def __str__(self) -> str:
        """The one way a window is written: '4 x 51' or '1 x 52 + 4 x 51'."""
        return " + ".join(f"{c} x {s}" for s, c in self.runs)

    def __repr__(self) -> str:
        return f"Window({self.runs})"


def balanced_window(per_rank_target: int, max_micro: int, uneven: bool = False) -> Window:
    """Micro-batch sizes of one window that reach the target exactly, at most ``max_micro`` each: even
    (sizes differ by at most one), or ``uneven`` (full ones, then the rest)."""
    steps = -(-per_rank_target // max_micro)
    if uneven:
        return Window([(max_micro, steps - 1), (per_rank_target - max_micro * (steps - 1), 1)])
    base, extra = divmod(per_rank_target, steps)
    return Window([(base + 1, extra), (base, steps - extra)])
