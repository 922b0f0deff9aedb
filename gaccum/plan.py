"""``gaccum.plan``: the largest micro-batch that fits, in few probes, leaving no trace.

The search uses what probes measure. Peak memory is piecewise linear in the
batch b: flat below a knee (the optimizer step dominates), then growing by a
fixed amount per sample. Two measured points above the knee give the line, and
the line gives the largest b under the budget in one jump; the answer is then
confirmed by probing it (it fits) and b + 1 (it does not). Where a line is not
available yet (one point, or an OOM that measured nothing) the bracket is split
geometrically. Every size returned was itself probed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ._checks import is_int
from ._dist import all_reduce_scalars, world_size
from .batch import batch_tensors
from .lr import scale_lr as _scale_lr
from .memory import format_bytes, parse_bytes
from .probe import AMP_DTYPES, ProbeResult, Snapshot, probe_cuda, probe_tracked, train_step

# What a fake-tensor estimate cannot see on a real GPU: the CUDA context (outside
# torch's allocator, ~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, and the caching
# allocator's segment rounding. The estimate reserves this much of the limit.
ESTIMATE_ALLOWANCE_BYTES = 1 << 30
ESTIMATE_ALLOWANCE_FRACTION = 0.05


class PlanError(RuntimeError):
    """Even a micro-batch of 1 does not fit; the message says what would help."""


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

    @property
    def budget(self) -> int:
        return self.memory_limit - self.headroom - self.allowance

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
            ("peak memory", format_bytes(self.peak_memory)),
            ("memory limit", format_bytes(self.memory_limit)),
            ("headroom", format_bytes(self.headroom)),
        ]
        if self.allowance:
            head.append(("allowance (unseen)", format_bytes(self.allowance)))
        head += [("device", f"{self.device}" + (f", amp={self.amp}" if self.amp else "")),
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


# --------------------------------------------------------------------------- search
def _line_estimate(points: list[tuple[int, int]], budget: int) -> Optional[int]:
    """Largest b under budget on the line through the two largest-b measured points."""
    if len(points) < 2:
        return None
    (b1, p1), (b2, p2) = sorted(points)[-2:]
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return None
    return int(math.floor(b2 + (budget - p2) / slope + 1e-9))


def search(probe: Callable[[int], ProbeResult], cap: int, budget: int, seed: Optional[int] = None,
           start: int = 1) -> tuple[int, list[ProbeResult]]:
    """Largest b in [1, cap] with ``probe(b).fit``, assuming fit is monotone in b.

    ``probe`` is the only oracle; ``seed`` (e.g. a fake-tensor estimate) is tried
    right after b = 1. Returns (b, probes in order).
    """
    results: dict[int, ProbeResult] = {}
    order: list[ProbeResult] = []

    def run(b: int) -> ProbeResult:
        r = probe(b)
        results[b] = r
        order.append(r)
        return r

    first = run(start)
    if not first.fit:
        return 0, order
    lo, hi = start, cap + 1  # lo fits; hi does not (cap + 1 is a sentinel never probed)
    second = min(cap, max(2, seed)) if seed else cap
    if cap > start:
        r = run(second)
        if r.fit:
            lo = second
        else:
            hi = second
        if seed and second != cap:
            # A seed is a claim that `second` is the answer: its neighbour confirms it.
            nb = second + 1 if r.fit else second - 1
            if 1 < nb < cap + 1 and nb not in results:
                rn = run(nb)
                if rn.fit:
                    lo = max(lo, nb)
                else:
                    hi = min(hi, nb)
    last_points: Optional[tuple] = None
    flat = first.peak if first.peak is not None else -1
    lower_bound_went_flat = False
    slow_streak = 0  # estimates that shrank the bracket by less than half, in a row
    while hi - lo > 1:
        if lo == cap:
            break
        # Only points above the knee lie on the line: a failing probe's peak is above
        # the budget (so above the flat level), a fitting one is if it beats b = 1's.
        above = sorted((b, r.peak) for b, r in results.items() if r.peak is not None and (not r.fit or r.peak > flat))
        key = tuple(above[-2:])
        est = None
        if len(above) >= 2 and key != last_points:
            est = _line_estimate(above, budget)
            last_points = key
        elif len(above) == 1 and not lower_bound_went_flat and results[lo].peak is not None and above[0][0] != lo:
            # One point on the line and one on the flat part: their chord is shallower
            # than the line, so it gives a lower bound on the answer. Try it once.
            est = _line_estimate([(lo, results[lo].peak), above[0]], budget)
        if est is not None and slow_streak >= 2 and hi <= cap and est > lo + 1:  # never skip a confirmation
            est = (lo + hi) // 2  # real peaks bend near the knee: a bisection step guarantees progress
            slow_streak = 0
        if est is None:
            b = max(lo + 1, min(hi - 1, int(math.isqrt(lo * hi)) if hi <= cap else min(cap, lo * 4)))
        else:
            b = max(lo + 1, min(hi - 1, est))
        width = hi - lo
        r = run(b)
        lower_bound_went_flat = r.fit and r.peak is not None and r.peak <= flat and len(above) == 1
        if r.fit:
            lo = b
        else:
            hi = b
        slow_streak = slow_streak + 1 if (est is not None and (hi - lo) > width / 2) else 0
    return lo, order


def balanced_window(per_rank_target: int, max_micro: int, uneven: bool = False) -> list[int]:
    """Micro-batch sizes of one window that reach the target exactly."""
    steps = -(-per_rank_target // max_micro)
    if uneven:
        return [max_micro] * (steps - 1) + [per_rank_target - max_micro * (steps - 1)]
    base, extra = divmod(per_rank_target, steps)
    return [base + 1] * extra + [base] * (steps - extra)


# --------------------------------------------------------------------------- plan()
def _agree(result: ProbeResult, device: torch.device) -> ProbeResult:
    """Under torch.distributed an OOM on any rank is an OOM for all, so ranks never diverge."""
    bad, peak = all_reduce_scalars([0.0 if result.fit else 1.0, result.peak if result.peak is not None else -1],
                                   device, op=dist.ReduceOp.MAX)
    return ProbeResult(result.batch, None if peak < 0 or result.peak is None else int(peak), bad == 0.0,
                       result.seconds, result.oom or bad > 0)


def _model_device(model: nn.Module) -> torch.device:
    devs = {p.device for p in model.parameters()}
    if len(devs) != 1:
        raise ValueError(f"gaccum: plan() needs the model on one device, found {sorted(map(str, devs))}")
    return devs.pop()


def _cache_path() -> Path:
    from ._ext import cache_dir

    return cache_dir() / "plans.json"


def _cache_key(model, optimizer, shapes, target_bs, amp, device_name, limit, headroom, world, uneven, objective) -> str:
    params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()]
    blob = json.dumps([repr(model), params, shapes, type(optimizer).__name__,
                       {k: repr(v) for k, v in optimizer.defaults.items()}, target_bs, amp, device_name, limit,
                       headroom, world, uneven, objective, torch.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_load(key: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(_cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def _cache_store(key: str, plan: Plan) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = plan.to_dict()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # a cache that cannot be written only costs probes next time


def _fake_copies(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with FakeCopyMode(mode):
        fmodel = copy.deepcopy(model)
    fmodel = fmodel.to("cpu") if next(fmodel.parameters()).device.type != "cpu" else fmodel
    fparams = list(fmodel.parameters())
    index = {id(p): i for i, p in enumerate(model.parameters())}
    groups = []
    for g in optimizer.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [fparams[index[id(p)]] for p in g["params"]]})
    try:  # the groups carry every hyper-parameter; some optimizers insist on lr too
        fopt = type(optimizer)(groups)
    except TypeError:
        fopt = type(optimizer)(groups, lr=optimizer.param_groups[0]["lr"])
    return mode, fmodel, fopt


def _samples_per_second(model, optimizer, sample, loss_fn, b, amp, device, snapshot: Snapshot, reps: int = 2) -> float:
    """Training throughput at batch b; the restore between steps is not timed."""
    elapsed = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        train_step(model, optimizer, sample, loss_fn, b, amp, device, check=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        snapshot.restore_weights()
    return b * reps / elapsed if elapsed > 0 else 0.0


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
    uneven: bool = False,
    objective: str = "memory",
    cache: bool = True,
    refresh: bool = False,
) -> Plan:
    """Find the largest micro-batch that fits and the window that reaches ``target_bs``.

    ``sample(b)`` returns a batch of b samples; ``loss_fn(model, batch)`` its
    mean loss. ``optimizer`` defaults to AdamW (its state is the usual worst
    case). ``memory_limit`` is required on CPU and for ``device="meta"``; on
    CUDA it defaults to the free memory. ``headroom`` (bytes, a size string, or
    a fraction of the limit) is kept free for allocator fragmentation.
    ``device="meta"`` plans without the device, on fake tensors. ``objective=
    "throughput"`` picks the fastest fitting size among those probed. Model,
    optimizer, gradients, RNG and ``model.training`` are restored bitwise.
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
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    world = world_size()
    if target_bs % world:
        raise ValueError(f"gaccum: target_bs={target_bs} is global and must be divisible by the world size {world}")
    per_rank = target_bs // world

    if memory_limit is None:
        if estimate or model_device.type != "cuda":
            raise ValueError(
                "gaccum: memory_limit is required on CPU and for device='meta' (e.g. memory_limit='8GiB')"
            )
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(model_device)
        limit = int(free + torch.cuda.memory_allocated(model_device))
    else:
        limit = parse_bytes(memory_limit)
    if isinstance(headroom, float) and not isinstance(headroom, bool) and 0 <= headroom < 1:
        head = int(limit * headroom)
    else:
        head = 0 if headroom == 0 else parse_bytes(headroom)
    if head >= limit:
        raise ValueError(f"gaccum: headroom {format_bytes(head)} leaves nothing of the {format_bytes(limit)} limit")
    allowance = int(ESTIMATE_ALLOWANCE_BYTES + ESTIMATE_ALLOWANCE_FRACTION * limit) if estimate else 0
    if estimate and allowance >= limit - head:
        allowance = int(ESTIMATE_ALLOWANCE_FRACTION * limit)
    budget = limit - head - allowance
    if world > 1:
        # Every rank searches with the smallest budget, so their decisions never diverge.
        budget = int(all_reduce_scalars([budget], model_device, op=dist.ReduceOp.MIN)[0])
    device_name = "meta (estimate)" if estimate else (
        torch.cuda.get_device_name(model_device) if model_device.type == "cuda" else "cpu")

    snapshot = Snapshot(model, optimizer)
    try:
        # Validate sample/loss at b=1 before anything is measured; restores on error.
        model.train()  # probes train, so validate in train mode (BatchNorm cannot train on one sample)
        start = 1
        try:
            example = train_step(model, optimizer, sample, loss_fn, 1, amp, model_device)
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            start = 2  # BatchNorm cannot train on one sample: the search starts at 2
            snapshot.restore()
            example = train_step(model, optimizer, sample, loss_fn, 2, amp, model_device)
        shapes = [(tuple(t.shape), str(t.dtype)) for t in batch_tensors(example)]
        del example
        snapshot.restore()
        key = None
        if cache:
            key = _cache_key(model, optimizer, shapes, target_bs, amp, device_name, limit, head, world, uneven, objective)
            hit = None if refresh else _cache_load(key)
            if hit is not None:
                p = Plan.from_dict(hit)
                p.cached, p.probes, p.seconds = True, [], time.perf_counter() - t_start
                return p
        model.train()
        if estimate:
            fake_mode, fmodel, fopt = _fake_copies(model, optimizer)

            def raw_probe(b: int) -> ProbeResult:
                return probe_tracked(fmodel, fopt, sample, loss_fn, b, amp, torch.device("cpu"), budget, snapshot,
                                     fake_mode=fake_mode)
        elif model_device.type == "cuda":
            def raw_probe(b: int) -> ProbeResult:
                return probe_cuda(model, optimizer, sample, loss_fn, b, amp, model_device, budget, snapshot)
        else:
            def raw_probe(b: int) -> ProbeResult:
                return probe_tracked(model, optimizer, sample, loss_fn, b, amp, model_device, budget, snapshot)

        def agreed_probe(b: int) -> ProbeResult:
            r = raw_probe(b)
            return _agree(r, model_device) if world > 1 else r

        seed = None
        notes: list[str] = []
        if model_device.type == "cuda" and not estimate:
            # Seed the real search with a fake-tensor estimate: real probes then confirm and bracket.
            try:
                fake_mode, fmodel, fopt = _fake_copies(model, optimizer)
                seed, _ = search(lambda b: probe_tracked(fmodel, fopt, sample, loss_fn, b, amp, torch.device("cpu"),
                                                         budget, snapshot, fake_mode=fake_mode), per_rank, budget,
                               start=start)
                seed = seed or None
            except Exception as exc:  # noqa: BLE001 - the estimate is an optimisation only
                notes.append(f"fake-tensor seed unavailable ({type(exc).__name__})")
            snapshot.restore()
        best, probes = search(agreed_probe, per_rank, budget, seed=seed, start=start)
        if best == 0:
            peak1 = probes[0].peak
            raise PlanError(
                f"gaccum: even a micro-batch of {start} does not fit: peak {format_bytes(peak1)} at b={start} against a budget of "
                f"{format_bytes(budget)} ({format_bytes(limit)} limit - {format_bytes(head)} headroom). "
                "What would help: activation checkpointing (torch.utils.checkpoint), bf16 (amp='bf16' or "
                "model.to(torch.bfloat16)), a lighter optimizer (SGD keeps less state than Adam), or a smaller model"
            )
        chosen = best
        throughput: dict[int, float] = {}
        if objective == "throughput" and estimate:
            notes.append("objective='throughput' needs real steps; a fake-tensor estimate plans for memory")
        elif objective == "throughput":
            for r in probes:
                if r.fit and r.batch not in throughput:
                    throughput[r.batch] = _samples_per_second(model, optimizer, sample, loss_fn, r.batch, amp,
                                                              model_device, snapshot)
            chosen = max(throughput, key=lambda b: (throughput[b], b))
        window = balanced_window(per_rank, chosen, uneven=uneven)
        peak = max((r.peak for r in probes if r.batch == chosen and r.peak is not None), default=None)
        result = Plan(
            micro_batch_size=max(window), accum_steps=len(window), effective_batch_size=sum(window) * world,
            window=window, target_bs=target_bs, world_size=world, peak_memory=peak, memory_limit=limit,
            headroom=head, device=device_name, amp=amp, probes=probes, max_micro_batch=best, estimate=estimate,
            allowance=allowance, seconds=0.0, objective=objective, throughput=throughput, notes=notes,
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
            _cache_store(key, result)
        return result
    finally:
        snapshot.restore()
        if own_optimizer:
            optimizer.state.clear()
