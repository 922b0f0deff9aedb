"""Feeding a plan's window from a dataset: micro-batches of exactly the plan's sizes.

A balanced plan's window is uneven (256 over 5 micro-steps is 52 + 51 + 51 + 51
+ 51), so ``DataLoader(batch_size=plan.micro_batch_size)`` feeds 52s and the
window holds 260 samples. :class:`WindowBatchSampler` hands out index batches
of the window's sizes in turn, and :meth:`gaccum.Plan.loader` builds the
``DataLoader`` around it in one line.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from ._checks import is_int


class WindowBatchSampler(Sampler[list[int]]):
    """Index batches of sizes ``window[0], window[1], ...`` in turn, over ``sampler``'s order.

    The last batch is shorter when the data runs out (dropped with
    ``drop_last=True``); the Accumulator weights it by its real size.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], window: Sequence[int], drop_last: bool = False) -> None:
        if not window or not all(is_int(w) and w > 0 for w in window):
            raise ValueError(f"gaccum: window must be a non-empty list of sizes > 0, got {window!r}")
        self.sampler, self.window, self.drop_last = sampler, list(window), drop_last

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        for size in itertools.cycle(self.window):
            batch = list(itertools.islice(it, size))
            if not batch or (len(batch) < size and self.drop_last):
                return
            yield batch

    def __len__(self) -> int:
        n, count = len(self.sampler), 0  # type: ignore[arg-type]
        for size in itertools.cycle(self.window):
            if n <= 0 or (n < size and self.drop_last):
                return count
            n -= size
            count += 1
        return count  # pragma: no cover


def window_loader(dataset: Any, window: Sequence[int], *, shuffle: bool = False, sampler: Optional[Sampler] = None,
                  drop_last: bool = False, generator: Optional[torch.Generator] = None, **kwargs: Any) -> DataLoader:
    """A DataLoader whose micro-batches follow ``window`` (pass a DistributedSampler as ``sampler`` under DDP)."""
    if "batch_size" in kwargs or "batch_sampler" in kwargs:
        raise TypeError("gaccum: the window sets the batch sizes; leave out batch_size and batch_sampler")
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    elif shuffle:
        raise ValueError("gaccum: pass shuffle=True or a sampler, not both (shuffle in the sampler)")
    return DataLoader(dataset, batch_sampler=WindowBatchSampler(sampler, window, drop_last), **kwargs)
