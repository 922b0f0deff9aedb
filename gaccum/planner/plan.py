"""``gaccum.plan``: the largest micro-batch that fits in steady training, in few probes, leaving no trace.

Each probe is a micro-step as steady training runs it (probe.py: the optimizer's
state warm, the window's gradients alive, FP32 masters in place when the
Accumulator will keep them); the search (search.py) turns a few probes into the
largest size that fits, and proves it (b fits, b + 1 does not). The user's
model, optimizer, gradients, module modes and RNG are put back in place at the
end. User hooks on modules and the optimizer fire during probes like in any
training step.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import cache as plan_cache
from .._checks import is_int
from .._dist import all_reduce_scalars, world_size
from ..accounting import LiveBytes
from ..accumulation import is_oom
from ..batch import batch_tensors
from ..lr import scale_lr as _scale_lr
from ..memory import format_bytes, parse_bytes, parse_headroom
from .probe import AMP_DTYPES, ProbeResult, Rig, Snapshot, optimizer_like, probe_cuda, probe_tracked
from ..accumulation import resolve_master_grads, trained_params
from .search import balanced_window, height, search

# What a fake-tensor estimate cannot see on a real GPU: the CUDA context (outside
# torch's allocator, ~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, and the caching
# allocator's segment rounding. The estimate reserves this much of the limit.
ESTIMATE_ALLOWANCE_BYTES = 1 << 30
ESTIMATE_ALLOWANCE_FRACTION = 0.05


class PlanError(RuntimeError):
    """Even the smallest micro-batch does not fit; the message says what would help."""


@dataclass
class Plan:
    micro_batch_size: int
    accum_steps: int
    effective_batch_size: int
    window: list[int]
    target_bs: int
    world_size: int
    peak_memory: Optional[int]
    memory_limit: int
    headroom: int
    device: str
    amp: Optional[str]
    probes: list[ProbeResult] = field(default_factory=list)
    max_micro_batch: int = 0
    estimate: bool = False
    allowance: int = 0
    seconds: float = 0.0
    objective: str = "memory"
    throughput: dict[int, float] = field(default_factory=dict)
    cached: bool = False
    notes: list[str] = field(default_factory=list)
    master_grads: bool = False
    agreed_budget: Optional[int] = None  # under torch.distributed: the smallest rank's budget, which all used
    peak_interpolated: bool = False  # the chosen size was not probed itself: its peak lies between two probes

    @property
    def budget(self) -> int:
        if self.agreed_budget is not None:
            return self.agreed_budget
        return self.memory_limit - self.headroom - self.allowance

    def loader(self, dataset: Any, **kwargs: Any) -> Any:
        """A DataLoader whose micro-batches are this plan's window (52, 51, 51, 51, 51, ...), in turn.

        ``DataLoader(batch_size=plan.micro_batch_size)`` would feed only full
        micro-batches and overfill an uneven window. Keyword arguments go to
        the DataLoader (``shuffle``, ``sampler``, ``drop_last``, ``num_workers``, ...).
        """
        from ..window_data import window_loader

        return window_loader(dataset, self.window, **kwargs)

    def scale_lr(self, base_lr: float, base_bs: int, rule: str = "linear") -> float:
        """LR for this plan's effective batch, given one tuned at ``base_bs``."""
        return _scale_lr(base_lr, base_bs, self.effective_batch_size, rule)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budget": self.budget, "seconds": round(self.seconds, 4),
                "throughput": {str(k): v for k, v in self.throughput.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        rebuilt = {"probes", "throughput", "cached"}  # probes and int keys are rebuilt; a loaded plan says if cached
        plan = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in rebuilt})
        plan.probes = [ProbeResult(**p) for p in d.get("probes", [])]
        plan.throughput = {int(k): v for k, v in d.get("throughput", {}).items()}
        return plan

    def __str__(self) -> str:
        kind = "estimate (fake tensors, no device memory used)" if self.estimate else "measured"
        head = [
            ("micro-batch size", f"{self.micro_batch_size}" + (f" per rank x {self.world_size} ranks" if self.world_size > 1 else "")),
            ("accumulation steps", str(self.accum_steps)),
            ("effective batch", f"{self.effective_batch_size} (target {self.target_bs})"),
            ("window", " + ".join(map(str, self.window)) if len(set(self.window)) > 1 else f"{self.accum_steps} x {self.window[0]}"),
            ("largest that fits", str(self.max_micro_batch)),
            (f"peak at {self.micro_batch_size}", format_bytes(self.peak_memory)
             + (" (between two probes)" if self.peak_interpolated else "")),
            ("memory limit", format_bytes(self.memory_limit)),
            ("headroom", format_bytes(self.headroom)),
        ]
        if self.allowance:
            head.append(("allowance (unseen)", format_bytes(self.allowance)))
        head.append(("budget", format_bytes(self.budget)
                     + (" (the smallest rank's, used by all)" if self.world_size > 1 else "")))
        head += [("device", f"{self.device}" + (f", amp={self.amp}" if self.amp else "")
                  + (", FP32 master gradients" if self.master_grads else "")),
                 ("plan", kind + (" (from cache, 0 probes)" if self.cached else "")),
                 ("probes", f"{len(self.probes)} in {self.seconds:.2f} s")]
        width = max(len(k) for k, _ in head)
        lines = ["gaccum plan", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in head]
        if self.probes:
            lines += ["", f"{'probe':>6} {'batch':>8} {'peak':>12} {'fits':>5} {'seconds':>8}"]
            for i, p in enumerate(self.probes, 1):
                lines.append(f"{i:>6} {p.batch:>8} {format_bytes(p.peak):>12} {'yes' if p.fit else 'no':>5} {p.seconds:>8.3f}")
        if self.throughput:
            lines += ["", "throughput (samples/s): " + ", ".join(f"{b}: {v:.1f}" for b, v in sorted(self.throughput.items()))]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- plan()
def _agree(result: ProbeResult, device: torch.device) -> ProbeResult:
    """Under torch.distributed an OOM on any rank is an OOM for all, so ranks never diverge."""
    bad, peak = all_reduce_scalars([0.0 if result.fit else 1.0, result.peak if result.peak is not None else -1],
                                   device, op=dist.ReduceOp.MAX)
    return ProbeResult(result.batch, None if peak < 0 or result.peak is None else int(peak), bad == 0.0,
                       result.seconds, result.oom or bad > 0, result.activation_peak, result.static)


def _model_device(model: nn.Module) -> torch.device:
    devs = {p.device for p in model.parameters()}
    if len(devs) != 1:
        raise ValueError(f"gaccum: plan() needs the model on one device, found {sorted(map(str, devs))}")
    return devs.pop()


def _fake_copies(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with FakeCopyMode(mode):
        fmodel = copy.deepcopy(model)
    fmodel = fmodel.to("cpu") if next(fmodel.parameters()).device.type != "cpu" else fmodel
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


def _cuda_limit(device: torch.device, memory_limit: Any) -> tuple[int, int, Optional[str]]:
    """(limit, allowance for memory outside torch's allocator, note) on a GPU.

    Under torch.distributed the first collective allocates its buffers (NCCL's
    are outside torch's allocator), so one runs before anything is read.
    """
    if world_size() > 1:
        all_reduce_scalars([0.0], device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    outside = max(0, (total - free) - reserved)  # CUDA context, NCCL buffers, other processes
    note = None
    if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
        note = "expandable segments: reserved memory follows allocations closely, peaks are read as such"
    if memory_limit is None:
        return int(free + reserved), 0, note
    return parse_bytes(memory_limit), outside, note


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
    fit. Model, optimizer, gradients, module modes and RNG come back as they
    were, as the same tensor objects; module and optimizer hooks fire while
    probing.
    """
    t_start = time.perf_counter()
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
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("gaccum: the model has no trainable parameters")
    model_device = _model_device(model)
    estimate = device is not None and str(device) == "meta"
    if device is not None and not estimate and torch.device(device) != model_device and not (
        torch.device(device).type == model_device.type and torch.device(device).index is None
    ):
        raise ValueError(f"gaccum: device={device} but the model is on {model_device}; move the model first")
    own_optimizer = optimizer is None
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _check_optimizer(optimizer)
    # the Accumulator's own rules: which parameters a window holds, and whether they get FP32 masters
    use_masters = resolve_master_grads(master_grads, trained_params(model.parameters(), optimizer))
    world = world_size()
    if target_bs % world:
        raise ValueError(f"gaccum: target_bs={target_bs} is global and must be divisible by the world size {world}")
    per_rank = target_bs // world

    notes: list[str] = []
    allowance = 0
    if memory_limit is None and (estimate or model_device.type != "cuda"):
        raise ValueError("gaccum: memory_limit is required on CPU and for device='meta' (e.g. memory_limit='8GiB')")
    if model_device.type == "cuda" and not estimate:
        limit, allowance, note = _cuda_limit(model_device, memory_limit)
        if allowance:
            notes.append(f"{format_bytes(allowance)} of the device is used outside torch's allocator "
                         "(CUDA context, NCCL, other processes) and is kept out of the budget")
        if note:
            notes.append(note)
    else:
        limit = parse_bytes(memory_limit)  # type: ignore[arg-type]
    head = parse_headroom(headroom, limit)
    if head >= limit:
        raise ValueError(f"gaccum: headroom {format_bytes(head)} leaves nothing of the {format_bytes(limit)} limit")
    if estimate:
        allowance = int(ESTIMATE_ALLOWANCE_BYTES + ESTIMATE_ALLOWANCE_FRACTION * limit)
        if allowance >= limit - head:
            allowance = int(ESTIMATE_ALLOWANCE_FRACTION * limit)
    budget = limit - head - allowance
    if budget <= 0:
        raise ValueError(
            f"gaccum: nothing of the {format_bytes(limit)} limit is left after {format_bytes(head)} headroom and "
            f"{format_bytes(allowance)} used outside torch's allocator (or reserved for an estimate); raise memory_limit"
        )
    if world > 1:
        # Every rank searches with the smallest budget, so their decisions never diverge.
        budget = int(all_reduce_scalars([budget], model_device, op=dist.ReduceOp.MIN)[0])
    device_name = "meta (estimate)" if estimate else (
        torch.cuda.get_device_name(model_device) if model_device.type == "cuda" else "cpu")

    snapshot = Snapshot(model, optimizer)
    rig: Optional[Rig] = None
    start = 1
    try:
        model.train()  # probes train (BatchNorm updates, dropout on)
        fake_mode: Any = None
        if estimate:
            fake_mode, fmodel, fopt = _fake_copies(model, optimizer)
        ctx = (lambda: fake_mode) if estimate else contextlib.nullcontext
        run_device = torch.device("cpu") if estimate else model_device
        with ctx():
            rig = Rig(fmodel if estimate else model, fopt if estimate else optimizer, amp, run_device, use_masters)
        snapshot.restore_weights()

        # Validate sample/loss (and warm what steady training keeps warm) at the smallest size.
        with ctx():
            try:
                example = rig.step(sample, loss_fn, 1)
            except ValueError as exc:
                if "more than 1 value per channel" not in str(exc):
                    raise
                start = 2  # BatchNorm cannot train on one sample: the search starts at 2
                rig.settle()
                example = rig.step(sample, loss_fn, 2)
        shapes = [(tuple(t.shape), str(t.dtype)) for t in batch_tensors(example)]
        del example
        snapshot.restore_weights()
        key = None
        if cache:
            key = plan_cache.plan_key(model, optimizer, shapes=shapes, target_bs=target_bs, amp=amp,
                                      device=device_name, limit=limit, headroom=head, world=world, uneven=uneven,
                                      objective=objective, master_grads=use_masters, soak=soak)
            hit = None if refresh else plan_cache.load(key)
            if hit is not None:
                p = Plan.from_dict(hit)
                p.cached, p.probes, p.seconds = True, [], time.perf_counter() - t_start
                return p

        def raw_probe(b: int) -> ProbeResult:
            assert rig is not None
            if model_device.type == "cuda" and not estimate:
                return probe_cuda(rig, sample, loss_fn, b, budget, snapshot)
            return probe_tracked(rig, sample, loss_fn, b, budget, None if estimate else snapshot, fake_mode)

        def agreed_probe(b: int) -> ProbeResult:
            r = raw_probe(b)
            return _agree(r, model_device) if world > 1 else r

        seed = None
        if model_device.type == "cuda" and not estimate:
            seed = _fake_seed(model, optimizer, sample, loss_fn, amp, use_masters, per_rank, budget, start, notes)
            snapshot.restore_weights()
        best, probes = search(agreed_probe, per_rank, budget, seed=seed, start=start)
        if best == 0:
            raise PlanError(_does_not_fit(probes[0], start, budget, limit, head, use_masters))
        chosen = best
        throughput: dict[int, float] = {}
        if objective == "throughput" and estimate:
            notes.append("objective='throughput' needs real steps; a fake-tensor estimate plans for memory")
        elif objective == "throughput":
            for r in probes:
                if r.fit and r.batch not in throughput:
                    throughput[r.batch] = _samples_per_second(rig, sample, loss_fn, r.batch, snapshot)
            chosen = max(throughput, key=lambda b: (throughput[b], b))
        window = balanced_window(per_rank, chosen, uneven=uneven)
        if soak and not estimate:
            window, best = _soak(rig, sample, loss_fn, soak, window, per_rank, uneven, budget, start, snapshot,
                                 notes, world, model_device)
        peak, interpolated = _peak_at(max(window), probes)
        result = Plan(
            micro_batch_size=max(window), accum_steps=len(window), effective_batch_size=sum(window) * world,
            window=window, target_bs=target_bs, world_size=world, peak_memory=peak, memory_limit=limit,
            headroom=head, device=device_name, amp=amp, probes=probes, max_micro_batch=best, estimate=estimate,
            allowance=allowance, seconds=0.0, objective=objective, throughput=throughput, notes=notes,
            master_grads=use_masters, agreed_budget=budget if world > 1 else None, peak_interpolated=interpolated,
        )
        if estimate:
            result.notes.append(
                "estimate from fake tensors: the CUDA context, cuBLAS/cuDNN workspaces and allocator segments are "
                f"not seen; {format_bytes(allowance)} of the limit is reserved for them"
            )
        if max(window) < chosen:
            result.notes.append(f"balanced window: {len(window)} micro-batches of <= {max(window)} reach {per_rank} exactly")
        result.seconds = time.perf_counter() - t_start
        if cache and key is not None:
            plan_cache.store(key, result.to_dict())
        return result
    finally:
        rig = None
        snapshot.restore()
        if own_optimizer:
            optimizer.state.clear()


def _does_not_fit(first: ProbeResult, start: int, budget: int, limit: int, head: int, masters: bool) -> str:
    seen = (f"peak {format_bytes(first.peak)}" if first.peak is not None
            else "the step was stopped well over the budget")
    floor = (f"; weights, gradients, optimizer state{' and FP32 masters' if masters else ''} alone take "
             f"{format_bytes(first.static)}" if first.static is not None else "")
    return (
        f"gaccum: even a micro-batch of {start} does not fit in steady training: {seen} at b={start} against a "
        f"budget of {format_bytes(budget)} ({format_bytes(limit)} limit - {format_bytes(head)} headroom){floor}. "
        "What would help: activation checkpointing (torch.utils.checkpoint), bf16 (amp='bf16' or "
        "model.to(torch.bfloat16)), a lighter optimizer (SGD keeps less state than Adam), freezing part of the "
        "model, or a smaller model"
    )


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
        t0 = time.perf_counter()
        rig.step(sample, loss_fn, b, check=False)
        if rig.device.type == "cuda":
            torch.cuda.synchronize(rig.device)
        elapsed += time.perf_counter() - t0
        snapshot.restore_weights()
    return b * reps / elapsed if elapsed > 0 else 0.0


def _soak(rig: Rig, sample, loss_fn, n: int, window: list[int], per_rank: int, uneven: bool, budget: int,
          start: int, snapshot: Snapshot, notes: list[str], world: int,
          device: torch.device) -> tuple[list[int], int]:
    """Train ``n`` micro-steps at the window's largest size; step down until they stay under the budget."""
    size = max(window)
    for _ in range(8):
        ok = True
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # on CPU the accounting raises over the budget; on CUDA the allocator's peak is read after
            on_cpu = device.type != "cuda"
            with LiveBytes(budget).track(rig.model, *rig.tracked()) if on_cpu else contextlib.nullcontext():
                for left in range(n, 0, -len(window)):  # windows of micro-steps, the last one short
                    rig.step(sample, loss_fn, size, check=False, micro=min(left, len(window)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                ok = max(torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)) <= budget
        except Exception as exc:  # noqa: BLE001 - OOM means "step down"; anything else is the user's
            if not is_oom(exc):
                raise
            ok = False
            rig.settle()
        snapshot.restore_weights()
        if world > 1:
            ok = all_reduce_scalars([0.0 if ok else 1.0], device, op=dist.ReduceOp.MAX)[0] == 0.0
        if ok:
            notes.append(f"soak: {n} micro-steps at {size} stayed under the budget")
            return window, size
        new = min(size - 1, int(size * 0.95))
        if new < start:
            raise PlanError(f"gaccum: the soak at micro-batch {size} ran out of memory and nothing smaller is left")
        notes.append(f"soak: {n} micro-steps at {size} did not fit; stepped down to {new}")
        size = new
        window = balanced_window(per_rank, size, uneven=uneven)
        size = max(window)
    raise PlanError("gaccum: the soak kept running out of memory; plan with more headroom")
