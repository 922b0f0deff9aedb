"""The accumulation core the Accumulator, the hook and ``micro_batch`` all drive.

It composes the window (state.py: state machine and arithmetic), the master
gradients (masters.py), the one boundary (boundary.py) and the one teardown
(lifecycle.py), and keeps the counters. What differs between front-ends (who
runs the forward, how DDP is told not to sync) stays in the front-ends.

Faults end in a known state, on every path:
- a backward that raises mid-micro-step: the window is discarded (it would hold part of a micro-batch),
  counted in ``discarded_windows``, warned about; the next micro-step starts a new window;
- anything raising inside the boundary: the window is discarded, the GradScaler reset, the optimizer step
  counted only if it was taken; ``last_result.discarded`` says so;
- under DDP/FSDP2, ranks that reach a window's end (or ``flush()``) after different numbers of
  micro-steps: :class:`WindowMismatchError` on every rank, every rank's window discarded.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._checks import is_int, warn_user
from .._dist import all_reduce_scalars, spread, world_size
from ..schedule import AccumulationSchedule, as_schedule, rescale_lr
from .boundary import Boundary, StepResult
from .checks import (check_accum_steps, check_choice, check_max_grad_norm, check_optimizer,
                     check_scaler_and_scheduler, check_unclaimed, resolve_master_grads, trained_params)
from .lifecycle import BackwardWatch, Teardown
from .masters import MasterGrads, MasterWeights
from .state import Window, WindowMismatchError, WindowState

MICRO_STEP, FLUSH = 0, 1  # what a rank is about to do when the ranks compare their windows


class AccumulationCore:
    """State, arithmetic and boundary of one optimizer's windows (see the module docstring)."""

    def __init__(self, owner: Any, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                 accum_steps: int | dict[int, int] | AccumulationSchedule, *, scaler: Any = None,
                 scheduler: Any = None, max_grad_norm: Optional[float] = None, master_grads: bool | str = "auto",
                 nonfinite: str = "discard", distributed: bool = False, sharded: bool = False,
                 names: Optional[dict[int, str]] = None, real_step: Optional[Callable[[], Any]] = None,
                 guard_backward: bool = False) -> None:
        """Checks every argument before touching anything; ``owner`` is the public front-end;
        ``guard_backward``: the front-end does not run the backward itself (the hook)."""
        check_optimizer(optimizer)
        check_unclaimed(optimizer)
        self.schedule = as_schedule(accum_steps)
        first = self.schedule.at(0) if self.schedule is not None else check_accum_steps(accum_steps)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("discard", "raise", "skip"))
        check_scaler_and_scheduler(scaler, scheduler, optimizer)
        self.params = trained_params(params, optimizer)
        use_masters = resolve_master_grads(master_grads, self.params)
        self._warn_left_out(params, names)
        self.owner = weakref.ref(owner)
        self.optimizer = optimizer
        self.scaler = scaler if (scaler is not None and scaler.is_enabled()) else None
        self.lr_scheduler = scheduler  # whose base_lrs a schedule's LR rule rescales
        self.distributed = distributed
        self.sharded = sharded
        self.window = Window(first)
        self.epoch = 0
        self.accum_history: list[tuple[int, int]] = [(0, first)]  # (optimizer step, accum_steps) at each change
        self.optimizer_steps = self.skipped_steps = self.discarded_windows = 0
        self.micro_steps = self.skipped_micro_batches = self.oom_splits = 0
        self.micro_batch_limit: Optional[int] = None  # what micro_batch() learned from out-of-memory errors
        self.window_peak = self.last_window_peak = 0  # under a CPU memory_limit
        self.last_result: Optional[StepResult] = None
        self._warned_overfill = False
        self._backward_ran = False  # in this micro-step: a backward started (so gradients may have moved)
        self.callbacks: list[Callable[[StepResult, Any], None]] = []
        self.on_discard: list[Callable[[], None]] = []  # a front-end's own window storage (the hook's stash)
        self.teardown = Teardown()
        self.watch = BackwardWatch()
        self.watch.on_failure = self._backward_failed
        self.masters: Optional[MasterGrads] = None
        self.master_weights: Optional[MasterWeights] = None
        if use_masters:
            self.masters = MasterGrads(self.params, watch=self.watch, guard_backward=guard_backward)
            self.teardown.add(self.masters.remove)
            self.master_weights = MasterWeights(optimizer, self.params)
            self.teardown.add(self.master_weights.restore)
        self.teardown.claim(optimizer, owner)
        self.boundary = Boundary(optimizer, scaler=self.scaler, scheduler=scheduler, max_grad_norm=max_grad_norm,
                                 masters=self.masters, master_weights=self.master_weights, sharded=sharded,
                                 real_step=real_step or optimizer.step)

    def _warn_left_out(self, params: Sequence[nn.Parameter], names: Optional[dict[int, str]]) -> None:
        kept = {id(p) for p in self.params}
        left_out = [(names or {}).get(id(p), f"#{i}") for i, p in enumerate(q for q in params if q.requires_grad)
                    if id(p) not in kept]
        if left_out:
            warn_user(
                f"gaccum: {len(left_out)} trainable parameter(s) are not in the optimizer ({', '.join(left_out[:8])}"
                f"{', ...' if len(left_out) > 8 else ''}); they get gradients but are never "
                "stepped. Freeze them (requires_grad_(False)) or add them to the optimizer",
                UserWarning,
            )

    # -- state ---------------------------------------------------------------------
    @property
    def state(self) -> WindowState:
        return self.window.state

    @property
    def accum_steps(self) -> int:
        return self.window.accum_steps

    @property
    def micro(self) -> int:
        return self.window.micro

    micro_in_window = micro

    @property
    def master_grad_bytes(self) -> int:
        return self.masters.nbytes if self.masters is not None else 0

    @property
    def uses_master_grads(self) -> bool:
        return self.masters is not None

    def require_open(self, action: str) -> None:
        """Any state but CLOSED (and not inside the boundary)."""
        self.window.require(action, WindowState.EMPTY, WindowState.ACCUMULATING)

    def close(self) -> None:
        """Any state -> CLOSED: everything gaccum installed is taken back (idempotent)."""
        if self.window.state is WindowState.CLOSED:
            return
        self.window.close()
        self.teardown.run()

    # -- micro-steps ---------------------------------------------------------------
    def _world(self) -> int:
        return world_size() if self.distributed else 1

    def weight_for(self, n: float, n0: Optional[float] = None) -> float:
        """n / R; ``n0`` is a whole micro-batch's count when ``n`` is a piece of one."""
        w = self.window
        if w.ref_total is None:
            r = w.expected_total(n if n0 is None else n0)
            world = self._world()
            # R must be the same on every rank for the post-reduce correction to hold
            w.ref_total = all_reduce_scalars([r], self.params[0].device)[0] / world if world > 1 else r
        return n / w.ref_total

    def begin_micro(self) -> None:
        """EMPTY / ACCUMULATING -> IN_MICRO_STEP."""
        self.window.begin_micro()
        self._backward_ran = False

    def end_micro(self, n: float, synced: bool, items_mode: bool, last: bool = False,
                  samples: Optional[int] = None, **boundary: bool) -> StepResult:
        """IN_MICRO_STEP -> ACCUMULATING; at the window's end (or ``last``) -> the boundary (``boundary``:
        :meth:`end_window`'s options). ``samples``: how many samples the micro-step held, when known."""
        self.window.end_micro(n, synced, items_mode, samples)
        self.micro_steps += 1
        if self.window.is_full or last:
            return self.end_window(partial=not self.window.is_full, **boundary)
        return self.micro_result()

    def backward(self, loss: torch.Tensor, n: float, n0: Optional[float] = None) -> None:
        """IN_MICRO_STEP: backward at weight n / R; the loss enters the window's mean once its gradient is in."""
        self.window.require("backward", WindowState.IN_MICRO_STEP)
        w = self.weight_for(n, n0)
        if self.masters is not None:
            self.masters.set_inv_scale(w)
            scaled = loss
        else:
            scaled = loss * w
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        self._backward_ran = True
        scaled.backward()
        self.window.add_loss(loss, n)

    def skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when a non-finite loss is to be skipped; raises under nonfinite='raise'."""
        if self.scaler is not None or self.nonfinite == "discard" or bool(torch.isfinite(loss.detach()).all()):
            return False  # the boundary's one check sees what a non-finite loss leaves in the gradient
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"gaccum: the loss is {float(loss.detach())} (non-finite) and no GradScaler is set; nothing was "
                "accumulated. Pass nonfinite='skip' to skip such micro-batches")
        self.skipped_micro_batches += 1
        return True

    def micro_result(self) -> StepResult:
        return StepResult(micro_step=self.micro_steps, optimizer_step=self.optimizer_steps)

    def abort_micro(self, exc: BaseException) -> None:
        """IN_MICRO_STEP -> EMPTY or back: the micro-step raised.

        Before any backward ran (its forward, a loss check) nothing was added: the window goes on. Once a
        backward ran, the window may hold part of a micro-batch, so it is discarded, counted and warned about.
        """
        if self.window.state is not WindowState.IN_MICRO_STEP:
            return  # the boundary's own failure handling has run
        self.watch.forget()
        if self._backward_ran:
            self._discard_counted(f"the micro-step's backward raised {type(exc).__name__}")
        else:
            self.window.leave_micro()

    def leave_micro(self) -> None:
        """IN_MICRO_STEP -> back: a micro-step that added nothing (a skipped non-finite loss)."""
        self.window.leave_micro()

    def abort_backward(self) -> None:
        """EMPTY / ACCUMULATING, the last backward never completed (it raised): discard the window."""
        self.watch.forget()
        self._backward_failed()

    def _backward_failed(self) -> None:
        """A gradient hook saw a new backward while the last one never completed: it raised part-way."""
        if self.window.state is not WindowState.CLOSED:
            self._discard_counted("a backward raised part-way")

    def _discard_counted(self, why: str) -> None:
        had = self.window.micro
        self.discarded_windows += 1
        self.discard()
        self.last_result = StepResult(boundary=True, discarded=True, micro_step=self.micro_steps,
                                      optimizer_step=self.optimizer_steps)
        warn_user(f"gaccum: {why}; the window ({had} micro-step(s) before it) is discarded so that no part of a "
                  "micro-batch is kept, and counted in discarded_windows. The next micro-step starts a new window",
                  RuntimeWarning)

    # -- ranks -----------------------------------------------------------------------
    def check_ranks(self, kind: int) -> None:
        """Under DDP/FSDP2, before each micro-step's forward and at flush(): every rank must be at the same
        micro-step doing the same thing, or each raises WindowMismatchError (one two-number all-reduce).

        Before every forward, not only a window's last: DDP's forward may itself communicate (its first
        bucket rebuild, broadcast buffers) and FSDP2's all-gathers, so a rank that has ended must be told
        before the others reach any collective."""
        if self._world() == 1:
            return
        code = 2 * self.window.micro + kind
        lo, hi = spread([code], self.params[0].device)[0]
        if lo != hi:
            what = "flush()" if kind == FLUSH else "a micro-step"
            self.discard()
            raise WindowMismatchError(
                f"gaccum: the ranks disagree on where the window ends: this rank reached {what} after "
                f"{code // 2} micro-step(s), another rank is at micro-step {int(lo) // 2}-{int(hi) // 2} or in "
                "flush(). Every rank must run the same number of micro-batches (DistributedSampler with "
                "drop_last=True, or the same number of batches per rank). Every rank's window was discarded"
            )

    # -- the boundary ----------------------------------------------------------------
    def end_window(self, partial: bool, unscaled_by_user: bool = False, already_mean: bool = False) -> StepResult:
        """ACCUMULATING -> AT_BOUNDARY -> EMPTY: reduce, correct, then the one boundary.

        ``already_mean``: the hook has put the window's mean in .grad itself (only a reduction may be due);
        ``unscaled_by_user``: the loop's own ``scaler.unscale_`` already ran on it.
        """
        w = self.window
        mean_loss = w.mean_loss()
        self._warn_overfilled()
        w.begin_boundary()
        try:
            self._finish_gradient(partial, already_mean)
            outcome = self.boundary.run(unscaled_by_user=unscaled_by_user)
        except BaseException as exc:
            if self.boundary.stepped:
                self.optimizer_steps += 1
            self._discard_counted(f"the boundary (unscale, clip, optimizer step, scheduler) raised "
                                 f"{type(exc).__name__}")
            raise
        if self.boundary.stepped:
            self.optimizer_steps += 1
        else:
            self.skipped_steps += 1
        self.discard()
        result = StepResult(stepped=self.boundary.stepped, skipped=outcome.skipped, boundary=True,
                            grad_norm=outcome.grad_norm, loss_scale=outcome.loss_scale,
                            micro_step=self.micro_steps, optimizer_step=self.optimizer_steps, loss=mean_loss)
        self.last_result = result
        owner = self.owner()
        for cb in self.callbacks:
            cb(result, owner)
        return result

    def _warn_overfilled(self) -> None:
        differs = self.window.overfilled()
        if differs is not None and not self._warned_overfill:
            self._warned_overfill = True
            warn_user(f"gaccum: this window held {differs}: every micro-batch is weighted by its real size, so the "
                      "gradient is the mean over what was fed, but the effective batch is not the plan's. A "
                      "DataLoader(batch_size=plan.micro_batch_size) overfills an uneven window; feed it with "
                      "plan.loader(dataset) (or gaccum.window_loader). Shown once", RuntimeWarning)

    def _finish_gradient(self, partial: bool, already_mean: bool) -> None:
        """The window's gradient made the mean over its items on every rank: W * R / T."""
        w, world = self.window, self._world()
        if already_mean:
            if world > 1 and not w.last_synced:
                allreduce_mean([p.grad for p in self.params if p.grad is not None])
            return
        if world > 1 and (w.items_mode or partial):
            total = all_reduce_scalars([w.items], self.params[0].device)[0]
        else:
            total = w.items * world
        assert w.ref_total is not None
        correction = world * w.ref_total / total
        if self.masters is not None:
            m = self.masters
            m.finalize()
            if world > 1:
                dist.all_reduce(m.flat)
                correction /= world
            if correction != 1.0:
                m.flat.mul_(correction)
            assert self.master_weights is not None
            for wt, v, written in zip(self.master_weights.weights, m.views, m.written):
                wt.grad = v if (written or world > 1) else None
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if world > 1 and not w.last_synced:
            allreduce_mean(grads)  # the window ended under no_sync (a partial last window): reduce by hand
        if correction != 1.0 and grads:
            torch._foreach_mul_(grads, correction)

    def discard(self) -> None:
        """Any open state -> EMPTY: gradients, pending half gradients, counts; weights untouched."""
        if self.masters is not None:
            self.masters.drop_pending()
            self.masters.reset()
            assert self.master_weights is not None
            for wt in self.master_weights.weights:
                wt.grad = None
        for p in self.params:
            p.grad = None
        self.window.reset()
        for fn in self.on_discard:
            fn()
        self.last_window_peak, self.window_peak = self.window_peak, 0
        self.apply_schedule()

    # -- accumulation schedules ----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"gaccum: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        if self.window.micro == 0:
            self.apply_schedule()  # else at the end of the current window

    def apply_schedule(self) -> None:
        """Between windows only: switch accum_steps and rescale the LR by the rule."""
        w = self.window
        if self.schedule is None or w.micro != 0:
            return
        new = self.schedule.at(self.optimizer_steps if self.schedule.by == "step" else self.epoch)
        if new == w.accum_steps:
            return
        rescale_lr(self.optimizer, self.lr_scheduler, self.schedule.lr_factor(w.accum_steps, new))
        w.accum_steps = new
        self.accum_history.append((self.optimizer_steps, new))
        if not w.fixed_ref:
            w.ref_total = None  # R = n0 x N changes with N


def allreduce_mean(grads: list[torch.Tensor]) -> None:
    """Average ``grads`` over the ranks in one flat all-reduce."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size())
    off = 0
    for g in grads:
        g.copy_(flat[off: off + g.numel()].view_as(g))
        off += g.numel()
