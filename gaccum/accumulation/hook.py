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
``scaler.unscale_`` / ``scaler.update`` / ``scheduler.step`` wait for the boundary,
which runs them once (the core's one boundary, boundary.py). Half-precision parameters
keep FP32 master gradients (masters.py); there a clip must be ``max_grad_norm=`` (the
model's ``.grad`` stays empty). Under DDP it needs ``model=ddp_model``: it sets the flag
``no_sync`` sets (``require_backward_grad_sync``) before each forward, so DDP reduces only
the window's last micro-step, into which the window has been added (a tensor hook, before
DDP's reducer sees the gradient); a partial window, which never synced, is all-reduced by
``flush()``. Without the model it refuses.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from .._checks import warn_user
from .._dist import world_size
from ..batch import fed_size
from ..schedule import AccumulationSchedule
from . import checkpoint
from .boundary import StepResult
from .checks import check_optimizer
from .core import FLUSH, MICRO_STEP, AccumulationCore
from .masters import LIVE_MOVERS
from .state import WindowState
from .view import reads_core


@reads_core
class AccumulationHook:
    """Returned by :func:`hook`; ``remove()`` gives the optimizer back untouched.

    Its window goes through the same states as the Accumulator's (:attr:`state`); a micro-step ends at
    the loop's ``optimizer.step()`` (or ``scaler.step(optimizer)``). A backward that raised part-way
    discards the window (``discarded_windows``); so does a boundary that raises.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accum_steps: int | dict[int, int] | AccumulationSchedule,
                 *, scaler: Optional[torch.amp.GradScaler] = None, scheduler: Any = None,
                 max_grad_norm: Optional[float] = None, master_grads: bool | str = "auto",
                 model: Optional[nn.Module] = None) -> None:
        check_optimizer(optimizer)
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if world_size() > 1 and self.ddp is None:
            raise ValueError(
                "gaccum: hook() under torch.distributed must be given the DDP model, hook(optimizer, accum_steps=N, "
                "model=ddp_model), so that the micro-steps between boundaries skip DDP's reduction as no_sync does "
                "(it sees the model through nothing else); or use gaccum.Accumulator(ddp_model, optimizer, ...)")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.core = core = AccumulationCore(
            self, params, optimizer, accum_steps, scaler=scaler, scheduler=scheduler, max_grad_norm=max_grad_norm,
            master_grads=master_grads, distributed=self.ddp is not None,
            real_step=optimizer.step, guard_backward=True)  # the optimizer's own step, before _install patches it
        if self.ddp is not None and core.masters is not None:
            core.close()  # the one teardown: the optimizer gets its parameters back
            raise ValueError("gaccum: hook(model=ddp_model) with half-precision parameters (FP32 masters) is not "
                             "supported; use gaccum.Accumulator(ddp_model, optimizer, ...) or master_grads=False")
        core.window.ref_total, core.window.fixed_ref = 1.0, True  # raw gradients are summed: R = 1 for good
        self.scaler, self.params = core.scaler, core.params
        self.paused = False
        self.model = model if isinstance(model, nn.Module) else None
        self._fed: Optional[int] = None  # the samples this micro-step's forward was fed (with model=)
        self.stash: dict[torch.Tensor, torch.Tensor] = {}  # the window without masters, out of zero_grad's reach
        self._moved_back: set[torch.Tensor] = set()
        self._unscaled = False
        core.on_discard.append(self._clear_stash)
        if core.masters is None:
            core.teardown.handles([h for p in core.params for h in (
                p.register_post_accumulate_grad_hook(self._grad_ready), p.register_hook(functools.partial(self._merge, p)))])
            LIVE_MOVERS.add(self)
            core.teardown.add(lambda: LIVE_MOVERS.discard(self))
        elif max_grad_norm is None:
            warn_user("gaccum: hook() keeps this half-precision model's window in FP32 master gradients, so the "
                      "model's .grad stays empty and a clip_grad_norm_ in your loop clips nothing; pass "
                      "max_grad_norm= to gaccum.hook to clip the window", UserWarning)
        self._install(core, scheduler)

    def _install(self, core: AccumulationCore, scheduler: Any) -> None:
        td, opt = core.teardown, self.optimizer

        def step(*args: Any, **kwargs: Any) -> Any:
            return self._optimizer_step(*args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # LR schedulers check for it
        self._orig_step = td.patch(opt, "step", step)
        if core.masters is not None:
            self._orig_zero_grad = td.patch(opt, "zero_grad", self._zero_grad)
        if self.scaler is not None:
            self._orig_scaler = {name: td.patch(self.scaler, name, getattr(self, f"_scaler_{name.strip('_')}"))
                                 for name in ("step", "update", "unscale_")}
        if scheduler is not None:
            self._orig_sched_step = td.patch(scheduler, "step", self._scheduler_step)
        if self.model is not None:
            td.handles([self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)])
        if self.ddp is not None:
            ddp = self.ddp
            td.add(lambda: setattr(ddp, "require_backward_grad_sync", True))
        self._set_sync()

    # -- the window, out of .grad -------------------------------------------------
    def _active(self) -> bool:
        return not self.paused and self.core.state in (WindowState.EMPTY, WindowState.ACCUMULATING)

    def _merge(self, p: torch.Tensor, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """Before autograd accumulates p's gradient in the window's last micro-step: add the window and
        divide by N, so what reaches .grad (and DDP's reducer, which runs this micro-step) is the mean."""
        if not self._active():
            return None
        self.core.watch.seen()  # a backward that raised part-way before this one: its window is discarded
        if not self.core.window.next_is_last() or p in self._moved_back:
            return None
        self._moved_back.add(p)
        held = self.stash.pop(p, None)
        n = self._n()
        weighted = grad if n == 1.0 else grad * n
        return (weighted if held is None else weighted + held) / (self.core.window.items + n)

    def _grad_ready(self, p: torch.Tensor) -> None:
        """After autograd accumulated p's gradient between boundaries: into the window, out of .grad."""
        if p.grad is None or not self._active() or self.core.window.next_is_last():
            return
        n = self._n()
        if n != 1.0:
            p.grad.mul_(n)  # weighted by its samples (with model=): the window is their mean
        held = self.stash.get(p)
        if held is None:
            self.stash[p] = p.grad  # steal the tensor: nothing copied
        else:
            held.add_(p.grad)
        p.grad = None

    def _clear_stash(self) -> None:
        self.stash, self._moved_back, self._unscaled = {}, set(), False
        self._set_sync()

    def _set_sync(self) -> None:
        """DDP reduces only in the window's last micro-step (what no_sync does, set before the forward)."""
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = self.core.masters is not None or self.core.window.next_is_last()

    def _before_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Before each training forward (with model=): under DDP every rank must be at the same micro-step;
        the micro-step's first forward says how many samples it holds, which weighs it."""
        if not (torch.is_grad_enabled() and module.training and self._active()):
            return
        if self.ddp is not None:
            self.core.check_ranks(MICRO_STEP)
        if self._fed is None:
            self._fed = fed_size(args, kwargs)
            if self._fed is not None and self.core.masters is not None:
                self.core.masters.set_inv_scale(float(self._fed))

    def _n(self) -> float:
        """This micro-step's weight: its samples with model=, else 1 (every micro-batch the same)."""
        return float(self._fed) if self._fed is not None else 1.0

    def _stash_to_grad(self, total: float) -> None:
        """What is still in the window (a partial one, or parameters the last backward did not reach),
        divided by the window's total weight."""
        with torch.no_grad():
            for p, held in self.stash.items():
                p.grad = held.div_(total) if p.grad is None else p.grad.add_(held.div_(total))
        self.stash = {}

    def _micro_end(self) -> StepResult:
        """The loop's optimizer.step(): one micro-step ends; the window's last runs the boundary."""
        core = self.core
        core.require_open("optimizer.step")
        if core.watch.open:  # the last backward raised and the loop stepped anyway
            core.abort_backward()
            return core.last_result or core.micro_result()
        last, n = core.window.next_is_last(), self._n()
        self._fed = None
        core.begin_micro()
        if last and core.masters is None:
            self._stash_to_grad(core.window.items + n)
        result = core.end_micro(n, synced=core.masters is not None or last, items_mode=False,
                                already_mean=core.masters is None, unscaled_by_user=self._unscaled)
        self._set_sync()
        return result

    # -- the patched methods: pass through inside the boundary, wait for it outside ------------------
    def _at_boundary(self) -> bool:
        return self.core.state is WindowState.AT_BOUNDARY

    def _optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._orig_step(*args, **kwargs) if self._at_boundary() else self._micro_end()

    def _zero_grad(self, set_to_none: bool = True) -> None:
        if self._at_boundary():
            self._orig_zero_grad(set_to_none=set_to_none)
        # Otherwise a no-op: the window's gradients live until its real step.

    def _scaler_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if optimizer is not self.optimizer or self._at_boundary():
            return self._orig_scaler["step"](optimizer, *args, **kwargs)
        return self._micro_end()

    def _scaler_update(self, new_scale: Any = None) -> None:
        if self._at_boundary() or new_scale is not None:
            self._orig_scaler["update"](new_scale)
        # Otherwise a no-op: the boundary updates the scaler once per window.

    def _scaler_unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is not self.optimizer or self._at_boundary():
            self._orig_scaler["unscale_"](optimizer)
        elif self.core.masters is None and self.core.window.next_is_last() and self._moved_back:
            # The window's whole gradient is in .grad (nanoGPT's unscale_, clip, step): unscale it for the clip.
            self._orig_scaler["unscale_"](optimizer)
            self._unscaled = True

    def _scheduler_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._at_boundary():
            return self._orig_sched_step(*args, **kwargs)
        return None  # the boundary steps it after each real optimizer step

    # -- the user's calls ----------------------------------------------------------
    def flush(self, drop: bool = False) -> Optional[StepResult]:
        """EMPTY / ACCUMULATING: step (or drop) a partial last window, weighted by its real length.

        It runs after the loop, so the loop's own clip never sees this window: ``max_grad_norm=``
        given to the hook clips it. Under DDP every rank must call it: the ranks first check that they
        all hold the same number of micro-steps (WindowMismatchError on every rank otherwise).
        """
        core = self.core
        core.require_open("flush")
        core.check_ranks(FLUSH)
        if core.micro == 0:
            return None
        if drop:
            core.discard()
            return None
        if core.masters is None:
            self._stash_to_grad(core.window.items)
        result = core.end_window(partial=True, already_mean=core.masters is None)
        self._set_sync()
        return result

    def state_dict(self) -> dict[str, Any]:
        """EMPTY / ACCUMULATING: the Accumulator's checkpoint format (the window, counters, FP32 masters)."""
        self.core.require_open("state_dict")
        return checkpoint.save(self.core, lambda: [self.stash.get(p) for p in self.core.params])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """EMPTY / ACCUMULATING. Checks everything first, then assigns."""
        self.core.require_open("load_state_dict")
        checkpoint.check(self.core, state)
        checkpoint.load(self.core, state, self._put_stash)
        self._set_sync()

    def _put_stash(self, grads: list[Optional[torch.Tensor]]) -> None:
        self.stash = {p: g for p, g in zip(self.core.params, grads) if g is not None}

    def remove(self) -> None:
        """Any state: restore every patched method and the optimizer's original parameters (idempotent)."""
        self.core.close()


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

    With ``model=`` (the module the loop calls), each micro-batch is weighed by the samples its forward
    is fed, so a short last micro-batch is weighed exactly; without it every micro-batch weighs the same.
    ``accum_steps`` may be a schedule, ``{0: 4, 1000: 8}``, as for :class:`Accumulator`. Under DDP pass
    ``model=ddp_model``: DDP then reduces once per window (the last micro-step), as under ``no_sync``,
    and every rank must call ``flush()`` for a partial last window.
    """
    return AccumulationHook(optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
                            max_grad_norm=max_grad_norm, master_grads=master_grads, model=model)
