"""``gaccum.plan``: the largest micro-batch that fits in steady training, in few probes, leaving no trace.

``plan()`` reads as its phases, after Lightning's batch-size tuner (save -> search -> restore in
``finally``): check the arguments -> the budget (budget.py) -> snapshot the model, optimizer and RNG
(probe.py) -> warm up and validate at the smallest size -> the cache -> probe and search (search.py),
every rank agreeing -> the window -> soak -> the report (result.py); the snapshot is restored whatever
happens. Each probe is a micro-step as steady training runs it (the optimizer's state warm, the window's
gradients alive, FP32 masters in place when the Accumulator will keep them). User hooks on modules
and the optimizer fire during probes like in any training step.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._checks import is_int
from .._dist import ranks_agree, spread, world_size
from ..accumulation import is_oom, resolve_master_grads, trained_params
from ..batch import batch_tensors
from ..memory import format_bytes
from . import budget as budget_phase
from . import cache as plan_cache
from .probe import (AMP_DTYPES, CudaMeter, EvalRig, ProbeResult, Rig, Snapshot, TrackedMeter, fits, measure,
                    optimizer_like, probe_cuda, probe_tracked)
from .result import Plan, PlanError, does_not_fit
from .search import height, search
from ..windows import Window, balanced_window

__all__ = ["Plan", "PlanError", "plan"]


@dataclass
class _Request:
    """What the check phase settled: the arguments as plan() will use them."""

    model: nn.Module
    target_bs: int
    sample: Callable[[int], Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: Optional[torch.optim.Optimizer]
    own_optimizer: bool
    amp: Optional[str]
    device: torch.device
    estimate: bool
    use_masters: bool
    world: int
    per_rank: int
    uneven: bool
    objective: str
    soak: int
    mode: str


# --------------------------------------------------------------------------- the phases
def plan(
    model: nn.Module,
    target_bs: int,
    sample: Callable[[int], Any] = None,  # type: ignore[assignment]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = None,  # type: ignore[assignment]
    optimizer: Optional[torch.optim.Optimizer] = None,
    amp: Optional[str] = None,
    device: Optional[str | torch.device] = None,
    memory_limit: Optional[int | str] = None,
    headroom: int | str | float = 0.05,
    *,
    master_grads: bool | str = "auto",
    uneven: bool = False,
    objective: str = "memory",
    soak: int = 0,
    cache: bool = True,
    refresh: bool = False,
    mode: str = "train",
) -> Plan:
    """Find the largest micro-batch that fits in steady training and the window that reaches ``target_bs``.

    ``sample(b)`` returns a batch of b samples, the worst case the data holds
    (the longest sequences: memory grows with them); ``loss_fn(model, batch)``
    its mean loss. ``optimizer`` defaults to AdamW (its state is the usual worst
    case). ``master_grads`` is the Accumulator's choice ("auto": FP32 masters
    for half-precision parameters), so the probes hold what training will.
    ``memory_limit`` is required on CPU and for ``device="meta"``; on CUDA it
    defaults to what is free. ``headroom`` is a fraction of the limit (a float
    in [0, 1)) or bytes (an int or "512MiB"), kept free for fragmentation.
    ``device="meta"`` plans on fake tensors without the device. ``objective=
    "throughput"`` picks the fastest fitting size among those probed. ``soak=N``
    trains N real micro-steps at the chosen size and steps down if they do not
    fit. ``mode="eval"`` plans evaluation instead: the largest forward-only batch
    (``loss_fn(model, batch)`` is then any evaluation, run in eval mode under
    ``inference_mode``; no gradients, no optimizer), so an eval batch never
    shrinks the training plan. Model, optimizer, gradients, module modes and RNG
    come back as they were, as the same tensor objects; module and optimizer
    hooks fire while probing.
    """
    t_start = time.perf_counter()
    model, compiled_note = _uncompiled(model)
    req = _check(model, target_bs, sample, loss_fn, optimizer, amp, device, master_grads, uneven, objective, soak,
                 mode)
    bud = budget_phase.measure(req.device, req.estimate, memory_limit, headroom)
    if compiled_note:
        bud.notes.append(compiled_note)
    snapshot = Snapshot(model, req.optimizer)
    try:
        session = _Session(req, bud, snapshot)
        shapes = session.warm_up()
        key = _cache_key(req, bud, shapes, master_grads=req.use_masters) if cache else None
        hit = None if key is None or refresh else plan_cache.load(key)
        if hit is not None:
            p = Plan.from_dict(hit)
            p.cached, p.probes, p.seconds = True, [], time.perf_counter() - t_start
            return p
        best, probes = session.search()
        window, best, throughput = session.window(best, probes)
        result = _report(req, bud, window, best, probes, throughput, session.notes)
        result.seconds = time.perf_counter() - t_start
        if key is not None:
            plan_cache.store(key, result.to_dict())
        return result
    finally:
        snapshot.restore()
        if req.own_optimizer and req.optimizer is not None:
            req.optimizer.state.clear()


def _uncompiled(model: Any) -> tuple[Any, Optional[str]]:
    """A ``torch.compile``d model is probed as its original module, and the plan says so: gaccum's CPU
    accounting runs under a dispatch mode, where Dynamo would fall back to eager anyway, and on a GPU every
    probed size would compile anew. Compiled code usually needs no more memory than eager, so the plan is
    on the safe side; ``soak=`` trains the compiled model itself at the chosen size."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner, ("torch.compile'd model: probed eager (its original module), no compile per probe; "
                       "compiled code usually needs no more memory, so the plan is on the safe side")
    return model, None


def _check(model, target_bs, sample, loss_fn, optimizer, amp, device, master_grads, uneven, objective,
           soak, mode) -> _Request:
    """Every argument checked before anything is touched."""
    if mode not in ("train", "eval"):
        raise ValueError(f"gaccum: mode must be 'train' or 'eval', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"gaccum: model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_int(target_bs):
        raise TypeError(f"gaccum: target_bs must be an int, got {target_bs!r}")
    if target_bs <= 0:
        raise ValueError(f"gaccum: target_bs must be > 0, got {target_bs}")
    if not callable(sample) or not callable(loss_fn):
        raise TypeError("gaccum: plan() needs sample=callable(b) -> batch and loss_fn=callable(model, batch) -> loss")
    if amp not in AMP_DTYPES:
        raise ValueError(f"gaccum: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if objective not in ("memory", "throughput"):
        raise ValueError(f"gaccum: objective must be 'memory' or 'throughput', got {objective!r}")
    if not is_int(soak) or soak < 0:
        raise ValueError(f"gaccum: soak must be a number of micro-steps >= 0, got {soak!r}")
    if mode == "train" and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("gaccum: the model has no trainable parameters")
    model_device = _model_device(model)
    estimate = device is not None and str(device) == "meta"
    if device is not None and not estimate and torch.device(device) != model_device and not (
        torch.device(device).type == model_device.type and torch.device(device).index is None
    ):
        raise ValueError(f"gaccum: device={device} but the model is on {model_device}; move the model first")
    own = optimizer is None
    use_masters = False
    if mode == "eval":
        optimizer = None  # evaluation holds no optimizer state and no gradients
    else:
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        _check_optimizer(optimizer)
        # the Accumulator's own rules: which parameters a window holds, and whether they get FP32 masters
        use_masters = resolve_master_grads(master_grads, trained_params(model.parameters(), optimizer))
    world = world_size()
    if target_bs % world:
        raise ValueError(f"gaccum: target_bs={target_bs} is global and must be divisible by the world size {world}")
    return _Request(model, target_bs, sample, loss_fn, optimizer, own, amp, model_device, estimate, use_masters,
                    world, target_bs // world, uneven, objective, soak, mode)


def _cache_key(req: _Request, bud: budget_phase.Budget, shapes: list, **extra: Any) -> str:
    return plan_cache.plan_key(req.model, req.optimizer, shapes=shapes, target_bs=req.target_bs, amp=req.amp,
                               device=bud.device_name, limit=bud.limit, headroom=bud.headroom, world=req.world,
                               uneven=req.uneven, objective=req.objective, soak=req.soak, mode=req.mode, **extra)


class _Session:
    """The probing phases over one Rig: warm up, search (every rank agreeing), window and soak."""

    def __init__(self, req: _Request, bud: budget_phase.Budget, snapshot: Snapshot) -> None:
        self.req, self.bud, self.snapshot = req, bud, snapshot
        self.notes = list(bud.notes)
        self.start = 1
        self.fake_mode: Any = None
        req.model.train(req.mode == "train")  # probes train (BatchNorm updates, dropout on), or evaluate
        model, opt = req.model, req.optimizer
        if req.estimate:
            self.fake_mode, model, opt = _fake_copies(req.model, req.optimizer)
        run_device = torch.device("cpu") if req.estimate else req.device
        with snapshot.trial(), self._ctx():  # the Rig's warm optimizer step moves the weights
            self.rig: Any = (EvalRig(model, req.amp, run_device) if req.mode == "eval"
                             else Rig(model, opt, req.amp, run_device, req.use_masters))

    def _ctx(self) -> Any:
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()

    @property
    def on_gpu(self) -> bool:
        return self.req.device.type == "cuda" and not self.req.estimate

    def warm_up(self) -> list:
        """Validate sample/loss (and warm what steady training keeps warm) at the smallest size; the batch's
        shapes key the cache. Out of memory even here is a PlanError with its advice, on every device."""
        req = self.req
        try:
            with self.snapshot.trial(), self._ctx():
                try:
                    example = self.rig.step(req.sample, req.loss_fn, 1)
                except ValueError as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise
                    self.start = 2  # BatchNorm cannot train on one sample: the search starts at 2
                    self.rig.settle()
                    example = self.rig.step(req.sample, req.loss_fn, 2)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is answered here
            if not is_oom(exc):
                raise
            self.rig.settle()
            raise PlanError(does_not_fit(ProbeResult(self.start, None, False, 0.0, True, None, None), self.start,
                                         self.bud.budget, self.bud.limit, self.bud.headroom, req.use_masters,
                                         req.model, self.bud.allowance)) from exc
        shapes = [(tuple(t.shape), str(t.dtype)) for t in batch_tensors(example)]
        del example
        return shapes

    def probe(self, b: int) -> ProbeResult:
        """One probe at b; under torch.distributed an OOM on any rank is an OOM for all."""
        req = self.req
        if self.on_gpu:
            r = probe_cuda(self.rig, req.sample, req.loss_fn, b, self.bud.budget, self.snapshot)
        else:
            r = probe_tracked(self.rig, req.sample, req.loss_fn, b, self.bud.budget,
                              None if req.estimate else self.snapshot, self.fake_mode)
        return _agree(r, req.device) if req.world > 1 else r

    def search(self) -> tuple[int, list[ProbeResult]]:
        req = self.req
        seed = None
        if self.on_gpu and req.mode == "train":
            with self.snapshot.trial():
                seed = _fake_seed(req.model, req.optimizer, req.sample, req.loss_fn, req.amp, req.use_masters,
                                  req.per_rank, self.bud.budget, self.start, self.notes)
        best, probes = search(self.probe, req.per_rank, self.bud.budget, seed=seed, start=self.start)
        if best == 0:
            raise PlanError(does_not_fit(probes[0], self.start, self.bud.budget, self.bud.limit, self.bud.headroom,
                                         req.use_masters, req.model, self.bud.allowance))
        return best, probes

    def window(self, best: int, probes: list[ProbeResult]) -> tuple[Window, int, dict[int, float]]:
        """The objective's size, the balanced window that reaches the target, and the soak."""
        req, chosen = self.req, best
        throughput: dict[int, float] = {}
        if req.objective == "throughput" and req.estimate:
            self.notes.append("objective='throughput' needs real steps; a fake-tensor estimate plans for memory")
        elif req.objective == "throughput":
            for r in probes:
                if r.fit and r.batch not in throughput:
                    throughput[r.batch] = _samples_per_second(self.rig, req.sample, req.loss_fn, r.batch,
                                                              self.snapshot)
            chosen = max(throughput, key=lambda b: (throughput[b], b))
        window = balanced_window(req.per_rank, chosen, uneven=req.uneven)
        if req.soak and not req.estimate:
            window, best = _soak(self.rig, req.sample, req.loss_fn, req.soak, window, req.per_rank, req.uneven,
                                 self.bud.budget, self.start, self.snapshot, self.notes, req.device)
        if window.largest < chosen:
            self.notes.append(f"balanced window: {len(window)} micro-batches of <= {window.largest} reach "
                              f"{req.per_rank} exactly")
        return window, best, throughput


def _report(req: _Request, bud: budget_phase.Budget, window: Window, best: int, probes: list[ProbeResult],
            throughput: dict[int, float], notes: list[str]) -> Plan:
    peak, interpolated = _peak_at(window.largest, probes)
    if req.estimate:
        notes.insert(0, "estimate from fake tensors: the CUDA context, cuBLAS/cuDNN workspaces and allocator "
                        f"segments are not seen; {format_bytes(bud.allowance)} of the limit is reserved for them")
    return Plan(
        micro_batch_size=window.largest, accum_steps=len(window), effective_batch_size=window.total * req.world,
        window=window, target_bs=req.target_bs, world_size=req.world, peak_memory=peak, memory_limit=bud.limit,
        headroom=bud.headroom, device=bud.device_name, amp=req.amp, probes=probes, max_micro_batch=best,
        estimate=req.estimate, allowance=bud.allowance, seconds=0.0, objective=req.objective, throughput=throughput,
        notes=notes, master_grads=req.use_masters, agreed_budget=bud.budget if req.world > 1 else None,
        peak_interpolated=interpolated, mode=req.mode,
    )


# --------------------------------------------------------------------------- helpers
def _agree(result: ProbeResult, device: torch.device) -> ProbeResult:
    """Under torch.distributed an OOM on any rank is an OOM for all, so ranks never diverge: every rank
    takes the largest peak and fits only where all fit (one all-reduce, _dist.spread)."""
    (_, bad), (_, peak) = spread([0.0 if result.fit else 1.0, result.peak if result.peak is not None else -1], device)
    return ProbeResult(result.batch, None if peak < 0 or result.peak is None else int(peak), bad == 0.0,
                       result.seconds, result.oom or bad > 0, result.activation_peak, result.static)


def _model_device(model: nn.Module) -> torch.device:
    devs = {p.device for p in model.parameters()}
    if len(devs) != 1:
        raise ValueError(f"gaccum: plan() needs the model on one device, found {sorted(map(str, devs))}")
    return devs.pop()


def _fake_copies(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with FakeCopyMode(mode):
        fmodel = copy.deepcopy(model)
    fmodel = fmodel.to("cpu") if next(fmodel.parameters()).device.type != "cpu" else fmodel
    if optimizer is None:
        return mode, fmodel, None
    fparams = list(fmodel.parameters())
    index = {id(p): i for i, p in enumerate(model.parameters())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [fparams[index[id(p)]] for p in g["params"]]}
              for g in optimizer.param_groups]
    return mode, fmodel, optimizer_like(optimizer, groups)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"gaccum: optimizer must be a torch.optim.Optimizer built on the model's parameters, got "
            f"{type(optimizer).__name__} {optimizer!r}; e.g. optimizer=torch.optim.AdamW(model.parameters()), "
            "or leave it out to plan for AdamW"
        )


def _peak_at(b: int, probes: list[ProbeResult]) -> tuple[Optional[int], bool]:
    """The peak at b: measured when b was probed, else on the line between the probes around it."""
    exact = [r.peak for r in probes if r.batch == b and r.fit and r.peak is not None]
    if exact:
        return max(exact), False
    fits = sorted((r.batch, r) for r in probes if r.fit and r.peak is not None)
    below = [r for x, r in fits if x < b]
    above = [r for x, r in fits if x > b]
    if not below or not above:
        return None, True
    r1, r2 = below[-1], above[0]
    h1, h2 = height(r1), height(r2)
    act = h1 + (h2 - h1) * (b - r1.batch) / (r2.batch - r1.batch)
    step = max((r.peak for _, r in fits if r.activation_peak is not None and r.peak > r.activation_peak), default=0)
    return int(max(act, step, r1.peak)), True


def _fake_seed(model, optimizer, sample, loss_fn, amp, masters, per_rank, budget, start, notes) -> Optional[int]:
    """A fake-tensor search to seed the real one on CUDA: real probes then confirm and bracket."""
    try:
        mode, fmodel, fopt = _fake_copies(model, optimizer)
        with mode:
            frig = Rig(fmodel, fopt, amp, torch.device("cpu"), masters)
        seed, _ = search(lambda b: probe_tracked(frig, sample, loss_fn, b, budget, None, mode), per_rank, budget,
                         start=start)
        return seed or None
    except Exception as exc:  # noqa: BLE001 - the estimate is an optimisation only
        notes.append(f"fake-tensor seed unavailable ({type(exc).__name__})")
        return None


def _samples_per_second(rig: Rig, sample, loss_fn, b: int, snapshot: Snapshot, reps: int = 2) -> float:
    """Training throughput at batch b; the restore between steps is not timed."""
    elapsed = 0.0
    for _ in range(reps):
        with snapshot.trial():
            t0 = time.perf_counter()
            rig.step(sample, loss_fn, b, check=False)
            if rig.device.type == "cuda":
                torch.cuda.synchronize(rig.device)
            elapsed += time.perf_counter() - t0
    return b * reps / elapsed if elapsed > 0 else 0.0


def _soak_fits(rig: Rig, sample, loss_fn, n: int, size: int, steps: int, budget: int, device: torch.device) -> bool:
    """``n`` micro-steps at ``size`` in windows of ``steps``, measured by the probe's own meter."""
    meter = CudaMeter(device) if device.type == "cuda" else TrackedMeter(rig, budget)

    def run() -> None:
        for left in range(n, 0, -steps):  # windows of micro-steps, the last one short
            rig.step(sample, loss_fn, size, check=False, micro=min(left, steps))

    return fits(measure(rig, meter, run)[0], budget)


def _soak(rig: Rig, sample, loss_fn, n: int, window: Window, per_rank: int, uneven: bool, budget: int,
          start: int, snapshot: Snapshot, notes: list[str], device: torch.device) -> tuple[Window, int]:
    """Train ``n`` micro-steps at the window's largest size; step down until they stay under the budget."""
    size = window.largest
    for _ in range(8):
        with snapshot.trial():
            ok = _soak_fits(rig, sample, loss_fn, n, size, len(window), budget, device)
        ok = ranks_agree(ok, device)
        if ok:
            notes.append(f"soak: {n} micro-steps at {size} stayed under the budget")
            return window, size
        new = min(size - 1, int(size * 0.95))
        if new < start:
            raise PlanError(f"gaccum: the soak at micro-batch {size} ran out of memory and nothing smaller is left")
        notes.append(f"soak: {n} micro-steps at {size} did not fit; stepped down to {new}")
        size = new
        window = balanced_window(per_rank, size, uneven=uneven)
        size = window.largest
    raise PlanError("gaccum: the soak kept running out of memory; plan with more headroom")
