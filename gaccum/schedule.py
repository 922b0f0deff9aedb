"""Accumulation steps that change over training, with the LR following the effective batch.

Growing the batch during training (Smith et al. 2018, "Don't decay the learning
rate, increase the batch size") is done here by growing the accumulation window
rather than the micro-batch, so memory stays where the plan put it. A change
only ever takes effect at a window boundary: a window is never cut or stretched
once it has started, so every optimizer step still sees a whole effective batch.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Optional

from ._checks import is_int
from .lr import RULES

BY = ("step", "epoch")


class AccumulationSchedule:
    """``{0: 4, 1000: 8}``: 4 micro-batches per step from the start, 8 from key 1000 on.

    ``by="step"`` keys on real optimizer steps (the count the LR scheduler sees,
    skipped AMP steps excluded); ``by="epoch"`` keys on the epoch given to
    ``set_epoch`` (as Lightning's ``GradientAccumulationScheduler``).

    ``lr_rule`` ("linear", "sqrt" or None) rescales every param group's LR, and
    the LR scheduler's ``base_lrs``, by ``rule(new / old)`` when the window grows
    or shrinks, so the LR keeps the ratio to the effective batch it was tuned at.
    """

    def __init__(self, schedule: Mapping[int, int], by: str = "step", lr_rule: Optional[str] = "linear") -> None:
        if not isinstance(schedule, Mapping) or not schedule:
            raise TypeError(
                f"gaccum: an accumulation schedule is a non-empty dict {{key: accum_steps}}, e.g. {{0: 4, 1000: 8}}; "
                f"got {schedule!r}"
            )
        for k, v in schedule.items():
            if not is_int(k) or k < 0:
                raise ValueError(f"gaccum: schedule keys are {by}s (ints >= 0), got {k!r}")
            if not is_int(v) or v < 1:
                raise ValueError(f"gaccum: schedule values are accumulation steps (ints >= 1), got {k!r}: {v!r}")
        if 0 not in schedule:
            raise ValueError(
                f"gaccum: the schedule {dict(schedule)} does not say what to use from the start; add a 0 key, "
                f"e.g. {{0: {schedule[min(schedule)]}, ...}}"
            )
        if by not in BY:
            raise ValueError(f"gaccum: schedule by must be one of {BY}, got {by!r}")
        if lr_rule is not None and lr_rule not in RULES:
            raise ValueError(f"gaccum: lr_rule must be one of {RULES} or None, got {lr_rule!r}")
        self.schedule = dict(sorted(schedule.items()))
        self.by = by
        self.lr_rule = lr_rule
        self._keys = list(self.schedule)

    def at(self, key: int) -> int:
        """Accumulation steps in force at ``key`` (an optimizer step or an epoch)."""
        return self.schedule[self._keys[bisect.bisect_right(self._keys, key) - 1]]

    def lr_factor(self, old: int, new: int) -> float:
        """What the LR is multiplied by when the window goes from ``old`` to ``new`` micro-batches."""
        if self.lr_rule is None or old == new:
            return 1.0
        ratio = new / old
        return ratio if self.lr_rule == "linear" else math.sqrt(ratio)

    def __repr__(self) -> str:
        return f"AccumulationSchedule({self.schedule}, by={self.by!r}, lr_rule={self.lr_rule!r})"


def as_schedule(accum_steps: Any) -> Optional[AccumulationSchedule]:
    """A schedule from a dict or a schedule; None for a plain int."""
    if isinstance(accum_steps, AccumulationSchedule):
        return accum_steps
    if isinstance(accum_steps, Mapping):
        return AccumulationSchedule(accum_steps)
    return None


def rescale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the LR everywhere torch keeps it, so a scheduler does not undo the change.

    Chainable schedulers (StepLR, ExponentialLR, ...) read ``group["lr"]``;
    closed-form ones (LambdaLR, CosineAnnealingLR's closed form) read
    ``base_lrs``; ``initial_lr`` is what a resumed scheduler reads its base from.
    """
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                v = group[key]
                if hasattr(v, "mul_"):
                    v.mul_(factor)
                else:
                    group[key] = v * factor
    if scheduler is not None:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
