"""Feeding a plan's window from a dataset: micro-batches of exactly the plan's sizes.

A balanced plan's window is uneven (256 over 5 micro-steps is 52 + 51 + 51 + 51
+ 51), so ``DataLoader(batch_size=plan.micro_batch_size)`` feeds 52s and the
window holds 260 samples. :class:`WindowBatchSampler` hands out index batches
of the window's sizes in turn, and :meth:`gaccum.Plan.loader` builds the
``DataLoader`` around it in one line. A stream (an ``IterableDataset``, whose length
nobody knows) is windowed on the fly by :class:`WindowStream` instead: nothing calls
``len()``, and the last, partial window is weighted by its real size like any other.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data import default_collate

from . import _dist
from .windows import Window

from ._checks import is_int


def _checked(window: Any) -> Window:
    try:
        w = Window.of(window)
    except TypeError:
        w = None
    if w is None or not w.runs or not all(is_int(s) and s > 0 for s, _ in w.runs):
        raise ValueError(f"gaccum: window must be a non-empty list of sizes > 0, got {window!r}")
    return w


def _cycle(window: Window) -> Iterator[int]:
    """The window's sizes again and again, kept as runs (itertools.cycle would store every size)."""
    while True:
        yield from window


class WindowBatchSampler(Sampler[list[int]]):
    """Index batches of sizes ``window[0], window[1], ...`` in turn, over ``sampler``'s order.

    The last batch is shorter when the data runs out (dropped with
    ``drop_last=True``); the Accumulator weights it by its real size.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], window: Sequence[int], drop_last: bool = False) -> None:
        self.sampler, self.window, self.drop_last = sampler, _checked(window), drop_last

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        for size in _cycle(self.window):
            batch = list(itertools.islice(it, size))
            if not batch or (len(batch) < size and self.drop_last):
                return
            yield batch

    def __len__(self) -> int:
        n, count = len(self.sampler), 0  # type: ignore[arg-type]
        for size in _cycle(self.window):
            if n <= 0 or (n < size and self.drop_last):
                return count
            n -= size
            count += 1
        return count  # pragma: no cover


def window_loader(dataset: Any, window: Sequence[int], *, shuffle: bool = False, sampler: Optional[Sampler] = None,
                  drop_last: bool = False, generator: Optional[torch.Generator] = None,
                  shard: bool | tuple[int, int] = False, **kwargs: Any) -> Any:
    """Micro-batches that follow ``window``: a DataLoader over a map-style dataset (pass a DistributedSampler
    as ``sampler`` under DDP), or a :class:`WindowStream` over an ``IterableDataset`` (``shard=True`` keeps
    every world_size-th sample on each rank, as a DistributedSampler would)."""
    if "batch_size" in kwargs or "batch_sampler" in kwargs:
        raise TypeError("gaccum: the window sets the batch sizes; leave out batch_size and batch_sampler")
    if isinstance(dataset, IterableDataset):
        if shuffle or sampler is not None:
            raise ValueError("gaccum: a stream (IterableDataset) has no sampler to shuffle or replace; shuffle "
                             "inside the stream (e.g. a shuffle buffer) and leave out shuffle= and sampler=")
        return WindowStream(dataset, window, drop_last=drop_last, shard=shard, **kwargs)
    if shard is not False:
        raise ValueError("gaccum: shard= is for streams; for a map-style dataset pass "
                         "sampler=DistributedSampler(dataset) under DDP")
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    elif shuffle:
        raise ValueError("gaccum: pass shuffle=True or a sampler, not both (shuffle in the sampler)")
    return DataLoader(dataset, batch_sampler=WindowBatchSampler(sampler, window, drop_last), **kwargs)


class WindowStream:
    """Micro-batches of sizes ``window[0], window[1], ...`` in turn, formed on the fly from a stream.

    Samples come through an inner ``DataLoader(dataset, batch_size=None, ...)`` (so ``num_workers``,
    ``pin_memory`` and the rest work as usual; a stream read by several workers must split itself by
    ``torch.utils.data.get_worker_info()``, as PyTorch documents) and are collated here, in order, into
    the window's sizes. ``shard=True`` (or ``(rank, world_size)``) keeps sample i on rank i % world_size.
    Its length is unknown: iterate it; the last micro-batch is shorter when the stream ends (dropped
    with ``drop_last=True``).
    """

    def __init__(self, dataset: IterableDataset, window: Sequence[int], *, drop_last: bool = False,
                 shard: bool | tuple[int, int] = False, collate_fn: Any = None, **loader_kwargs: Any) -> None:
        window = _checked(window)
        if shard is True:
            shard = (_dist.rank(), _dist.world_size())
        if shard is not False and not (isinstance(shard, tuple) and len(shard) == 2 and all(map(is_int, shard))
                                       and 0 <= shard[0] < shard[1]):
            raise ValueError(f"gaccum: shard must be True, False or (rank, world_size), got {shard!r}")
        self.dataset, self.window, self.drop_last = dataset, window, drop_last
        self.shard = shard or None
        self.collate_fn = collate_fn or default_collate
        self.loader_kwargs = loader_kwargs

    def _samples(self) -> Iterator[Any]:
        samples = iter(DataLoader(self.dataset, batch_size=None, **self.loader_kwargs))
        if self.shard is None:
            return samples
        rank, world = self.shard
        return itertools.islice(samples, rank, None, world)

    def __iter__(self) -> Iterator[Any]:
        samples = self._samples()
        for size in _cycle(self.window):
            batch = list(itertools.islice(samples, size))
            if not batch or (len(batch) < size and self.drop_last):
                return
            yield self.collate_fn(batch)
