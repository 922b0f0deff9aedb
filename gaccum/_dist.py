"""The few torch.distributed calls gaccum makes, in one place.

Scalars (item totals, budgets, probe verdicts) travel as float64 on the device
the backend can reduce: the model's GPU under NCCL, the CPU otherwise.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default group, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def all_reduce_scalars(values: Sequence[float], device: torch.device,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(device))
    dist.all_reduce(t, op=op)
    return t.tolist()


def ranks_agree(ok: bool, device: torch.device) -> bool:
    """The one "all ranks agree" rule: True on every rank only when every rank says True (a MAX all-reduce).

    Every rank must call it; with one process it returns ``ok``.
    """
    if world_size() == 1:
        return ok
    return all_reduce_scalars([0.0 if ok else 1.0], device, op=dist.ReduceOp.MAX)[0] == 0.0


def spread(values: Sequence[float], device: torch.device) -> list[tuple[float, float]]:
    """(min, max) of each value over the ranks, in one MAX all-reduce; every rank must call it."""
    if world_size() == 1:
        return [(float(v), float(v)) for v in values]
    out = all_reduce_scalars([*values, *(-float(v) for v in values)], device, op=dist.ReduceOp.MAX)
    n = len(values)
    return [(-out[n + i], out[i]) for i in range(n)]
