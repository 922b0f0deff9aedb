"""Length-aware micro-batches and windows: what a token plan feeds.

Samples are sorted by length within buckets (shuffled per epoch), and micro-batches are filled while
the micro-batch padded to its longest sample still fits the plan's curve (``max_batch(L)``), as
fairseq's ``max_tokens`` batching does but with the limit measured rather than guessed. Micro-batches
are then dealt in a shuffled order into windows of a target number of samples or real tokens; the last
micro-batch of each window is flagged, so the loop ends the window there (``acc.accumulate(last=True)``)
and weights every micro-batch by its real tokens (``num_items``): the window's gradient is the token mean
over exactly its samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


def length_batches(lengths: Sequence[int], max_batch: Callable[[int], int], order: Sequence[int]) -> list[list[int]]:
    """Micro-batches over ``order`` (indices sorted by length within buckets): each as large as the curve
    allows for the longest sample in it."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and len(current) + 1 > max_batch(max(longest, n)):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


class TokenBatchSampler(Sampler[list[int]]):
    """Index micro-batches bucketed by length; ``ends`` flags each window's last micro-batch (set per epoch)."""

    def __init__(self, lengths: Sequence[int], max_batch: Callable[[int], int], *, target_bs: Optional[int] = None,
                 target_tokens: Optional[int] = None, shuffle: bool = True, bucket: int = 1024,
                 generator: Optional[torch.Generator] = None) -> None:
        if (target_bs is None) == (target_tokens is None):
            raise TypeError("gaccum: windows need target_bs=N samples or target_tokens=N tokens, one of the two")
        self.lengths, self.max_batch = [int(n) for n in lengths], max_batch
        self.target_bs, self.target_tokens = target_bs, target_tokens
        self.shuffle, self.bucket, self.generator = shuffle, bucket, generator
        self.ends: list[bool] = []

    def _order(self) -> list[int]:
        n = len(self.lengths)
        idx = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        out: list[int] = []
        for s in range(0, n, self.bucket):  # sorted within buckets: little padding, still shuffled overall
            out += sorted(idx[s:s + self.bucket], key=lambda i: self.lengths[i])
        return out

    def _windows(self, batches: list[list[int]]) -> list[list[list[int]]]:
        windows, current, filled = [], [], 0
        for b in batches:
            current.append(b)
            filled += len(b) if self.target_bs is not None else sum(self.lengths[i] for i in b)
            if filled >= (self.target_bs or self.target_tokens):  # type: ignore[operator]
                windows.append(current)
                current, filled = [], 0
        if current:
            windows.append(current)  # the last window is partial: weighted by its real tokens
        return windows

    def __iter__(self) -> Iterator[list[int]]:
        batches = length_batches(self.lengths, self.max_batch, self._order())
        if self.shuffle:  # micro-batches of all lengths in each window, not the short ones first
            perm = torch.randperm(len(batches), generator=self.generator).tolist()
            batches = [batches[i] for i in perm]
        windows = self._windows(batches)
        self.ends = [j == len(w) - 1 for w in windows for j in range(len(w))]
        for w in windows:
            yield from w

    def __len__(self) -> int:
        return len(length_batches(self.lengths, self.max_batch, sorted(range(len(self.lengths)),
                                                                         key=lambda i: self.lengths[i])))


class TokenWindowLoader:
    """``for batch, last in loader``: a DataLoader over the length-aware micro-batches, each with whether it
    ends its window. Keyword arguments go to the DataLoader (``collate_fn``, ``num_workers``, ...)."""

    def __init__(self, dataset: Any, lengths: Sequence[int], max_batch: Callable[[int], int], *,
                 target_bs: Optional[int] = None, target_tokens: Optional[int] = None, shuffle: bool = True,
                 generator: Optional[torch.Generator] = None, **loader_kwargs: Any) -> None:
        if len(lengths) != len(dataset):
            raise ValueError(f"gaccum: {len(lengths)} lengths for a dataset of {len(dataset)} samples; give one "
                             "length per sample")
        self.sampler = TokenBatchSampler(lengths, max_batch, target_bs=target_bs, target_tokens=target_tokens,
                                         shuffle=shuffle, generator=generator)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, **loader_kwargs)

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        it = iter(self.loader)  # the sampler lays out this epoch's windows as the loader starts
        for k, batch in enumerate(it):
            yield batch, self.sampler.ends[k]

    def __len__(self) -> int:
        return len(self.sampler)
