"""Live tensor memory, counted at the dispatcher: the CPU planner's and ``memory_limit``'s measure.

On CUDA the caching allocator says how much memory a step needed. On CPU (and
on fake tensors, to plan without the device) there is no such allocator, so
:class:`LiveBytes` counts it: every storage it is told about (model, gradients,
optimizer state, master buffers) and every storage an operator returns while it
is active, each once however many views share it, and subtracts a storage the
moment its last reference dies (a weak reference's callback). A view of memory
that was already there (a slice of a dataset held in RAM) is not new memory and
is not counted. Nothing is
registered on modules or parameters, so frozen parameters (LoRA, adapters, a
frozen backbone) need nothing special, and nothing is left behind.

With a budget it raises ``torch.OutOfMemoryError`` from the first operator that
takes the live total over it, as a GPU would: an oversized probe stops at once
instead of running to its end (or taking the machine's RAM with it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import format_bytes


def _storage(t: torch.Tensor) -> Optional[Any]:
    """The tensor's storage, or None for tensors that have none we can see (sparse, some subclasses)."""
    local = getattr(t, "_local_tensor", None)  # a DTensor's shard is what this rank holds
    if isinstance(local, torch.Tensor):
        t = local
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class LiveBytes(TorchDispatchMode):
    """Dispatch mode: bytes of live storages now (``live``) and at most (``peak``).

    ``budget`` (bytes) makes the first operator that exceeds it raise
    ``torch.OutOfMemoryError``.
    """

    def __init__(self, budget: Optional[int] = None) -> None:
        super().__init__()
        self.budget = budget
        self.live = 0
        self.peak = 0
        # id(storage) -> (weakref keeping the callback, bytes counted for it)
        self._seen: dict[int, tuple[weakref.ref, int]] = {}

    # -- what is alive -----------------------------------------------------
    def _add(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is not None:
            self._add_storage(st)

    def _add_storage(self, st: Any) -> None:
        key = id(st)
        n = int(st.nbytes())
        entry = self._seen.get(key)
        if entry is not None:
            ref, counted = entry
            if ref() is st:
                if n != counted:  # resized in place (resize_, set_, FSDP freeing a shard's storage)
                    self.live += n - counted
                    self._seen[key] = (ref, n)
                return
        self._seen[key] = (weakref.ref(st, self._freed(key)), n)
        self.live += n

    def _freed(self, key: int):  # type: ignore[no-untyped-def]
        def callback(ref: weakref.ref) -> None:
            entry = self._seen.get(key)
            if entry is not None and entry[0] is ref:
                del self._seen[key]
                self.live -= entry[1]

        return callback

    def track(self, *objs: Any) -> "LiveBytes":
        """Count what already exists: modules (parameters, gradients, buffers), optimizers (state), tensors."""
        for obj in objs:
            for t in _tensors_of(obj):
                self._add(t)
        self.peak = max(self.peak, self.live)
        return self

    def reset_peak(self) -> None:
        self.peak = self.live

    # -- the dispatcher ----------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = _storage(t)
            if st is None:
                continue
            if id(st) not in self._seen:
                if inputs is None:  # a view (or in-place op) of memory that was there before: not new memory
                    inputs = {id(_storage(a)) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
                if id(st) in inputs:
                    continue
            self._add_storage(st)
        if self.live > self.peak:
            self.peak = self.live
            if self.budget is not None and self.live > self.budget:
                raise torch.OutOfMemoryError(
                    f"gaccum: memory budget exceeded: {format_bytes(self.live)} live > budget "
                    f"{format_bytes(self.budget)} (simulated out-of-memory, in {func})"
                )
        return out


def _tensors_of(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, nn.Module):
        for p in obj.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for g in obj.param_groups:
            for p in g["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for st in obj.state.values():
            yield from (v for v in tree_leaves(st) if isinstance(v, torch.Tensor))
    elif isinstance(obj, (list, tuple, set)):
        for o in obj:
            yield from _tensors_of(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_of(o)


class AllocatorEvents:
    """Context manager: the CPU allocator's own peak (``peak``, bytes above what was live at entry).

    Read from the allocator's allocation and free events (``torch.profiler`` with ``profile_memory``),
    so it counts what operators allocate and free inside themselves -- oneDNN's conversion buffers for
    bf16 matmuls on CPUs without native bf16, reduction scratch -- which no operator returns and so
    :class:`LiveBytes` cannot see. How much there is depends on the CPU (35% of a bf16 MLP's peak on
    some), so a CPU probe takes the larger of the two.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._prof: Any = None

    def __enter__(self) -> "AllocatorEvents":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_native_stderr():  # kineto prints a line at every start and stop
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with _quiet_native_stderr():
            self._prof.__exit__(*exc)
        # the allocator's events in time order (torch's own memory profiler reads them the same way)
        events = sorted((e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        self.peak = peak


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Native code's stderr (file descriptor 2) to /dev/null for a moment: the profiler's start and stop
    lines ("USDT: ... profiler_start") are noise in a plan's output. Python's own stderr is untouched."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
