"""Gradient accumulation that gives the large-batch gradient, exactly.

How the weighting works (the part hand-written loops get wrong). Every
micro-step i of a window carries a count n_i: ``num_items`` when the user gives
it (tokens that are not padding), the planned micro-batch size for an uneven
window, else 1. Its gradient enters the accumulator with weight n_i / R, where R
is the *expected* window total (n_0 x N, or the plan's total): magnitudes stay
those of an ordinary mean loss, so fp16 scaling behaves as usual. At the
boundary the true total T is known (all-reduced under DDP) and one correction
c = W * R / T makes the gradient the mean over every item of the window on
every rank. For full, even windows c == 1 and no pass is spent on it. A partial
last window is just a window with a smaller T, so ``flush()`` needs no special
case.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._checks import is_int
from ._dist import all_reduce_scalars, world_size
from .autosplit import MemoryBudget, TouchTracker, check_memory_limit, halves, is_oom
from .batch import batch_size, batch_tensors, split_batch
from .master import HALF, MasterGrads, MasterWeights
from .schedule import AccumulationSchedule, as_schedule, rescale_lr


def check_scaler_and_scheduler(scaler: Any, scheduler: Any) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"gaccum: scaler must be a torch.amp.GradScaler (or None), got {scaler!r}; e.g. "
                        "scaler=torch.amp.GradScaler('cuda') for fp16")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"gaccum: scheduler must be an LR scheduler with a step() method (e.g. "
                        f"torch.optim.lr_scheduler.LambdaLR(optimizer, ...)), got {scheduler!r}")


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """One fused pass over the window's gradients at the boundary (a single sync), not one per micro-step."""
    if not grads:
        return True
    return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


@dataclass(frozen=True)
class StepResult:
    """What one micro-step did; ``stepped`` is True only on a real optimizer step.

    ``skipped`` is True when the window ended but the step was skipped because
    GradScaler (or gaccum's own check) found inf/NaN: PyTorch gives no public
    way to learn this (pytorch/pytorch#67590).
    """

    stepped: bool = False
    skipped: bool = False
    boundary: bool = False
    grad_norm: Optional[float] = None
    loss_scale: Optional[float] = None
    loss: Optional[float] = None  # at a boundary: the window's mean loss over its items (this rank's)
    micro_step: int = 0
    optimizer_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_accum_steps(accum_steps: Any, name: str = "accum_steps") -> int:
    if not is_int(accum_steps):
        raise TypeError(f"gaccum: {name} must be an int >= 1, got {accum_steps!r} ({type(accum_steps).__name__})")
    if accum_steps < 1:
        raise ValueError(f"gaccum: {name} must be >= 1, got {accum_steps}")
    return accum_steps


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"gaccum: loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"gaccum: loss must be a scalar (mean-reduced), got shape {tuple(loss.shape)}; reduce it with .mean()"
        )
    if not loss.requires_grad:
        raise ValueError("gaccum: loss does not require grad (computed under no_grad, or detached?)")


def _check_items(num_items: Any) -> float:
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError("gaccum: num_items must be a number or a one-element tensor")
        num_items = num_items.item()
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"gaccum: num_items must be a positive number, got {type(num_items).__name__}")
    n = float(num_items)
    if not n > 0 or math.isinf(n):
        raise ValueError(f"gaccum: num_items must be > 0, got {num_items}; skip micro-batches with no items")
    return n


def _loss_and_items(out: Any) -> tuple[torch.Tensor, Optional[float]]:
    """What a micro_batch() loss_fn returns: a loss, or (loss, num_items)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"gaccum: loss_fn returns a loss or (loss, num_items), got a sequence of {len(out)}")
        loss, items = out
        _check_loss(loss)
        return loss, _check_items(items)
    _check_loss(out)
    return out, None


@dataclass
class _Run:
    """One micro_batch() call: what its pieces have added to the window so far."""

    size: int
    n_full: float
    loss_fn: Callable[[nn.Module, Any], Any]
    items: float = 0.0
    items_mode: bool = False
    pieces: int = 0
    attempt_items: float = 0.0  # the count of the piece being tried
    attempt_items_mode: bool = False
    attempt_loss: Optional[torch.Tensor] = None

    def add(self, n: float, items_mode: bool) -> None:
        self.items += n
        self.items_mode |= items_mode
        self.pieces += 1


class _Engine:
    """Window bookkeeping and the boundary step, shared by Accumulator and hook()."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        accum_steps: int | dict[int, int] | AccumulationSchedule,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
        scheduler: Any = None,
        max_grad_norm: Optional[float] = None,
        master_grads: bool | str = "auto",
        nonfinite: str = "raise",
        distributed: bool = False,
        names: Optional[dict[int, str]] = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"gaccum: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.schedule = as_schedule(accum_steps)
        self.accum_steps = self.schedule.at(0) if self.schedule is not None else check_accum_steps(accum_steps)
        self.epoch = 0
        # (optimizer step, accum_steps) each time the schedule changed the window.
        self.accum_history: list[tuple[int, int]] = [(0, self.accum_steps)]
        if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or isinstance(max_grad_norm, bool)
                                          or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"gaccum: max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"gaccum: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if master_grads not in ("auto", True, False):
            raise ValueError(f"gaccum: master_grads must be 'auto', True or False, got {master_grads!r}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("gaccum: the model has no trainable parameters (every parameter has requires_grad=False)")
        if not any(id(p) in held for p in trainable):
            raise ValueError(
                "gaccum: the optimizer does not hold any of the model's trainable parameters; "
                "build it from model.parameters()"
            )
        self.params = [p for p in trainable if id(p) in held]
        check_scaler_and_scheduler(scaler, scheduler)
        left_out = [(names or {}).get(id(p), f"#{i}") for i, p in enumerate(trainable) if id(p) not in held]
        if left_out:
            warnings.warn(
                f"gaccum: {len(left_out)} trainable parameter(s) are not in the optimizer ({', '.join(left_out[:8])}"
                f"{', ...' if len(left_out) > 8 else ''}); they get gradients but are never "
                "stepped. Freeze them (requires_grad_(False)) or add them to the optimizer",
                UserWarning,
                stacklevel=4,
            )
        self.optimizer = optimizer
        self.scaler = scaler if (scaler is not None and scaler.is_enabled()) else None
        self.scheduler = scheduler
        self.lr_scheduler = scheduler  # whose base_lrs a schedule's LR rule rescales (the hook steps its own)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.distributed = distributed
        use_masters = any(p.dtype in HALF for p in self.params) if master_grads == "auto" else bool(master_grads)
        if use_masters and any(p.dtype not in (torch.float32, *HALF) for p in self.params):
            raise ValueError(
                "gaccum: FP32 master gradients are for float16/bfloat16/float32 parameters; a float64 model "
                "accumulates exactly in .grad (pass master_grads=False)"
            )
        self.masters: Optional[MasterGrads] = MasterGrads(self.params) if use_masters else None
        self.master_weights: Optional[MasterWeights] = MasterWeights(optimizer, self.params) if use_masters else None
        # window state
        self.micro = 0  # micro-steps done in the current window
        self.items = 0.0  # T_local: items seen in the current window
        self.items_mode = False  # num_items given in this window
        self.loss_sum: Optional[torch.Tensor] = None  # sum of n_i x loss_i, on the device (no sync per micro-step)
        self.ref_total: Optional[float] = None  # R, fixed while accum_steps stays
        self.fixed_ref = False  # the hook sums raw gradients: R = 1 for good
        self.window: Optional[list[int]] = None  # a plan's (possibly uneven) micro-batch sizes
        self.last_synced = False  # the last backward let DDP reduce
        # counters
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.micro_steps = 0
        self.skipped_micro_batches = 0
        # What Accumulator.micro_batch() learned from out-of-memory errors: the largest piece that runs.
        self.micro_batch_limit: Optional[int] = None
        self.oom_splits = 0
        self._warned_nonfinite = False
        self.window_peak = 0  # under a CPU memory_limit: the most live during this window's micro-steps
        self.last_window_peak = 0
        self.callbacks: list[Callable[[StepResult, "_Engine"], None]] = []
        # Called with the engine once the window's gradient is final (reduced,
        # corrected, unscaled) and before the optimizer steps: verify() reads it.
        self.pre_step_hooks: list[Callable[["_Engine"], None]] = []

    # -- helpers -------------------------------------------------------------
    def plan_window(self) -> Optional[list[int]]:
        """The plan's window, while the schedule keeps the plan's number of micro-steps."""
        if self.window is not None and len(self.window) == self.accum_steps:
            return self.window
        return None

    def expected_total(self, n0: float) -> float:
        window = self.plan_window()
        return float(sum(window)) if window is not None else n0 * self.accum_steps

    def weight_for(self, n: float, n0: Optional[float] = None) -> float:
        """n / R; ``n0`` is a whole micro-batch's count when ``n`` is a piece of one."""
        if self.ref_total is None:
            self.ref_total = self._agree_ref(self.expected_total(n if n0 is None else n0))
        return n / self.ref_total

    def _world(self) -> int:
        return world_size() if self.distributed else 1

    def _agree_ref(self, r: float) -> float:
        """R must be the same on every rank for the post-reduce correction to hold."""
        world = self._world()
        if world > 1:
            return all_reduce_scalars([r], self.params[0].device)[0] / world
        return r

    def begin_micro(self, weight: float) -> None:
        if self.masters is not None:
            self.masters.recover()
            self.masters.set_inv_scale(weight)

    def add_loss(self, loss: torch.Tensor, n: float) -> None:
        # kept in the model's precision (float64 stays float64), half precision upcast
        v = loss.detach().to(torch.promote_types(loss.dtype, torch.float32)) * n
        self.loss_sum = v if self.loss_sum is None else self.loss_sum + v

    def end_micro(self, n: float, synced: bool) -> None:
        self.micro += 1
        self.micro_steps += 1
        self.items += n
        self.last_synced = synced

    # -- the boundary ----------------------------------------------------------
    def _global_total(self, partial: bool) -> float:
        world = self._world()
        if world > 1 and (self.items_mode or partial):
            return all_reduce_scalars([self.items], self.params[0].device)[0]
        return self.items * world

    def step(self, partial: bool = False) -> StepResult:
        """End the window: sync, correct, unscale/check, clip, step, zero."""
        assert self.ref_total is not None
        world = self._world()
        total = self._global_total(partial)
        correction = world * self.ref_total / total
        if self.masters is not None:
            m = self.masters
            m.finalize()
            if world > 1:
                dist.all_reduce(m.flat)
                correction /= world
            if correction != 1.0:
                m.flat.mul_(correction)
            assert self.master_weights is not None
            for w, v, written in zip(self.master_weights.weights, m.views, m.written):
                w.grad = v if (written or world > 1) else None
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if world > 1 and not self.last_synced:
                # The window ended under no_sync (a partial last window): reduce by hand.
                self._allreduce_mean(grads)
            if correction != 1.0 and grads:
                torch._foreach_mul_(grads, correction)
        return self._optimizer_step()

    def _allreduce_mean(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world_size())
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    def _optimizer_step(self) -> StepResult:
        window_loss = float(self.loss_sum) / self.items if self.loss_sum is not None and self.items > 0 else None
        grad_norm = None
        skipped = False
        scale = None
        opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            scale = float(self.scaler.get_scale())
            self.scaler.unscale_(self.optimizer)
            for fn in self.pre_step_hooks:
                fn(self)
            if self.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(opt_params, self.max_grad_norm))
            found = sum(float(v) for v in self.scaler._found_inf_per_device(self.optimizer).values())
            skipped = found > 0
            if self.master_weights is not None:
                self.master_weights.refresh_stale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            for fn in self.pre_step_hooks:
                fn(self)
            if self.masters is not None:
                skipped = float(self.masters.found_inf) > 0
            else:
                skipped = not grads_finite([p.grad for p in opt_params if p.grad is not None])
            if skipped:
                self.warn_nonfinite()
            if not skipped:
                if self.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(opt_params, self.max_grad_norm))
                if self.master_weights is not None:
                    self.master_weights.refresh_stale()
                self.optimizer.step()
        if not skipped:
            if self.master_weights is not None:
                self.master_weights.copy_back()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer_steps += 1
        else:
            self.skipped_steps += 1
        self.discard()
        result = StepResult(
            stepped=not skipped, skipped=skipped, boundary=True, grad_norm=grad_norm, loss_scale=scale,
            micro_step=self.micro_steps, optimizer_step=self.optimizer_steps, loss=window_loss,
        )
        for cb in self.callbacks:
            cb(result, self)
        return result

    def warn_nonfinite(self) -> None:
        """One rule on every path without a GradScaler: an inf/NaN window is discarded, counted, said once."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                "gaccum: inf/NaN in the accumulated gradient and no GradScaler; the window is discarded and counted "
                "in skipped_steps (StepResult.skipped). This warning is shown once",
                RuntimeWarning,
                stacklevel=5,
            )

    def discard(self) -> None:
        """Drop the window: gradients, counts and flags; weights untouched."""
        if self.masters is not None:
            self.masters.flush_pending()
            self.masters.reset()
            assert self.master_weights is not None
            for w in self.master_weights.weights:
                w.grad = None
        for p in self.params:
            p.grad = None
        self.micro = 0
        self.items = 0.0
        self.items_mode = False
        self.loss_sum = None
        self.last_window_peak, self.window_peak = self.window_peak, 0
        self.apply_schedule()

    # -- accumulation schedules -------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"gaccum: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        if self.micro == 0:
            self.apply_schedule()  # else at the end of the current window

    def apply_schedule(self) -> None:
        """Between windows only: switch accum_steps and rescale the LR by the rule."""
        if self.schedule is None or self.micro != 0:
            return
        key = self.optimizer_steps if self.schedule.by == "step" else self.epoch
        new = self.schedule.at(key)
        if new == self.accum_steps:
            return
        rescale_lr(self.optimizer, self.lr_scheduler, self.schedule.lr_factor(self.accum_steps, new))
        self.accum_steps = new
        self.accum_history.append((self.optimizer_steps, new))
        if not self.fixed_ref:
            self.ref_total = None  # R = n0 x N changes with N

    # -- checkpoints --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "accum_steps": self.accum_steps, "epoch": self.epoch, "micro": self.micro, "items": self.items,
            "items_mode": self.items_mode, "ref_total": self.ref_total, "last_synced": self.last_synced,
            "optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps,
            "micro_steps": self.micro_steps, "skipped_micro_batches": self.skipped_micro_batches,
            "micro_batch_limit": self.micro_batch_limit, "oom_splits": self.oom_splits,
        }
        if self.masters is not None:
            self.masters.flush_pending()
            assert self.master_weights is not None
            state["master_grads"] = self.masters.flat.detach().clone()
            state["written"] = list(self.masters.written)
            state["master_weights"] = [w.detach().clone() for w in self.master_weights.weights]
            # optimizer.state_dict() of a model with half parameters is cast to their dtype when loaded
            # before the Accumulator exists: the FP32 state travels here too, so resume is exact
            state["optimizer_fp32_state"] = self.master_weights.fp32_state()
        else:
            state["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checks everything first, then assigns: a checkpoint that does not fit changes nothing."""
        keys = ("accum_steps", "micro", "items", "items_mode", "ref_total", "last_synced",
                "optimizer_steps", "skipped_steps", "micro_steps", "skipped_micro_batches")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"gaccum: not an Accumulator state_dict (missing {missing})")
        if ("master_grads" in state) != (self.masters is not None):
            raise ValueError("gaccum: the checkpoint and this Accumulator disagree on master_grads; build it the same way")
        if self.masters is not None:
            assert self.master_weights is not None
            if state["master_grads"].numel() != self.masters.flat.numel():
                raise ValueError("gaccum: the checkpoint's master gradients do not match this model's parameters")
            ws = self.master_weights.weights
            if len(state["master_weights"]) != len(ws) or any(
                    tuple(a.shape) != tuple(b.shape) for a, b in zip(state["master_weights"], ws)):
                raise ValueError("gaccum: the checkpoint's master weights do not match this model's parameters")
        else:
            grads = state["grads"]
            if len(grads) != len(self.params) or any(
                    g is not None and tuple(g.shape) != tuple(p.shape) for g, p in zip(grads, self.params)):
                raise ValueError("gaccum: the checkpoint's gradients do not match this model's parameters")
        if self.masters is not None:
            assert self.master_weights is not None
            with torch.no_grad():
                self.masters.flat.copy_(state["master_grads"])
                for w, src in zip(self.master_weights.weights, state["master_weights"]):
                    w.copy_(src)
            if "optimizer_fp32_state" in state:
                self.master_weights.load_fp32_state(state["optimizer_fp32_state"])
            self.masters.written = list(state["written"])
            self.master_weights.copy_back()
        else:
            for p, g in zip(self.params, state["grads"]):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
        for k in keys:
            setattr(self, k, state[k])
        self.epoch = int(state.get("epoch", 0))
        self.micro_batch_limit = state.get("micro_batch_limit")
        self.oom_splits = int(state.get("oom_splits", 0))


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of layers whose forward depends on the micro-batch's statistics."""
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Accumulator:
    """Gradient accumulation for a training loop you write.

    >>> acc = Accumulator(model, opt, accum_steps=4, scaler=scaler, scheduler=sched)
    >>> for x, y in micro_batches:
    ...     with acc.accumulate():
    ...         acc.backward(loss_fn(model(x), y))
    >>> acc.flush()

    or, letting gaccum run the forward (and split a micro-batch that runs out of memory):

    >>> for batch in micro_batches:
    ...     acc.micro_batch(batch, lambda model, b: loss_fn(model(b[0]), b[1]))

    ``accum_steps`` is an int, or a schedule ``{0: 4, 1000: 8}`` / an
    :class:`AccumulationSchedule` (by optimizer step or epoch, LR rescaled as
    the effective batch changes). ``plan=`` takes a :class:`gaccum.Plan`
    (accum_steps and window from it). ``master_grads='auto'`` keeps FP32 master
    gradients/weights for fp16/bf16 parameters. ``drop_last=True`` makes
    :meth:`flush` discard a partial last window. ``nonfinite='skip'`` skips a
    micro-batch whose loss is inf/NaN instead of raising (only without a
    GradScaler; with one, the scaler skips). ``on_oom="split"`` (the default)
    lets :meth:`micro_batch` survive out-of-memory; ``memory_limit`` is a CPU
    budget that raises it like a GPU would (the planner's ``plan.budget``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accum_steps: Optional[int | dict[int, int] | AccumulationSchedule] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        scheduler: Any = None,
        max_grad_norm: Optional[float] = None,
        *,
        plan: Any = None,
        master_grads: bool | str = "auto",
        drop_last: bool = False,
        nonfinite: str = "raise",
        warn_batchnorm: bool = True,
        callbacks: Sequence[Callable[[StepResult, Any], None]] = (),
        on_oom: str = "split",
        memory_limit: Optional[int | str] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gaccum: model must be a torch.nn.Module, got {type(model).__name__}")
        if on_oom not in ("split", "raise"):
            raise ValueError(f"gaccum: on_oom must be 'split' or 'raise', got {on_oom!r}")
        window: Optional[list[int]] = None
        schedule = as_schedule(accum_steps)
        if schedule is not None:
            accum_steps = schedule
        if plan is not None:
            if schedule is None:  # a schedule overrides the plan's steps; an int must agree
                if accum_steps is not None and accum_steps != plan.accum_steps:
                    raise ValueError(
                        f"gaccum: accum_steps={accum_steps} disagrees with the plan's {plan.accum_steps}; "
                        "pass one of them"
                    )
                accum_steps = plan.accum_steps
            window = list(plan.window)
        if accum_steps is None:
            raise TypeError("gaccum: Accumulator needs accum_steps=N or plan=gaccum.plan(...)")
        self.model = model
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        inner = model.module if self.ddp else model
        first = next(inner.parameters(), None)
        self.memory_limit = check_memory_limit(memory_limit, first.device if first is not None else None)
        if getattr(optimizer, "_gaccum_hook", None) is not None:
            raise RuntimeError("gaccum: this optimizer already has a gaccum hook; call .remove() on it, or use the "
                               "hook alone")
        holder = getattr(optimizer, "_gaccum_accumulator", None)
        if holder is not None and holder() is not None:
            raise RuntimeError("gaccum: this optimizer already has a gaccum Accumulator; call .close() on it first "
                               "(one Accumulator per optimizer)")
        self.engine = _Engine(
            list(inner.parameters()), optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
            max_grad_norm=max_grad_norm, master_grads=master_grads, nonfinite=nonfinite, distributed=self.ddp,
            names={id(p): n for n, p in inner.named_parameters()},
        )
        self.engine.window = window
        optimizer._gaccum_accumulator = weakref.ref(self)  # type: ignore[attr-defined]
        self.drop_last = drop_last
        self.on_oom = on_oom
        self.peak_memory: Optional[int] = None  # the last micro_batch()'s peak under memory_limit
        self._touch: Optional[TouchTracker] = None
        self.engine.callbacks.extend(callbacks)
        self._in_micro = False
        self._backward_done = False
        self._synced_this_micro = False
        self._fed_size: Optional[int] = None
        self._warned_size = False
        self._size_hook = (inner.register_forward_pre_hook(self._record_size, with_kwargs=True)
                           if window is not None else None)
        if warn_batchnorm:
            names = batch_norm_layers(inner)
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                warnings.warn(
                    f"gaccum: {shown} compute statistics over each micro-batch, not the effective batch, so "
                    "accumulation does not reproduce large-batch training for them; consider GroupNorm or "
                    "LayerNorm, or SyncBatchNorm across ranks",
                    UserWarning,
                    stacklevel=2,
                )

    # -- read-only state -----------------------------------------------------
    @property
    def accum_steps(self) -> int:
        return self.engine.accum_steps

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def optimizer_steps(self) -> int:
        return self.engine.optimizer_steps

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    @property
    def micro_steps(self) -> int:
        return self.engine.micro_steps

    @property
    def micro_batch_limit(self) -> Optional[int]:
        """The largest micro-batch that ran after an out-of-memory split (None: never split)."""
        return self.engine.micro_batch_limit

    @property
    def oom_splits(self) -> int:
        return self.engine.oom_splits

    @property
    def micro_in_window(self) -> int:
        return self.engine.micro

    @property
    def master_grad_bytes(self) -> int:
        return self.engine.masters.nbytes if self.engine.masters is not None else 0

    @property
    def uses_master_grads(self) -> bool:
        return self.engine.masters is not None

    def add_callback(self, fn: Callable[[StepResult, Any], None]) -> None:
        self.engine.callbacks.append(fn)

    # -- the loop --------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.engine.epoch

    def set_epoch(self, epoch: int) -> None:
        """For a schedule by epoch: call at the start of each epoch (takes effect between windows)."""
        self.engine.set_epoch(epoch)

    def _default_items(self) -> float:
        window = self.engine.plan_window()
        if window is not None:
            return float(window[self.engine.micro % len(window)])
        return 1.0

    @contextlib.contextmanager
    def accumulate(self, last: Optional[bool] = None) -> Iterator["Accumulator"]:
        """One micro-step. Under DDP, gradient sync only on the window's last.

        ``last=True`` says this micro-step ends the data (so a short last window
        syncs through DDP's own reducer instead of a manual all-reduce in flush()).
        """
        if self._in_micro:
            raise RuntimeError("gaccum: accumulate() blocks cannot be nested")
        eng = self.engine
        is_last = eng.micro + 1 >= eng.accum_steps or bool(last)
        sync = is_last and eng.masters is None
        ctx = self.model.no_sync() if (self.ddp and not sync) else contextlib.nullcontext()
        self._in_micro, self._backward_done, self._synced_this_micro = True, False, sync
        self._last_flag = bool(last)
        self._fed_size = None
        self._backward_called = False
        try:
            with ctx:
                yield self
        finally:
            self._in_micro = False
        if not self._backward_called:
            raise RuntimeError(
                "gaccum: the accumulate() block ended without acc.backward(loss). A plain loss.backward() adds to "
                "the gradients but never reaches the window's count, so no optimizer step would ever come; call "
                "acc.backward(loss) (or acc.backward(loss, num_items=n)) inside the block"
            )

    def backward(self, loss: torch.Tensor, num_items: Optional[int | float | torch.Tensor] = None) -> StepResult:
        """Backward of one micro-batch's mean loss; steps when the window is full.

        ``num_items``: the number of items ``loss`` is the mean over (e.g. tokens
        that are not padding). Then the window's gradient is the mean over all
        its items, not a mean of per-micro-batch means.
        """
        if not self._in_micro:
            raise RuntimeError("gaccum: call acc.backward(loss) inside `with acc.accumulate():`")
        self._backward_called = True
        if self._backward_done:
            raise RuntimeError("gaccum: backward() was already called in this accumulate() block; one per micro-batch")
        _check_loss(loss)
        eng = self.engine
        n = self._default_items() if num_items is None else _check_items(num_items)
        if num_items is None and self._fed_size is not None and eng.plan_window() is not None and self._fed_size != n:
            self._warn_fed_size(int(n))
        if self._skip_nonfinite(loss):
            self._backward_done = True
            return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)
        if num_items is not None:
            eng.items_mode = True
        self._weighted_backward(loss, n)
        self._backward_done = True
        return self._end_micro(n, self._synced_this_micro, self._last_flag)

    def _record_size(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The size of the micro-batch the model is fed (its first forward in an accumulate() block)."""
        if self._in_micro and self._fed_size is None:
            try:
                self._fed_size = batch_size((args, kwargs))
            except ValueError:
                self._fed_size = None

    def _warn_fed_size(self, expected: int) -> None:
        if self._warned_size:
            return
        self._warned_size = True
        warnings.warn(
            f"gaccum: the model was fed a micro-batch of {self._fed_size} samples where the plan's window "
            f"({' + '.join(map(str, self.engine.window or []))}) has {expected}; without num_items each micro-batch "
            "is weighted as the plan's size, so the window is no longer the mean over its samples. Feed the plan's "
            "window with plan.loader(dataset) (or gaccum.window_loader), pass num_items=, or use acc.micro_batch(), "
            "which weighs every batch by its size. Shown once",
            RuntimeWarning,
            stacklevel=3,
        )

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when a non-finite loss is to be skipped; raises under nonfinite='raise'."""
        eng = self.engine
        if eng.scaler is not None or bool(torch.isfinite(loss.detach()).all()):
            return False
        if eng.nonfinite == "raise":
            raise FloatingPointError(
                f"gaccum: the loss is {float(loss.detach())} (non-finite) and no GradScaler is set; nothing was accumulated. "
                "Pass nonfinite='skip' to skip such micro-batches"
            )
        eng.skipped_micro_batches += 1
        return True

    def _weighted_backward(self, loss: torch.Tensor, n: float, n0: Optional[float] = None) -> None:
        """Backward at weight n / R; the loss enters the window's mean loss only once its gradient is in."""
        eng = self.engine
        w = eng.weight_for(n, n0)
        if eng.masters is not None:
            eng.begin_micro(w)
            scaled = loss
        else:
            scaled = loss * w
        if eng.scaler is not None:
            scaled = eng.scaler.scale(scaled)
        scaled.backward()
        eng.add_loss(loss, n)

    def _end_micro(self, n: float, synced: bool, last: bool) -> StepResult:
        eng = self.engine
        eng.end_micro(n, synced)
        if eng.micro >= eng.accum_steps or last:
            return eng.step(partial=eng.micro < eng.accum_steps)
        return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)

    # -- gaccum runs the forward: out-of-memory splitting --------------------------
    def micro_batch(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Any], *, last: bool = False) -> StepResult:
        """One micro-batch: forward, backward, and the optimizer step when the window is full.

        ``loss_fn(model, batch)`` returns the batch's mean loss, or ``(loss,
        num_items)`` for a loss normalised by token count. Because gaccum runs
        the forward here, an out-of-memory error does not end training: the
        micro-batch is split in two and each half accumulated with its share of
        the weight, so the window's effective batch and gradient stay the same,
        and later micro-batches run in pieces of the size that fitted
        (``micro_batch_limit``; ``oom_splits`` counts the splits).
        """
        if self._in_micro:
            raise RuntimeError("gaccum: micro_batch() inside an accumulate() block; use one or the other")
        if not callable(loss_fn):
            raise TypeError(f"gaccum: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        eng = self.engine
        size = batch_size(batch)
        is_last = eng.micro + 1 >= eng.accum_steps or bool(last)
        sync = is_last and eng.masters is None
        if self._touch is None and self.on_oom == "split" and not self.ddp:
            self._touch = TouchTracker(eng.params, eng.masters)
        # gaccum sees the batch here: every micro-batch weighs what it holds (a short last one too)
        run = _Run(size=size, n_full=float(size), loss_fn=loss_fn)
        limit = eng.micro_batch_limit
        pieces = [batch] if limit is None or size <= limit else split_batch(batch, limit)
        self.peak_memory = None
        self._in_micro = True
        try:
            for i, piece in enumerate(pieces):
                self._piece(piece, run, sync and i == len(pieces) - 1, frozenset())
        finally:
            self._in_micro = False
        if run.pieces == 0:  # every piece had a non-finite loss and was skipped
            return StepResult(micro_step=eng.micro_steps, optimizer_step=eng.optimizer_steps)
        eng.items_mode = True  # real counts: under DDP the window's total is summed over ranks
        return self._end_micro(run.items, sync, bool(last))

    def _piece(self, piece: Any, run: "_Run", sync: bool, done_params: frozenset) -> None:
        k = batch_size(piece)
        try:
            self._attempt(piece, k, run, sync, done_params)
            return
        except Exception as exc:  # noqa: BLE001 - only an OOM is handled; the rest re-raised as is
            if not is_oom(exc) or self.on_oom != "split":
                raise
            if self.ddp:
                raise torch.OutOfMemoryError(
                    f"{exc}\ngaccum: splitting a micro-batch on out-of-memory is not supported under DDP (the "
                    "ranks' reducers would disagree); plan with gaccum.plan, which agrees on the smallest budget"
                ) from exc
            if k == 1:
                raise torch.OutOfMemoryError(
                    f"{exc}\ngaccum: out of memory on a micro-batch of 1 sample; nothing smaller to split into. "
                    "Free memory, or use activation checkpointing or a smaller model"
                ) from exc
        # Out of the except block: the failed attempt's frame and its activations are freed.
        eng = self.engine
        if eng.masters is not None:
            eng.masters.recover()
        if eng.params[0].device.type == "cuda":
            torch.cuda.empty_cache()
        assert self._touch is not None
        reached = set(self._touch.touched)  # these already hold this piece's whole, weighted contribution
        new = halves(k)
        if eng.micro_batch_limit is None or new < eng.micro_batch_limit:
            eng.micro_batch_limit = new
            warnings.warn(
                f"gaccum: out of memory on a micro-batch of {k}; split into {new} + {k - new} and carried on. "
                f"The window's effective batch is unchanged; micro-batches now run in pieces of at most {new}",
                RuntimeWarning,
                stacklevel=4,
            )
        eng.oom_splits += 1
        if reached and all(p in reached or p in done_params for p in eng.params if p.requires_grad):
            # the backward had reached every parameter: the piece is in, whole
            if run.attempt_loss is not None:
                eng.add_loss(run.attempt_loss, run.attempt_items)
            run.add(run.attempt_items, run.attempt_items_mode)
            return
        parts = split_batch(piece, new)
        for j, part in enumerate(parts):
            self._piece(part, run, sync and j == len(parts) - 1, done_params | reached)

    def _attempt(self, piece: Any, k: int, run: "_Run", sync: bool, done_params: frozenset) -> None:
        eng = self.engine
        ddp_ctx = self.model.no_sync() if (self.ddp and not sync) else contextlib.nullcontext()
        watch = self._touch.attempt(done_params) if self._touch is not None else contextlib.nullcontext()
        budget: Any = contextlib.nullcontext()
        if self.memory_limit is not None:
            extra = batch_tensors(piece) + [p.grad for p in done_params if p.grad is not None]
            if eng.masters is not None:
                assert eng.master_weights is not None
                extra += [eng.masters.flat, *eng.master_weights.weights]
            budget = MemoryBudget(self.memory_limit, self.model, eng.optimizer, extra)
        run.attempt_loss = None
        with budget, watch, ddp_ctx:
            loss, items = _loss_and_items(run.loss_fn(self.model, piece))
            n = items if items is not None else run.n_full * k / run.size
            run.attempt_items, run.attempt_items_mode = n, items is not None
            if self._skip_nonfinite(loss):
                return
            run.attempt_loss = loss.detach()
            self._weighted_backward(loss, n, n * run.size / k)
        if self.memory_limit is not None:
            self.peak_memory = max(self.peak_memory or 0, budget.peak)
            eng.window_peak = max(eng.window_peak, budget.peak)
        run.add(n, items is not None)

    def flush(self, drop: Optional[bool] = None) -> Optional[StepResult]:
        """End a partial last window: step it weighted by its real size, or drop it.

        Under DDP every rank must call it (it may all-reduce).
        """
        if self._in_micro:
            raise RuntimeError("gaccum: flush() inside an accumulate() block; call it after the loop")
        eng = self.engine
        if eng.micro == 0:
            return None
        if self.drop_last if drop is None else drop:
            eng.discard()
            return None
        return eng.step(partial=True)

    def zero_grad(self) -> None:
        """Discard the current window (its gradients) without stepping."""
        self.engine.discard()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Remove hooks and give the optimizer its original parameters back."""
        if self._size_hook is not None:
            self._size_hook.remove()
            self._size_hook = None
        holder = getattr(self.engine.optimizer, "_gaccum_accumulator", None)
        if holder is not None and holder() is self:
            self.engine.optimizer._gaccum_accumulator = None  # type: ignore[attr-defined]
        if self._touch is not None:
            self._touch.remove()
            self._touch = None
        if self.engine.masters is not None:
            self.engine.masters.remove()
        if self.engine.master_weights is not None:
            self.engine.master_weights.restore()
