"""A drop-in for a training loop the user will not change.

``gaccum.hook(optimizer, accum_steps=N)`` makes the usual
``loss.backward(); optimizer.step(); optimizer.zero_grad()`` on every
micro-batch accumulate correctly: gradients are summed across calls, the real
step runs every N-th call with the sum divided by N, and ``zero_grad`` no longer
destroys the window. With ``scaler=`` the GradScaler calls in the loop are
routed the same way (unscale and update once per window); with ``scheduler=``
its ``step()`` only advances after a real optimizer step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .accumulate import StepResult, _Engine
from .schedule import AccumulationSchedule


class AccumulationHook:
    """Returned by :func:`hook`; ``remove()`` gives the optimizer back untouched."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accum_steps: int | dict[int, int] | AccumulationSchedule,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
        scheduler: Any = None,
        max_grad_norm: Optional[float] = None,
        master_grads: bool | str = "auto",
    ) -> None:
        if getattr(optimizer, "_gaccum_hook", None) is not None:
            raise RuntimeError("gaccum: this optimizer already has a gaccum hook; call .remove() on it first")
        params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
        self.engine = _Engine(params, optimizer, accum_steps, scaler=scaler, max_grad_norm=max_grad_norm,
                              master_grads=master_grads)
        # Raw gradients are summed; the boundary correction W*R/T with R = 1 is 1/k.
        self.engine.ref_total = 1.0
        self.engine.fixed_ref = True
        self.engine.lr_scheduler = scheduler
        self.optimizer = optimizer
        self.scaler = scaler if (scaler is not None and scaler.is_enabled()) else None
        self.scheduler = scheduler
        self._stepping = False
        self._scheduler_pending = 0
        self._orig: list[tuple[Any, str, Any]] = []
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._optimizer_step(*args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # LR schedulers check for it
        self._patch(optimizer, "step", step)
        self._patch(optimizer, "zero_grad", self._zero_grad)
        if self.scaler is not None:
            self._patch(self.scaler, "step", self._scaler_step)
            self._patch(self.scaler, "update", self._scaler_update)
            self._patch(self.scaler, "unscale_", self._scaler_unscale)
        if scheduler is not None:
            self._patch(scheduler, "step", self._scheduler_step)
        optimizer._gaccum_hook = self  # type: ignore[attr-defined]

    def _patch(self, obj: Any, name: str, fn: Any) -> None:
        self._orig.append((obj, name, getattr(obj, name)))
        setattr(obj, name, fn)

    def _original(self, obj: Any, name: str) -> Any:
        for o, n, f in self._orig:
            if o is obj and n == name:
                return f
        raise KeyError(name)

    # -- what the user's loop calls ------------------------------------------
    @property
    def optimizer_steps(self) -> int:
        return self.engine.optimizer_steps

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    @property
    def accum_steps(self) -> int:
        return self.engine.accum_steps

    def set_epoch(self, epoch: int) -> None:
        """For a schedule by epoch: call at the start of each epoch (takes effect between windows)."""
        self.engine.set_epoch(epoch)

    def _micro_end(self) -> StepResult:
        eng = self.engine
        eng.end_micro(1.0, synced=True)
        if eng.micro >= eng.accum_steps:
            return self._boundary(partial=False)
        return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)

    def _boundary(self, partial: bool) -> StepResult:
        self._stepping = True
        try:
            if self.scaler is not None:
                # The engine calls the scaler's real methods; route them there.
                for name in ("step", "update", "unscale_"):
                    setattr(self.scaler, name, self._original(self.scaler, name))
            result = self.engine.step(partial=partial)
        finally:
            if self.scaler is not None:
                self.scaler.step = self._scaler_step  # type: ignore[method-assign]
                self.scaler.update = self._scaler_update  # type: ignore[method-assign]
                self.scaler.unscale_ = self._scaler_unscale  # type: ignore[method-assign]
            self._stepping = False
        if result.stepped:
            self._scheduler_pending += 1
        return result

    def _optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._stepping:
            return self._original(self.optimizer, "step")(*args, **kwargs)
        return self._micro_end()

    def _zero_grad(self, set_to_none: bool = True) -> None:
        if self._stepping:
            self._original(self.optimizer, "zero_grad")(set_to_none=set_to_none)
        # Otherwise a no-op: the window's gradients live until its real step.

    def _scaler_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if optimizer is not self.optimizer:
            return self._original(self.scaler, "step")(optimizer, *args, **kwargs)
        return self._micro_end()

    def _scaler_update(self, new_scale: Any = None) -> None:
        return None  # the engine updates once per real step

    def _scaler_unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is not self.optimizer:
            self._original(self.scaler, "unscale_")(optimizer)

    def _scheduler_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._scheduler_pending > 0:
            self._scheduler_pending -= 1
            return self._original(self.scheduler, "step")(*args, **kwargs)
        return None

    def flush(self, drop: bool = False) -> Optional[StepResult]:
        """Step (or drop) a partial last window, weighted by its real length."""
        if self.engine.micro == 0:
            return None
        if drop:
            self.engine.discard()
            return None
        return self._boundary(partial=True)

    def remove(self) -> None:
        """Restore every patched method and the optimizer's original parameters."""
        for obj, name, _ in reversed(self._orig):
            if name in vars(obj):
                delattr(obj, name)
        self._orig = []
        if self.engine.masters is not None:
            self.engine.masters.remove()
        if self.engine.master_weights is not None:
            self.engine.master_weights.restore()
        self.optimizer._gaccum_hook = None  # type: ignore[attr-defined]


def hook(
    optimizer: torch.optim.Optimizer,
    accum_steps: int | dict[int, int] | AccumulationSchedule,
    *,
    scaler: Optional[torch.amp.GradScaler] = None,
    scheduler: Any = None,
    max_grad_norm: Optional[float] = None,
    master_grads: bool | str = "auto",
) -> AccumulationHook:
    """Make an unchanged per-micro-batch loop accumulate ``accum_steps`` micro-batches per step.

    ``accum_steps`` may be a schedule, ``{0: 4, 1000: 8}``, as for :class:`Accumulator`.
    """
    return AccumulationHook(optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
                            max_grad_norm=max_grad_norm, master_grads=master_grads)
