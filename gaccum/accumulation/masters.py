"""FP32 master gradients (and weights) for half-precision parameters.

Accumulating bf16/fp16 gradients in ``.grad`` rounds every partial sum to 8 or
11 bits of mantissa; after 64 micro-batches the error is visible. Here each
parameter's gradient is moved into a flat FP32 buffer as soon as backward has
produced it (``register_post_accumulate_grad_hook``) and the half gradient is
freed. Hooks collect gradients into buckets so the fused op runs once per
bucket, not once per parameter; the rest is flushed by an autograd callback at
the end of the backward pass (:class:`~gaccum.accumulation.lifecycle.BackwardWatch`). At most one
bucket of half gradients is alive.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional, Sequence

import torch

from ..ops import fused_masters, unscale_check_accumulate_
from .checks import HALF
from .lifecycle import BackwardWatch

# Everything that moves gradients out of .grad as backward produces them (MasterGrads, the hook's
# window): verify() pauses those on its model so that its own passes leave a live window alone.
LIVE_MOVERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


@contextlib.contextmanager
def paused(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Pause every live gradient mover on ``params`` (after settling what it has pending)."""
    wanted = {id(p) for p in params}
    objs = [o for o in list(LIVE_MOVERS) if any(id(p) in wanted for p in o.params)]
    for o in objs:
        if hasattr(o, "flush_pending"):
            o.flush_pending()
        o.paused = True
    try:
        yield
    finally:
        for o in objs:
            o.paused = False


def padded_offsets(sizes: Sequence[int], align: int = 4) -> list[int]:
    """Start of each of ``sizes`` in one flat buffer, rounded up to ``align`` elements (4 floats = 16 bytes);
    the last entry is the buffer's length."""
    out, off = [], 0
    for n in sizes:
        out.append(off)
        off += -(-n // align) * align
    return out + [off]


def flat_masters(params: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One zeroed FP32 buffer and a view of it shaped like each parameter.

    Each view starts on a 16-byte boundary, so the kernel's vector path takes every master (the gaps
    are zeros that nothing writes; they cost at most 12 bytes a parameter).
    """
    offsets = padded_offsets([p.numel() for p in params])
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    return flat, [flat[o: o + p.numel()].view_as(p) for o, p in zip(offsets, params)]


# The kernel gives each block 65,536 elements (csrc/multi_tensor_apply.cuh, kChunkSize) of 512 threads, and an
# SM holds 4 such blocks; a flush should launch at least two waves of them.
_CHUNK, _BLOCKS_PER_SM, _WAVES = 65536, 4, 2


def bucket_bytes_for(device: torch.device) -> int:
    """How many bytes of half gradients a flush waits for: 32 MiB, or on a GPU enough chunks for two full
    waves of blocks (32 MiB launched 256 blocks, half a wave on an H200's 132 SMs; there it is 132 MiB)."""
    floor = 32 << 20
    if device.type != "cuda":
        return floor
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(floor, sms * _BLOCKS_PER_SM * _WAVES * _CHUNK * 2)


class MasterGrads:
    """One flat FP32 buffer holding the accumulated gradient of ``params``."""

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_bytes: Optional[int] = None,
                 watch: Optional[BackwardWatch] = None, guard_backward: bool = False) -> None:
        """``guard_backward``: the user runs the backward (the hook), so a backward that raised is noticed
        by a gradient pre-hook before a new backward can add to its pending gradients; the Accumulator runs
        the backward itself and catches it, and spares the hot path that hook."""
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(
                f"gaccum: FP32 master gradients need all parameters on one device, found {sorted(map(str, devices))}; "
                "pass master_grads=False for a model split across devices"
            )
        self.device = devices.pop()
        self.params = list(params)
        self.index = {p: i for i, p in enumerate(self.params)}
        self.flat, self.views = flat_masters(self.params, self.device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._inv_scale = torch.ones(1, dtype=torch.float32, device=self.device)
        self._inv_scale_value = 1.0
        self.written = [False] * len(self.params)
        self.bucket_bytes = bucket_bytes if bucket_bytes is not None else bucket_bytes_for(self.device)
        self._pending: list[int] = []
        self._pending_bytes = 0
        self.watch = watch if watch is not None else BackwardWatch()
        self.watch.on_complete.append(self.flush_pending)
        self.skip: frozenset = frozenset()
        self.paused = False
        # Where the fused kernel serves this device: the masters registered once, and each contiguous
        # gradient's pointer taken in its hook, so a flush is one call with two ready lists.
        self._fused = fused_masters(self.views, [p.dtype for p in self.params], self.found_inf, self._inv_scale)
        self._ready: dict[bool, tuple[list[int], list[int], list[torch.Tensor]]] = {True: ([], [], []),
                                                                                    False: ([], [], [])}
        # with guard_backward the watch runs before autograd accumulates: a failed backward's pending
        # gradients are dropped before a new backward could add to them
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        if guard_backward:
            self.handles += [p.register_hook(self._before_accumulate) for p in self.params]
        LIVE_MOVERS.add(self)

    # -- hooks ------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.flat.numel() * 4

    def set_inv_scale(self, value: float) -> None:
        if value != self._inv_scale_value:
            self._inv_scale.fill_(value)
            self._inv_scale_value = value

    def _before_accumulate(self, grad: torch.Tensor) -> None:
        if not self.paused:
            self.watch.seen()  # an earlier backward that raised part-way is discarded first

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None or self.paused:
            return
        self.watch.seen()  # queues the end-of-backward flush (a no-op after the pre-hook's own call)
        if p.grad is None:  # a failure seen only now (a backward run outside gaccum): the window went with it
            return
        if p in self.skip:  # already in from an attempt that ran out of memory (micro_batch.py)
            p.grad = None
            return
        g, i = p.grad, self.index[p]
        if g.numel() != self.views[i].numel():  # p.data was swapped for another shape: never read past a master
            raise ValueError(f"gaccum: parameter {i} now has {g.numel()} elements but its FP32 master {self.views[i].numel()}"
                             "; a parameter's shape cannot change under an Accumulator or hook: close() it, change "
                             "the model, and build a new one")
        if self._fused is not None and g.is_contiguous():
            index, ptrs, keep = self._ready[not self.written[i]]  # keyed by overwrite
            index.append(i)
            ptrs.append(g.data_ptr())
            keep.append(g)  # alive until the launch is enqueued, whatever else happens to p.grad
        else:
            self._pending.append(i)
        self._pending_bytes += g.numel() * g.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self.flush_pending()

    def settle(self) -> None:
        """After an out-of-memory attempt whose backward raised (micro_batch keeps what it reached): the
        pending gradients are that attempt's own, already weighted, so they go in now."""
        self.flush_pending()
        self.watch.forget()

    def drop_pending(self) -> None:
        """Free the pending half gradients without adding them (a window being discarded)."""
        for i in self._pending + [i for index, _, _ in self._ready.values() for i in index]:
            self.params[i].grad = None
        self._pending, self._pending_bytes = [], 0
        self._ready = {True: ([], [], []), False: ([], [], [])}

    def flush_pending(self) -> None:
        """Move the pending half gradients into the masters and free them."""
        ready = [(ow, lists) for ow, lists in self._ready.items() if lists[0]]
        if not self._pending and not ready:
            return
        slow, self._pending, self._pending_bytes = self._pending, [], 0
        done = list(slow)
        for overwrite, (index, ptrs, keep) in ready:
            self._ready[overwrite] = ([], [], [])
            self._fused.launch(index, ptrs, overwrite)  # type: ignore[union-attr]
            self._used_by_stream(keep)
            done += index
        for overwrite in (True, False):
            sel = [i for i in slow if self.written[i] != overwrite]
            if not sel:
                continue
            grads = [self.params[i].grad for i in sel]
            masters = [self.views[i] for i in sel]
            # The first micro-step of a window overwrites: no separate zeroing pass.
            unscale_check_accumulate_(grads, masters, self.found_inf, self._inv_scale, overwrite=overwrite)
            self._used_by_stream(grads)
        for i in done:
            self.params[i].grad = None
            self.written[i] = True

    def _used_by_stream(self, grads: list[torch.Tensor]) -> None:
        """Gradients about to be freed, read by work just queued on the current stream: on CUDA the caching
        allocator must not give their memory to another stream (a backward's, a side stream's) before that
        work has read it."""
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for g in grads:
                g.record_stream(stream)

    # -- window boundary ---------------------------------------------------
    def finalize(self) -> None:
        """Zero the masters of parameters that got no gradient this window."""
        self.flush_pending()
        for i, w in enumerate(self.written):
            if not w:
                self.views[i].zero_()

    def reset(self) -> None:
        self.written = [False] * len(self.params)
        self.found_inf.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        LIVE_MOVERS.discard(self)


class MasterWeights:
    """FP32 copies of half-precision parameters, swapped into the optimizer.

    The optimizer then steps FP32 weights with FP32 gradients (the master
    buffer's views); after each real step the result is copied back into the
    model's half parameters. ``restore()`` puts the original parameters back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.model_params = list(params)
        self.weights: list[torch.Tensor] = []
        self._swapped: dict[torch.Tensor, torch.Tensor] = {}
        for p in self.model_params:
            if p.dtype in HALF:
                w = torch.nn.Parameter(p.detach().to(torch.float32).clone(), requires_grad=p.requires_grad)
                self._swapped[p] = w
            else:
                w = p
            self.weights.append(w)
        if self._swapped:
            for group in optimizer.param_groups:
                group["params"] = [self._swapped.get(q, q) for q in group["params"]]
            for old, new in self._swapped.items():
                if old in optimizer.state:
                    st = optimizer.state.pop(old)
                    optimizer.state[new] = {
                        k: (v.to(torch.float32) if torch.is_tensor(v) and v.is_floating_point() and v.shape == new.shape else v)
                        for k, v in st.items()
                    }
        self.half_pairs = [(p, w) for p, w in zip(self.model_params, self.weights) if p is not w]
        self._seen = self._marks()

    def _marks(self) -> list[tuple[int, int]]:
        """Each half parameter's in-place version and storage: what changes when someone else writes it."""
        return [(p._version, p.data_ptr()) for p, _ in self.half_pairs]

    def refresh_stale(self) -> int:
        """Masters of half parameters written since the last copy-back (``load_state_dict``, ``p.data = ...``,
        an EMA swap) are re-read from them, so the next step never writes old weights back. Returns how many.

        A half weight written with exactly the rounding of its master (the model's own checkpoint loaded
        after ``acc.load_state_dict``) keeps the FP32 master: re-reading it would lose its low bits.
        """
        stale = [i for i, (m, now) in enumerate(zip(self._seen, self._marks())) if m != now]
        refreshed = 0
        if stale:
            with torch.no_grad():
                for i in stale:
                    p, w = self.half_pairs[i]
                    if p.shape != w.shape or not torch.equal(p.detach(), w.detach().to(p.dtype)):
                        w.copy_(p.detach())
                        refreshed += 1
            self._seen = self._marks()
        return refreshed

    def copy_back(self) -> None:
        if self.half_pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self.half_pairs], [w for _, w in self.half_pairs])
            self._seen = self._marks()

    def fp32_state(self) -> list[dict[str, torch.Tensor]]:
        """The optimizer's FP32 state of each half parameter's master (a checkpoint keeps it unrounded)."""
        out = []
        for _, w in self.half_pairs:
            st = self.optimizer.state.get(w, {})
            out.append({k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()
                        and v.shape == w.shape})
        return out

    def load_fp32_state(self, states: list[dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for (_, w), saved in zip(self.half_pairs, states):
                st = self.optimizer.state.get(w)
                for k, v in saved.items():
                    if st is not None and k in st:
                        st[k].copy_(v)

    def restore(self) -> None:
        if not self._swapped:
            return
        back = {w: p for p, w in self._swapped.items()}
        for group in self.optimizer.param_groups:
            group["params"] = [back.get(q, q) for q in group["params"]]
        for w, p in back.items():
            if w in self.optimizer.state:
                # the optimizer steps the model's own half parameters again: its state in their dtype
                st = self.optimizer.state.pop(w)
                self.optimizer.state[p] = {k: (v.to(p.dtype) if torch.is_tensor(v) and v.is_floating_point()
                                               and v.shape == p.shape else v) for k, v in st.items()}
        self._swapped = {}
