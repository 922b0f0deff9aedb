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
