"""What the Accumulator and the hook both show of their core: one list, installed on both classes."""

from __future__ import annotations

import operator
from typing import Any, Callable

from .state import WindowState

_READ = {
    "state": "Where the current window is: EMPTY, IN_MICRO_STEP, ACCUMULATING, AT_BOUNDARY or CLOSED",
    "accum_steps": "Micro-steps per window now (a schedule changes it between windows)",
    "optimizer": "The optimizer this front-end drives",
    "optimizer_steps": "Real optimizer steps taken",
    "skipped_steps": "Windows whose step was skipped for inf/NaN (GradScaler or gaccum's own check)",
    "discarded_windows": "Windows dropped because a backward or the boundary raised",
    "micro_steps": "Micro-steps counted, all windows",
    "micro_in_window": "Micro-steps in the current window",
    "oom_splits": "Out-of-memory splits micro_batch() made",
    "micro_batch_limit": "The largest micro-batch that ran after an out-of-memory split (None: never split)",
    "epoch": "The epoch given to set_epoch",
    "last_result": "The last boundary's StepResult (``discarded=True`` after a fault)",
    "last_window_peak": "The most bytes live in the last window's micro-steps under a CPU memory_limit",
    "master_grad_bytes": "Bytes of the FP32 master-gradient buffer (0 without masters)",
    "uses_master_grads": "Whether FP32 master gradients and weights are kept",
}


def add_callback(self: Any, fn: Callable[..., None]) -> None:
    """``fn(result, front_end)`` after every optimizer step (or skip). Any state but CLOSED."""
    self.core.window.require("add_callback", *[s for s in WindowState if s is not WindowState.CLOSED])
    self.core.callbacks.append(fn)


def set_epoch(self: Any, epoch: int) -> None:
    """EMPTY / ACCUMULATING. For a schedule by epoch: call at the start of each epoch (takes effect
    between windows)."""
    self.core.require_open("set_epoch")
    self.core.set_epoch(epoch)


def reads_core(cls: type) -> type:
    """Class decorator: the read-only state, ``add_callback`` and ``set_epoch``, read through ``self.core``."""
    for name, doc in _READ.items():
        setattr(cls, name, property(operator.attrgetter("core." + name), doc=doc))
    cls.add_callback = add_callback
    cls.set_epoch = set_epoch
    return cls
