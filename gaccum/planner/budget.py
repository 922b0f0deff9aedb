"""How much memory a plan may use: the limit, the headroom, what is used outside torch's allocator (or
kept back for a fake-tensor estimate), and under torch.distributed the smallest rank's budget for all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from .._dist import all_reduce_scalars, world_size
from ..memory import format_bytes, parse_bytes, parse_headroom

# What a fake-tensor estimate cannot see on a real GPU: the CUDA context (outside
# torch's allocator, ~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, and the caching
# allocator's segment rounding. The estimate reserves this much of the limit.
ESTIMATE_ALLOWANCE_BYTES = 1 << 30
ESTIMATE_ALLOWANCE_FRACTION = 0.05


@dataclass
class Budget:
    limit: int
    headroom: int
    allowance: int
    budget: int  # what probes must stay under: limit - headroom - allowance (the smallest rank's, agreed)
    device_name: str
    notes: list[str] = field(default_factory=list)


def measure(device: torch.device, estimate: bool, memory_limit: Any, headroom: Any) -> Budget:
    """The budget phase of plan(): every rank calls it (it agrees on the smallest budget)."""
    notes: list[str] = []
    allowance = 0
    if memory_limit is None and (estimate or device.type != "cuda"):
        raise ValueError("gaccum: memory_limit is required on CPU and for device='meta' (e.g. memory_limit='8GiB')")
    if device.type == "cuda" and not estimate:
        limit, allowance, note = cuda_limit(device, memory_limit)
        if allowance:
            notes.append(f"{format_bytes(allowance)} of the device is used outside torch's allocator "
                         "(CUDA context, NCCL, other processes) and is kept out of the budget")
        if note:
            notes.append(note)
    else:
        limit = parse_bytes(memory_limit)
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
            f"{format_bytes(allowance)} used outside torch's allocator (or reserved for an estimate); raise memory_limit")
    if world_size() > 1:
        # Every rank searches with the smallest budget, so their decisions never diverge.
        budget = int(all_reduce_scalars([budget], device, op=dist.ReduceOp.MIN)[0])
    name = "meta (estimate)" if estimate else (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return Budget(limit, head, allowance, budget, name, notes)


def cuda_limit(device: torch.device, memory_limit: Any) -> tuple[int, int, Optional[str]]:
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
