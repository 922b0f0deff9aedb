"""Batches of any structure: a tensor, or a tuple/list/dict of them (dim 0 = samples)."""

from __future__ import annotations

from typing import Any, Optional

import torch


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: dim 0 of its tensors, which must agree."""
    sizes = {t.shape[0] for t in batch_tensors(batch) if t.dim() > 0}
    if not sizes:
        raise ValueError("gaccum: the batch holds no tensor with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(f"gaccum: the batch's tensors disagree on dim 0: {sorted(sizes)}")
    return sizes.pop()


def fed_size(args: Any, kwargs: Any) -> Optional[int]:
    """The samples a forward was fed (its positional and keyword inputs), or None when they have no common
    batch dimension."""
    try:
        return batch_size((args, kwargs))
    except ValueError:
        return None


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in batch_tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(v, start, stop) for v in batch)
    if isinstance(batch, list):
        return [slice_batch(v, start, stop) for v in batch]
    return batch


def split_batch(batch: Any, micro_batch_size: int) -> list[Any]:
    """Consecutive micro-batches of ``micro_batch_size`` (the last may be shorter)."""
    n = batch_size(batch)
    return [slice_batch(batch, i, min(i + micro_batch_size, n)) for i in range(0, n, micro_batch_size)]


def batch_devices(batch: Any) -> set[torch.device]:
    return {t.device for t in batch_tensors(batch)}
