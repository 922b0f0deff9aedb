"""Learning-rate scaling with the effective batch, and scheduler sizing."""

from __future__ import annotations

import math

from ._checks import is_int

RULES = ("linear", "sqrt")


def scale_lr(base_lr: float, base_bs: int, effective_bs: int, rule: str = "linear") -> float:
    """LR for ``effective_bs`` given one tuned at ``base_bs``.

    ``linear`` (Goyal et al. 2017) suits SGD; ``sqrt`` (Hoffer et al. 2017,
    Malladi et al. 2022) suits Adam-type optimizers.
    """
    if not isinstance(base_lr, (int, float)) or isinstance(base_lr, bool) or not 0 < base_lr < math.inf:
        raise ValueError(f"gaccum: base_lr must be a positive, finite number, got {base_lr!r}")
    for name, v in (("base_bs", base_bs), ("effective_bs", effective_bs)):
        if not is_int(v) or v < 1:
            raise ValueError(f"gaccum: {name} must be an int >= 1, got {v!r}")
    if rule not in RULES:
        raise ValueError(f"gaccum: rule must be one of {RULES}, got {rule!r}")
    ratio = effective_bs / base_bs
    return float(base_lr * (ratio if rule == "linear" else math.sqrt(ratio)))


def num_optimizer_steps(num_micro_batches: int, accum_steps: int, drop_last: bool = False) -> int:
    """Optimizer steps that ``num_micro_batches`` give: ceil (a partial last window steps too)."""
    for name, v in (("num_micro_batches", num_micro_batches), ("accum_steps", accum_steps)):
        if not is_int(v):
            raise TypeError(f"gaccum: {name} must be an int, got {v!r}")
    if num_micro_batches < 0 or accum_steps < 1:
        raise ValueError("gaccum: num_micro_batches must be >= 0 and accum_steps >= 1")
    return num_micro_batches // accum_steps if drop_last else -(-num_micro_batches // accum_steps)
