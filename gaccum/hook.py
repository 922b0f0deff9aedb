"""A drop-in for a training loop the user will not change.

``gaccum.hook(optimizer, accum_steps=N)`` makes the usual
``loss.backward(); [clip]; optimizer.step(); optimizer.zero_grad()`` on every
micro-batch accumulate correctly. The window lives where no ``zero_grad`` (the
optimizer's or ``model.zero_grad()``) reaches it: as backward produces each
gradient (``register_post_accumulate_grad_hook``), it is moved out of ``.grad``
into the hook's own buffer. In the window's last backward it is moved back,
already divided by N, so the user's own ``scaler.unscale_``, clip and step see
the window's whole gradient, as in large-batch training; between boundaries
``.grad`` is empty, so a clip every micro-step clips nothing, and
``scaler.unscale_`` / ``scaler.update`` wait for the boundary. With
``scheduler=`` its ``step()`` only advances after a real optimizer step, and
``flush()`` steps it too. Half-precision parameters keep FP32 master gradients
(master.py); there a clip must be ``max_grad_norm=`` (the model's ``.grad`` stays
empty). Under DDP it needs ``model=ddp_model``: it sets the flag ``no_sync`` sets
(``require_backward_grad_sync``) before each forward, so DDP reduces only the window's last
micro-step, into which the window has been added (a tensor hook, before DDP's reducer sees the
gradient); a partial window, which never synced, is all-reduced by ``flush()``. Without the model it
refuses.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from ._dist import world_size
from .boundary import StepResult, _as_float, grads_finite
from .engine import _Engine, check_scaler_and_scheduler, check_unclaimed
from .master import _LIVE
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
        model: Optional[nn.Module] = None,
    ) -> None:
        check_unclaimed(optimizer)
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if world_size() > 1 and self.ddp is None:
            raise ValueError(
                "gaccum: hook() under torch.distributed must be given the DDP model, hook(optimizer, accum_steps=N, "
                "model=ddp_model), so that the micro-steps between boundaries skip DDP's reduction as no_sync does "
                "(it sees the model through nothing else); or use gaccum.Accumulator(ddp_model, optimizer, ...)"
            )
        check_scaler_and_scheduler(scaler, scheduler)
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
        self._did_step = False
        self._update_due = False
        self._unscaled = False
        self._scheduler_pending = 0
        self._orig: list[tuple[Any, str, Any]] = []
        # Without masters the window lives here, out of zero_grad's reach (see the module docstring).
        self.window: dict[torch.Tensor, torch.Tensor] = {}
        self._moved_back: set[torch.Tensor] = set()
        self.params = self.engine.params
        self.paused = False
        if self.ddp is not None and self.engine.masters is not None:
            self.engine.masters.remove()
            raise ValueError("gaccum: hook(model=ddp_model) with half-precision parameters (FP32 masters) is not "
                             "supported; use gaccum.Accumulator(ddp_model, optimizer, ...) or master_grads=False")
        self._handles = [] if self.engine.masters is not None else [
            h for p in self.engine.params for h in (p.register_post_accumulate_grad_hook(self._grad_ready),
                                                    p.register_hook(functools.partial(self._merge, p)))]
        if self._handles:
            _LIVE.add(self)
        self._set_sync()
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._optimizer_step(*args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # LR schedulers check for it
        self._patch(optimizer, "step", step)
        if self.engine.masters is not None:
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

    # -- the window, out of .grad ---------------------------------------------
    def _last_micro(self) -> bool:
        return self.engine.micro + 1 >= self.engine.accum_steps

    def _merge(self, p: torch.Tensor, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """Before autograd accumulates p's gradient in the window's last micro-step: add the window and
        divide by N, so what reaches .grad (and DDP's reducer, which runs this micro-step) is the mean."""
        if self._stepping or self.paused or not self._last_micro() or p in self._moved_back:
            return None
        self._moved_back.add(p)
        held = self.window.pop(p, None)
        return (grad if held is None else grad + held) / (self.engine.micro + 1)

    def _grad_ready(self, p: torch.Tensor) -> None:
        """After autograd accumulated p's gradient between boundaries: into the window, out of .grad."""
        if p.grad is None or self._stepping or self.paused or self._last_micro():
            return
        held = self.window.get(p)
        if held is None:
            self.window[p] = p.grad  # steal the tensor: nothing copied
        else:
            held.add_(p.grad)
        p.grad = None

    def _set_sync(self) -> None:
        """DDP reduces only in the window's last micro-step (what no_sync does, set before the forward)."""
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = self.engine.masters is not None or self._last_micro()

    def _window_to_grad(self, k: int, reduce: bool = False) -> None:
        """What is still in the window (a partial one, or parameters the last backward did not reach);
        ``reduce``: a partial window under DDP, whose micro-steps all skipped the reduction."""
        if reduce and self.ddp is not None:
            self.engine._allreduce_mean([self.window[p] for p in self.engine.params if p in self.window])
        with torch.no_grad():
            for p, held in self.window.items():
                if p.grad is None:
                    p.grad = held.div_(k)
                else:
                    p.grad.add_(held.div_(k))
        self.window = {}

    def _micro_end(self) -> StepResult:
        eng = self.engine
        if eng.masters is not None:
            eng.end_micro(1.0, synced=True)
            if eng.micro >= eng.accum_steps:
                return self._boundary(partial=False)
            return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)
        last = self._last_micro()
        eng.end_micro(1.0, synced=True)
        if not last:
            self._set_sync()
            return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)
        return self._real_step(eng.micro)

    def _real_step(self, k: int, partial: bool = False) -> StepResult:
        """The window's mean gradient is in .grad: the user's unscale/clip may already have run; step it."""
        eng = self.engine
        self._window_to_grad(k, reduce=partial)
        self._moved_back = set()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm, scale, skipped = None, None, False
        self._stepping, self._did_step = True, False
        try:
            if self.scaler is not None:
                scale = float(self.scaler.get_scale())
                if eng.max_grad_norm is not None:
                    if not self._unscaled:
                        self._original(self.scaler, "unscale_")(self.optimizer)
                    grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, eng.max_grad_norm))
                self._original(self.scaler, "step")(self.optimizer)
                skipped = not self._did_step
                self._update_due = True
            else:
                if not grads_finite(grads):
                    skipped = True
                    eng.warn_nonfinite()
                else:
                    if eng.max_grad_norm is not None:
                        grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, eng.max_grad_norm))
                    self._original(self.optimizer, "step")()
                    self._did_step = True
        except BaseException:
            # as the Accumulator's boundary: the window ends, counted if the optimizer had stepped
            if self._did_step:
                eng.optimizer_steps += 1
            self.window, self._moved_back = {}, set()
            eng.discard()
            self._set_sync()
            raise
        finally:
            self._stepping = False
            self._unscaled = False
        if skipped:
            eng.skipped_steps += 1
        else:
            eng.optimizer_steps += 1
            self._scheduler_pending += 1
        eng.discard()
        self._set_sync()
        return StepResult(stepped=not skipped, skipped=skipped, boundary=True, grad_norm=grad_norm,
                          loss_scale=scale, micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)

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
            self._did_step = True
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
        if self._update_due:  # right after a real step: the scaler's own update, once per window
            self._update_due = False
            self._original(self.scaler, "update")(new_scale)

    def _scaler_unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is not self.optimizer or (self._stepping and not self._unscaled):
            self._original(self.scaler, "unscale_")(optimizer)  # GradScaler.step's own call lands here too
        elif self.engine.masters is None and self._last_micro() and self._moved_back:
            # The window's whole gradient is in .grad (nanoGPT's unscale_, clip, step): unscale it for the clip.
            self._original(self.scaler, "unscale_")(optimizer)
            self._unscaled = True

    def _scheduler_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._scheduler_pending > 0:
            self._scheduler_pending -= 1
            return self._original(self.scheduler, "step")(*args, **kwargs)
        return None

    def flush(self, drop: bool = False) -> Optional[StepResult]:
        """Step (or drop) a partial last window, weighted by its real length; the scheduler follows.

        It runs after the loop, so the loop's own clip never sees this window: ``max_grad_norm=``
        given to the hook clips it. Under DDP every rank must call it (it all-reduces the window).
        """
        if self.engine.micro == 0:
            return None
        if drop:
            self.window, self._moved_back = {}, set()
            self.engine.discard()
            self._set_sync()
            return None
        if self.engine.masters is not None:
            result = self._boundary(partial=True)
        else:
            result = self._real_step(self.engine.micro, partial=True)
            if self._update_due:
                self._scaler_update()
        if self.scheduler is not None and self._scheduler_pending > 0:
            self._scheduler_step()  # the loop that would have stepped it has ended
        return result

    def remove(self) -> None:
        """Restore every patched method and the optimizer's original parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _LIVE.discard(self)
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = True
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
    model: Optional[nn.Module] = None,
) -> AccumulationHook:
    """Make an unchanged per-micro-batch loop accumulate ``accum_steps`` micro-batches per step.

    ``accum_steps`` may be a schedule, ``{0: 4, 1000: 8}``, as for :class:`Accumulator`. Under DDP pass
    ``model=ddp_model``: DDP then reduces once per window (the last micro-step), as under ``no_sync``,
    and every rank must call ``flush()`` for a partial last window.
    """
    return AccumulationHook(optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
                            max_grad_norm=max_grad_norm, master_grads=master_grads, model=model)
