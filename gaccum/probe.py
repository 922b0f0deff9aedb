"""A probe: one real training step at batch b, its peak memory measured.

Forward (under autocast when asked), backward and ``optimizer.step()`` all run:
the optimizer allocates its state in the step, and that memory counts. On CUDA
the peak comes from the caching allocator's statistics and an OOM means "does
not fit"; on CPU (and with fake tensors, to plan without the device) every
tensor the step allocates is accounted by torch's MemTracker.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .autosplit import is_oom
from .batch import batch_devices, batch_size


@dataclass
class ProbeResult:
    batch: int
    peak: Optional[int]  # bytes; None when the step ran out of memory on the device
    fit: bool
    seconds: float = 0.0
    oom: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Snapshot:
    """Everything a probe may touch, copied to CPU, restored bitwise."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in list(model.parameters()) + list(model.buffers())]
        self.grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True)) for p in model.parameters()]
        # _to_cpu copies every tensor and container: no device-side deepcopy first (that
        # would briefly double the optimizer state in GPU memory right before measuring).
        self.opt_state = _to_cpu(optimizer.state_dict())
        self.training = model.training
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.py_rng = random.getstate()
        try:
            import numpy as np

            self.np_rng = np.random.get_state()
        except ImportError:  # pragma: no cover
            self.np_rng = None

    def restore_weights(self) -> None:
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
        for p, g in self.grads:
            # A copy: the next probe's backward accumulates into .grad in place.
            p.grad = None if g is None else g.to(p.device, copy=True)
        # load_state_dict may alias the tensors it is given; the next step mutates them.
        self.optimizer.load_state_dict(copy.deepcopy(self.opt_state))
        if not self.opt_state["state"]:
            self.optimizer.state.clear()

    def restore(self) -> None:
        self.restore_weights()
        self.model.train(self.training)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            import numpy as np

            np.random.set_state(self.np_rng)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sample: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    b: int,
    amp: Optional[str],
    device: torch.device,
    check: bool = True,
) -> Any:
    """One training step as a window's middle micro-step sees it.

    Under accumulation every micro-step after the first runs its forward with
    the window's gradients already allocated, so they are allocated here before
    the forward too (zeros, or the gradients the model already has); without
    that the peak above the knee would be short by the size of the gradients.
    Returns the batch, so a caller can describe it without sampling again.
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    batch = sample(b)
    if check:
        got = batch_size(batch)
        if got != b:
            raise ValueError(f"gaccum: sample({b}) returned a batch of {got} samples; it must return exactly b")
        devs = {d.type for d in batch_devices(batch)}
        if devs and devs != {device.type}:
            raise ValueError(
                f"gaccum: sample() returned tensors on {sorted(devs)} but the model is on {device.type}; "
                "put the batch on the model's device"
            )
    dtype = AMP_DTYPES[amp]
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        loss = loss_fn(model, batch)
    if check:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"gaccum: loss_fn must return a scalar tensor, got {shape}; reduce it with .mean()")
    if amp == "fp16":
        loss = loss * 1024.0  # what a GradScaler does to memory: nothing but this multiply
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch


def probe_cuda(model, optimizer, sample, loss_fn, b, amp, device, budget, snapshot: Snapshot) -> ProbeResult:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    oom = False
    try:
        train_step(model, optimizer, sample, loss_fn, b, amp, device)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - OOM is an answer, anything else is re-raised
        if not is_oom(exc):
            raise
        oom = True
    seconds = time.perf_counter() - t0
    peak = None if oom else max(torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device))
    snapshot.restore_weights()
    gc.collect()
    torch.cuda.empty_cache()
    return ProbeResult(b, peak, (not oom) and peak is not None and peak <= budget, seconds, oom)


def tracked_peak(fn: Callable[[], Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 mode: Any = None) -> tuple[Any, int]:
    """Run ``fn`` under torch's MemTracker: (its result, peak bytes of every tensor, model and optimizer included)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with mode if mode is not None else contextlib.nullcontext(), tracker:
        out = fn()
    snap = tracker.get_tracker_snapshot("peak")
    return out, int(sum(v.get("Total", 0) for v in snap.values()))


def probe_tracked(model, optimizer, sample, loss_fn, b, amp, device, budget, snapshot: Snapshot,
                  fake_mode: Any = None) -> ProbeResult:
    """CPU (or fake-tensor) probe: MemTracker accounts every tensor of the step."""
    t0 = time.perf_counter()
    _, peak = tracked_peak(lambda: train_step(model, optimizer, sample, loss_fn, b, amp, device), model, optimizer,
                           fake_mode)
    seconds = time.perf_counter() - t0
    if fake_mode is None:
        snapshot.restore_weights()
    return ProbeResult(b, peak, peak <= budget, seconds, False)
