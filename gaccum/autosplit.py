"""Surviving an out-of-memory micro-step by splitting it, without changing the gradient.

Composer's automatic micro-batching restarts the whole batch when it runs out
of memory. Here the window goes on: the failed micro-batch is split in two and
each half enters the accumulator weighted by its own share of items, so the
window's gradient is still the mean over exactly the same items.

The hard case is an OOM in the middle of backward, after autograd has already
added some parameters' gradients (in place) into the window. Those additions
are the failed micro-batch's own, complete, correctly weighted contributions
for those parameters, so they are kept; while the halves run, the gradients they compute again for those
parameters are dropped as soon as autograd produces them, so nothing is counted
twice. Which parameters were reached is known exactly from
``register_post_accumulate_grad_hook``.

On CPU there is no allocator to run out: :class:`MemoryBudget` raises the same
``torch.OutOfMemoryError`` when the live tensors (accounting.py) exceed
a budget (the planner's), so the same path runs in CI.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .accounting import LiveBytes
from .memory import parse_bytes


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error, including the cuBLAS/cuDNN workspace allocations that fail with their own status."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc)
    return "out of memory" in msg.lower() or any(s in msg for s in _ALLOC_FAILED)


_ALLOC_FAILED = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation",
                 "CUFFT_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED")


class MemoryBudget(LiveBytes):
    """Context manager: raise ``torch.OutOfMemoryError`` once live tensors exceed ``budget`` bytes.

    Counts what the planner's CPU probe counts: the model, its gradients, the
    optimizer's state and every tensor allocated inside (``extra`` adds tensors
    such as FP32 master buffers). Frozen parameters need nothing special.
    """

    def __init__(self, budget: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Sequence[torch.Tensor] = ()) -> None:
        super().__init__(budget)
        self.track(model, optimizer, list(extra))


class TouchTracker:
    """Which parameters autograd accumulated into during an attempt; drops repeats.

    The gradients of ``done`` parameters (already in from a failed attempt) are
    computed again by the retry and dropped the moment they are accumulated,
    rather than freezing the parameters: ``requires_grad`` stays untouched for
    hooks, DDP and checkpointing that read it.
    """

    def __init__(self, params: Iterable[nn.Parameter], masters: Any = None) -> None:
        self.touched: set[nn.Parameter] = set()
        self.discard: frozenset = frozenset()
        self.active = False
        self.masters = masters
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        if p in self.discard:
            p.grad = None
        else:
            self.touched.add(p)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def attempt(self, done: frozenset) -> Iterator[None]:
        stashed = {p: p.grad for p in done}
        for p in done:
            p.grad = None
        self.touched, self.discard, self.active = set(), done, True
        if self.masters is not None:
            self.masters.skip = done
        try:
            yield
        finally:
            self.active, self.discard = False, frozenset()
            if self.masters is not None:
                self.masters.skip = frozenset()
            for p, g in stashed.items():
                p.grad = g

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def halves(size: int) -> int:
    """The micro-batch limit after an OOM at ``size``: the larger half."""
    return (size + 1) // 2


def check_memory_limit(value: Any, device: Optional[torch.device]) -> Optional[int]:
    if value is None:
        return None
    if device is not None and device.type != "cpu":
        raise ValueError(
            f"gaccum: memory_limit is the CPU budget that simulates out-of-memory; on {device.type} the device "
            "itself raises it. Leave memory_limit unset"
        )
    return parse_bytes(value)
