"""What the adapters share: frameworks batch at one fixed size, so the window must be even."""

from __future__ import annotations

from typing import Any


def even_micro_batch(per_device: int, largest: int) -> int:
    """The micro-batch for a framework that batches at one size: the largest divisor of the per-device
    target that fits (the effective batch is then exactly the target), unless it wastes over half of
    what fits; then the largest that fits (a few samples more per step)."""
    best = max(d for d in range(1, min(per_device, largest) + 1) if per_device % d == 0)
    return best if best * 2 > largest or best == per_device else largest


def fixed_size_window(plan: Any, framework: str) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for a framework that batches at one size; when they overshoot
    the per-device target, the plan's notes say by how much."""
    per_device = plan.target_bs // plan.world_size
    micro = even_micro_batch(per_device, plan.max_micro_batch)
    steps = -(-per_device // micro)
    if micro * steps != per_device:
        plan.notes.append(f"{framework} batches at one size: {steps} x {micro} = {micro * steps} per device, "
                          f"{micro * steps - per_device} more than the target's {per_device}")
    return micro, steps
