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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .._checks import warn_user
from ..accounting import LiveBytes
from ..batch import batch_size, batch_tensors, split_batch
from ..memory import parse_bytes
from .boundary import StepResult
from .checks import check_items, check_loss
from .core import MICRO_STEP, AccumulationCore


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


# --------------------------------------------------------------------------- Accumulator.micro_batch
def _loss_and_items(out: Any) -> tuple[torch.Tensor, Optional[float]]:
    """What a micro_batch() loss_fn returns: a loss, or (loss, num_items)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"gaccum: loss_fn returns a loss or (loss, num_items), got a sequence of {len(out)}")
        loss, items = out
        check_loss(loss)
        return loss, check_items(items)
    check_loss(out)
    return out, None


@dataclass
class _Run:
    """One micro_batch() call: what its pieces have added to the window so far."""

    size: int
    n_full: float
    loss_fn: Callable[[nn.Module, Any], Any]
    items: float = 0.0
    pieces: int = 0
    attempt_items: float = 0.0  # the count of the piece being tried
    attempt_loss: Optional[torch.Tensor] = None

    def add(self, n: float) -> None:
        self.items += n
        self.pieces += 1


class MicroBatchRunner:
    """``Accumulator.micro_batch``: gaccum runs forward and backward, so an OOM splits the micro-batch.

    ``front`` is the Accumulator: its model, ``sync_context`` and ``memory_limit`` are read here.
    """

    def __init__(self, front: Any, core: AccumulationCore, on_oom: str) -> None:
        self.front = front
        self.core = core
        self.on_oom = on_oom
        self.touch: Optional[TouchTracker] = None
        self.peak_memory: Optional[int] = None  # the last call's peak under memory_limit

    def run(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Any], last: bool) -> StepResult:
        """EMPTY / ACCUMULATING -> IN_MICRO_STEP -> ACCUMULATING (or the boundary). See Accumulator.micro_batch."""
        core = self.core
        core.require_open("micro_batch")
        if not callable(loss_fn):
            raise TypeError(f"gaccum: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        size = batch_size(batch)
        if size == 0:
            raise ValueError("gaccum: micro_batch() got an empty batch (0 samples); skip it, nothing was run")
        core.check_ranks(MICRO_STEP)
        is_last = core.window.next_is_last() or bool(last)
        sync = self._sync(is_last)
        if self.touch is None and self.on_oom == "split":
            self.touch = TouchTracker(core.params, core.masters)
            core.teardown.add(self.touch.remove)
        # gaccum sees the batch here: every micro-batch weighs what it holds (a short last one too)
        run = _Run(size=size, n_full=float(size), loss_fn=loss_fn)
        limit = core.micro_batch_limit
        pieces = [batch] if limit is None or size <= limit else split_batch(batch, limit)
        self.peak_memory = None
        core.begin_micro()
        try:
            for i, piece in enumerate(pieces):
                self._piece(piece, run, sync and i == len(pieces) - 1, frozenset())
        except BaseException as exc:
            core.abort_micro(exc)
            raise
        if run.pieces == 0:  # every piece had a non-finite loss and was skipped
            core.leave_micro()
            return core.micro_result()
        # real counts: under DDP the window's total is summed over ranks
        return core.end_micro(run.items, sync, items_mode=True, last=bool(last), samples=size)

    def _sync(self, is_last: bool) -> bool:
        """Under DDP with splitting armed, no piece lets DDP reduce during backward: a rank that splits would
        make a different number of backward passes, and the others would wait in a collective. The core
        reduces the window by hand at its end instead (one flat all-reduce, the same call on every rank)."""
        if self.front.fsdp is not None:
            return is_last  # FSDP2 reduces in the last micro-step; it cannot be reduced by hand afterwards
        return is_last and self.core.masters is None and not (self.front.ddp and self.on_oom == "split")

    def _piece(self, piece: Any, run: _Run, sync: bool, done_params: frozenset) -> None:
        k = batch_size(piece)
        try:
            self._attempt(piece, k, run, sync, done_params)
            return
        except Exception as exc:  # noqa: BLE001 - only an OOM is handled; the rest re-raised as is
            if not is_oom(exc) or self.on_oom != "split":
                raise
            if self.front.fsdp is not None:
                raise torch.OutOfMemoryError(
                    f"{exc}\ngaccum: a micro-batch that runs out of memory is not split under FSDP2: its forward "
                    "all-gathers parameters, and a rank that stopped midway would leave the others waiting in that "
                    "collective. Plan with gaccum.plan, or use DDP, where splitting is supported"
                ) from exc
            if k == 1:
                raise torch.OutOfMemoryError(
                    f"{exc}\ngaccum: out of memory on a micro-batch of 1 sample; nothing smaller to split into. "
                    "Free memory, or use activation checkpointing or a smaller model"
                ) from exc
        # Out of the except block: the failed attempt's frame and its activations are freed.
        self._split(piece, k, run, sync, done_params)

    def _split(self, piece: Any, k: int, run: _Run, sync: bool, done_params: frozenset) -> None:
        core = self.core
        if core.masters is not None:
            core.masters.settle()
        if core.params[0].device.type == "cuda":
            torch.cuda.empty_cache()
        assert self.touch is not None
        reached = set(self.touch.touched)  # these already hold this piece's whole, weighted contribution
        new = halves(k)
        if core.micro_batch_limit is None or new < core.micro_batch_limit:
            core.micro_batch_limit = new
            warn_user(
                f"gaccum: out of memory on a micro-batch of {k}; split into {new} + {k - new} and carried on. "
                f"The window's effective batch is unchanged; micro-batches now run in pieces of at most {new}",
                RuntimeWarning,
            )
        core.oom_splits += 1
        if reached and all(p in reached or p in done_params for p in core.params if p.requires_grad):
            # the backward had reached every parameter: the piece is in, whole
            if run.attempt_loss is not None:
                core.window.add_loss(run.attempt_loss, run.attempt_items)
            run.add(run.attempt_items)
            return
        parts = split_batch(piece, new)
        for j, part in enumerate(parts):
            self._piece(part, run, sync and j == len(parts) - 1, done_params | reached)

    def _attempt(self, piece: Any, k: int, run: _Run, sync: bool, done_params: frozenset) -> None:
        core, front = self.core, self.front
        watch = self.touch.attempt(done_params) if self.touch is not None else contextlib.nullcontext()
        budget: Any = contextlib.nullcontext()
        if front.memory_limit is not None:
            extra = batch_tensors(piece) + [p.grad for p in done_params if p.grad is not None]
            if core.masters is not None:
                assert core.master_weights is not None
                extra += [core.masters.flat, *core.master_weights.weights]
            budget = MemoryBudget(front.memory_limit, front.model, core.optimizer, extra)
        run.attempt_loss = None
        with budget, watch, front.sync_context(sync):
            loss, items = _loss_and_items(run.loss_fn(front.model, piece))
            n = items if items is not None else run.n_full * k / run.size
            run.attempt_items = n
            if core.skip_nonfinite(loss):
                return
            run.attempt_loss = loss.detach()
            core.backward(loss, n, n * run.size / k)
        if front.memory_limit is not None:
            self.peak_memory = max(self.peak_memory or 0, budget.peak)
            core.window_peak = max(core.window_peak, budget.peak)
        run.add(n)
