"""A probe: one micro-step of steady training at batch b, its memory measured.

Steady training is what has to fit, not the first window. By then the
optimizer's state exists (8 B/param for AdamW) and the window's gradients are
alive while the next micro-batch runs forward and backward; with FP32 master
gradients (half-precision models) the Accumulator also holds FP32 master
weights, an FP32 gradient buffer and FP32 optimizer state. :class:`Rig` puts
exactly that memory in place once, before the first probe, and keeps it across
probes; :class:`Snapshot` gives the user's model and optimizer back at the end,
bitwise and in place (the same tensor objects).

A probe reports three numbers: ``static`` (live before the forward: weights,
gradients, optimizer state, masters), ``activation_peak`` (the most live during
forward + backward, which grows with b without a knee) and ``peak`` (that or the
optimizer step's, whichever is larger). On CUDA they come from the caching
allocator; on CPU and on fake tensors from :class:`~gaccum.accounting.LiveBytes`,
which stops the probe at the first operator past the budget's margin.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..accounting import AllocatorEvents, LiveBytes
from .._fsdp import fsdp_root, gradient_sync
from ..accumulation import is_oom
from ..batch import batch_devices, batch_size
from ..accumulation import HALF, flat_masters, trained_params
from ..ops import unscale_check_accumulate_

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

# A CPU probe's verdict is "does not fit" as soon as it passes the budget; it is
# stopped outright once it passes the budget by this factor. In between it runs
# on to measure its peak, which gives the search a point above the budget to
# interpolate towards (memory stays bounded: never more than this x budget).
PROBE_MARGIN = 1.5


@dataclass
class ProbeResult:
    batch: int
    peak: Optional[int]  # bytes; None when the step ran out of memory (or hit the budget) before its end
    fit: bool
    seconds: float = 0.0
    oom: bool = False
    activation_peak: Optional[int] = None  # the most live during forward + backward
    static: Optional[int] = None  # live before the forward

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- no trace
class Snapshot:
    """Everything a probe may touch, copied to CPU and put back in place.

    The tensors the user holds stay the same objects (parameters, buffers,
    ``.grad``, optimizer state, the ``param_groups`` dicts): DDP's bucket views,
    a compiled or CUDA-graphed optimizer and any reference the user kept still
    point at live data. Only CPU copies are held, so a warm optimizer's state is
    never on the device twice.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.model, self.optimizer = model, optimizer
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in list(model.parameters()) + list(model.buffers())]
        self.grads = [(p, p.grad, None if p.grad is None else p.grad.detach().to("cpu", copy=True))
                      for p in model.parameters()]
        self.state = {p: (st, dict(st), _to_cpu(dict(st))) for p, st in optimizer.state.items()} if optimizer else {}
        self.groups = [(g, _to_cpu({k: v for k, v in g.items() if k != "params"}), list(g["params"]))
                       for g in optimizer.param_groups] if optimizer else []
        self.modes = [(m, m.training) for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.py_rng = random.getstate()
        try:
            import numpy as np

            self.np_rng = np.random.get_state()
        except ImportError:  # pragma: no cover
            self.np_rng = None

    def restore_weights(self) -> None:
        """Parameters and buffers only: between probes, gradients and optimizer state stay warm."""
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Run a step that may change the weights (a warm-up, a probe, a soak): they come back at the end,
        however it ends."""
        try:
            yield
        finally:
            self.restore_weights()

    def restore(self) -> None:
        self.restore_weights()
        with torch.no_grad():
            for p, g, saved in self.grads:
                p.grad = g
                if g is not None:
                    g.copy_(saved)
            opt = self.optimizer
            for p in [q for q in (opt.state if opt is not None else {}) if q not in self.state]:
                del opt.state[p]  # state the probes created (the warm-up) goes
            for p, (st, items, saved) in self.state.items():
                st.clear()
                for k, v in items.items():
                    if torch.is_tensor(v) and torch.is_tensor(saved[k]):
                        v.copy_(saved[k])
                        st[k] = v
                    else:
                        st[k] = copy.deepcopy(saved[k])
                opt.state[p] = st
            for g, saved, params in self.groups:
                g["params"][:] = params
                for k, v in saved.items():
                    if torch.is_tensor(g.get(k)) and torch.is_tensor(v) and g[k].shape == v.shape:
                        g[k].copy_(v)
                    else:
                        g[k] = copy.deepcopy(v)
        for m, training in self.modes:
            m.training = training
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


# --------------------------------------------------------------------------- steady state
def optimizer_like(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A new optimizer of the same type and hyper-parameters over other tensors."""
    try:  # the groups carry every hyper-parameter; some optimizers insist on lr too
        return type(optimizer)(groups)
    except TypeError:
        return type(optimizer)(groups, lr=optimizer.param_groups[0]["lr"])


class Rig:
    """The memory a window's middle micro-step runs with, put in place once for all probes.

    Without master gradients: the window's gradients (the user's ``.grad``
    tensors, or zeros) and the optimizer's state (one warm-up step on zero
    gradients when it has none). With master gradients, what the Accumulator
    holds instead: FP32 copies of the half parameters, one FP32 gradient buffer
    and an optimizer of the same kind over the FP32 copies (warm), while the
    model's half gradients live only from backward to the flush, as there.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: Optional[str],
                 device: torch.device, master_grads: bool) -> None:
        self.model, self.amp, self.device, self.master_grads = model, amp, device, master_grads
        self.params = trained_params(model.parameters(), optimizer)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.extra: list[Any] = []
        # FSDP2: a window's middle micro-steps run without gradient sync, their unreduced unsharded
        # gradients held inside FSDP, and its last one reduces them: a probe runs one of each.
        self.fsdp = fsdp_root(model)
        if not master_grads:
            self.optimizer = optimizer
            self._ensure_grads()
            if any(not optimizer.state.get(p) for p in self.params):
                optimizer.step()  # creates the state steady training carries; the weights are restored
            return
        self.flat, self.views = flat_masters(self.params, device)  # laid out as MasterGrads lays it out
        self.weights = {p: (nn.Parameter(p.detach().to(torch.float32), requires_grad=True) if p.dtype in HALF else p)
                        for p in self.params}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.weights[p] for p in g["params"] if p in self.weights]} for g in optimizer.param_groups]
        self.optimizer = optimizer_like(optimizer, [g for g in groups if g["params"]])
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.inv_scale = torch.ones(1, dtype=torch.float32, device=device)
        self._step_masters()
        self.extra = [self.flat, self.found_inf, self.inv_scale, *self.weights.values()]

    def tracked(self) -> list[Any]:
        """What the accounting counts besides the model: the optimizer (and its parameters) and masters."""
        return [self.optimizer, *self.extra]

    def _ensure_grads(self) -> None:
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _step_masters(self) -> None:
        for p, v in zip(self.params, self.views):
            self.weights[p].grad = v
        self.optimizer.step()
        for p in self.params:
            self.weights[p].grad = None

    def _flush(self) -> None:
        pairs = [(p.grad, v) for p, v in zip(self.params, self.views) if p.grad is not None]
        if pairs:
            unscale_check_accumulate_([g for g, _ in pairs], [v for _, v in pairs], self.found_inf, self.inv_scale,
                                      overwrite=False)
        for p in self.trainable:
            p.grad = None

    def settle(self) -> None:
        """After a probe that raised: gradients back to the steady-state shape."""
        if self.master_grads:
            for p in self.trainable:
                p.grad = None
        else:
            self._ensure_grads()

    def step(self, sample: Callable[[int], Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], b: int,
             check: bool = True, micro: int = 1, on_phase: Optional[Callable[[str], None]] = None) -> Any:
        """``micro`` micro-steps of one batch of b, then the optimizer step. Returns the batch."""
        if not self.master_grads:
            self._ensure_grads()
        batch = _draw(sample, b, self.device, check, on_phase)
        dtype = AMP_DTYPES[self.amp]
        if self.fsdp is not None:
            with gradient_sync(self.fsdp, False):
                self._micro_steps(batch, loss_fn, max(1, micro - 1), check, dtype)
            self._micro_steps(batch, loss_fn, 1, check, dtype)  # the window's last: it reduce-scatters
        else:
            self._micro_steps(batch, loss_fn, micro, check, dtype)
        if on_phase is not None:
            on_phase("step")
        if self.master_grads:
            self._step_masters()
        else:
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_zero_([p.grad for p in self.trainable if p.grad is not None])
        return batch

    def _micro_steps(self, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor], micro: int, check: bool,
                     dtype: Any) -> None:
        for _ in range(micro):
            with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                loss = loss_fn(self.model, batch)
            if check and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"gaccum: loss_fn must return a scalar tensor, got {shape}; reduce it with .mean()")
            if self.amp == "fp16":
                loss = loss * 1024.0  # what a GradScaler does to memory: nothing but this multiply
            loss.backward()
            del loss
            if self.master_grads:
                self._flush()


class EvalRig:
    """What an evaluation step runs with: the model alone, in eval mode, forward only under inference_mode
    (no gradients, no optimizer state), so an eval batch is planned apart from the training one."""

    master_grads = False
    fsdp = None

    def __init__(self, model: nn.Module, amp: Optional[str], device: torch.device) -> None:
        self.model, self.amp, self.device = model, amp, device

    def tracked(self) -> list[Any]:
        return []

    def settle(self) -> None:
        pass

    def step(self, sample: Callable[[int], Any], fn: Callable[[nn.Module, Any], Any], b: int, check: bool = True,
             micro: int = 1, on_phase: Optional[Callable[[str], None]] = None) -> Any:
        """``micro`` forward passes of one batch of b; ``fn(model, batch)`` is the evaluation (its output is
        dropped). Returns the batch."""
        batch = _draw(sample, b, self.device, check, on_phase)
        dtype = AMP_DTYPES[self.amp]
        with torch.inference_mode(), (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                                      else contextlib.nullcontext()):
            for _ in range(micro):
                out = fn(self.model, batch)
                del out
        if on_phase is not None:
            on_phase("step")
        return batch


def _draw(sample: Callable[[int], Any], b: int, device: torch.device, check: bool,
          on_phase: Optional[Callable[[str], None]]) -> Any:
    """A step's batch: the memory before it is the "forward" phase's mark; checked when asked."""
    if on_phase is not None:
        on_phase("forward")
    batch = sample(b)
    if check:
        _check_batch(batch, b, device)
    return batch


def _check_batch(batch: Any, b: int, device: torch.device) -> None:
    got = batch_size(batch)
    if got != b:
        raise ValueError(f"gaccum: sample({b}) returned a batch of {got} samples; it must return exactly b")
    devs = {d.type for d in batch_devices(batch)}
    if devs and devs != {device.type}:
        raise ValueError(
            f"gaccum: sample() returned tensors on {sorted(devs)} but the model is on {device.type}; "
            "put the batch on the model's device"
        )


# --------------------------------------------------------------------------- probes
def fits(peak: Optional[int], budget: int) -> bool:
    """The one rule for "fits": a measured peak at most the budget (no peak: it ran out of memory)."""
    return peak is not None and peak <= budget


def cuda_peak(device: torch.device, sync: bool = True) -> int:
    """The one reading of a step's peak on CUDA: what the caching allocator reserved or allocated at most."""
    if sync:
        torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device))


class CudaMeter:
    """The caching allocator's own statistics: two micro-steps and the optimizer step with no cache emptied
    between them, so fragmentation shows; an out-of-memory error (cuBLAS/cuDNN's too) is a measured no."""

    micro = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, int] = {}

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)

    def on_phase(self, name: str) -> None:
        torch.cuda.synchronize(self.device)
        if name == "forward":
            self.phases["static"] = torch.cuda.memory_allocated(self.device)
        else:
            self.phases["act"] = cuda_peak(self.device, sync=False)

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc)

    def peak(self) -> int:
        return cuda_peak(self.device, sync=False)

    def after_oom(self) -> None:
        gc.collect()  # the failed step's frames hold tensors until collected

    def done(self) -> None:
        torch.cuda.empty_cache()


class TrackedMeter:
    """CPU and fake tensors: LiveBytes counts every storage and stops at the budget; on real CPU tensors the
    allocator's own events also count the scratch operators allocate inside, and the larger peak counts.
    Under FSDP2 a probe runs collectives: one rank stopping early would leave the others waiting, so every
    rank runs to the end (and gloo's threads allocate too: there the tensor count is the measure)."""

    micro = 1

    def __init__(self, rig: Any, budget: int, fake_mode: Any = None) -> None:
        self.live = LiveBytes(None if rig.fsdp is not None else int(budget * PROBE_MARGIN))
        self.live.track(rig.model, *rig.tracked())
        self.base = self.live.live
        real_cpu = fake_mode is None and rig.device.type == "cpu" and rig.fsdp is None
        self.events = AllocatorEvents() if real_cpu else None
        self.fake_mode = fake_mode
        self.phases: dict[str, int] = {}

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext(), self.live, \
                self.events if self.events is not None else contextlib.nullcontext():
            yield

    def on_phase(self, name: str) -> None:
        if name == "forward":
            self.phases["static"] = self.live.live
            self.live.reset_peak()
        else:
            self.phases["act"] = self.live.peak

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError)

    def peak(self) -> int:
        # LiveBytes' peak is reset at the forward, so it already covers the activations
        return max(self.live.peak, self.base + self.events.peak if self.events is not None else 0)

    def after_oom(self) -> None:
        pass

    def done(self) -> None:
        pass


def measure(rig: Any, meter: Any, run: Callable[[], Any]) -> tuple[Optional[int], float]:
    """(peak, seconds) of ``run()`` under ``meter``; out of memory is an answer (peak None, the rig settled),
    any other error the user's."""
    t0 = time.perf_counter()
    oom = False
    try:
        with meter.measuring():
            run()
    except Exception as exc:  # noqa: BLE001 - OOM is an answer, anything else is re-raised
        if not meter.is_oom(exc):
            raise
        oom = True
    seconds = time.perf_counter() - t0
    peak = None if oom else meter.peak()
    if oom:
        meter.after_oom()
        rig.settle()
    meter.done()
    return peak, seconds


def probe(rig: Any, sample, loss_fn, b: int, budget: int, snapshot: Optional[Snapshot], meter: Any) -> ProbeResult:
    """One probe at b, measured by ``meter`` (CudaMeter or TrackedMeter); the weights come back; ``fits``
    decides."""
    peak, seconds = measure(rig, meter, lambda: rig.step(sample, loss_fn, b, micro=meter.micro,
                                                         on_phase=meter.on_phase))
    if snapshot is not None:
        snapshot.restore_weights()
    oom = peak is None
    return ProbeResult(b, peak, fits(peak, budget), seconds, oom, meter.phases.get("act") if not oom else None,
                       meter.phases.get("static"))


def probe_cuda(rig: Rig, sample, loss_fn, b, budget, snapshot: Snapshot) -> ProbeResult:
    """A probe on a GPU (CudaMeter)."""
    return probe(rig, sample, loss_fn, b, budget, snapshot, CudaMeter(rig.device))


def probe_tracked(rig: Rig, sample, loss_fn, b, budget, snapshot: Optional[Snapshot],
                  fake_mode: Any = None) -> ProbeResult:
    """A probe on CPU or fake tensors (TrackedMeter)."""
    return probe(rig, sample, loss_fn, b, budget, snapshot, TrackedMeter(rig, budget, fake_mode))
