"""The window's arithmetic: weights, totals and the boundary correction, shared by Accumulator and hook.

How the weighting works (the part hand-written loops get wrong). Every
micro-step i of a window carries a count n_i: ``num_items`` when the user gives
it (tokens that are not padding), the micro-batch's size when gaccum runs the
forward (``micro_batch``), the planned micro-batch size for an uneven window,
else 1. Its gradient enters the accumulator with weight n_i / R, where R is the
*expected* window total (n_0 x N, or the plan's total): magnitudes stay those of
an ordinary mean loss, so fp16 scaling behaves as usual. At the boundary the
true total T is known (all-reduced under DDP) and one correction c = W * R / T
makes the gradient the mean over every item of the window on every rank. For
full, even windows c == 1 and no pass is spent on it. A partial last window is
just a window with a smaller T, so ``flush()`` needs no special case.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._checks import is_int, warn_user
from ._dist import all_reduce_scalars, world_size
from .boundary import BoundaryStep, StepResult
from .master import HALF, MasterGrads, MasterWeights
from .schedule import AccumulationSchedule, as_schedule, rescale_lr


def trained_params(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The trainable ones of ``params`` that ``optimizer`` holds: what a window accumulates and a plan probes."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("gaccum: the model has no trainable parameters (every parameter has requires_grad=False)")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out = [p for p in trainable if id(p) in held]
    if not out:
        raise ValueError(
            "gaccum: the optimizer does not hold any of the model's trainable parameters; "
            "build it from model.parameters() (or the trainable ones) of this model"
        )
    return out


def resolve_master_grads(choice: bool | str, params: Sequence[torch.Tensor]) -> bool:
    """The one rule (Accumulator, hook, plan): 'auto' keeps FP32 masters when a parameter is half precision."""
    if choice not in ("auto", True, False):
        raise ValueError(f"gaccum: master_grads must be 'auto', True or False, got {choice!r}")
    use = any(p.dtype in HALF for p in params) if choice == "auto" else bool(choice)
    if use and any(p.dtype not in (torch.float32, *HALF) for p in params):
        raise ValueError(
            "gaccum: FP32 master gradients are for float16/bfloat16/float32 parameters; a float64 model "
            "accumulates exactly in .grad (pass master_grads=False)"
        )
    return use


def check_unclaimed(optimizer: Any) -> None:
    """One Accumulator or hook per optimizer: two would each step it and each keep a window."""
    if getattr(optimizer, "_gaccum_hook", None) is not None:
        raise RuntimeError("gaccum: this optimizer already has a gaccum hook; call .remove() on it first "
                           "(one Accumulator or hook per optimizer)")
    holder = getattr(optimizer, "_gaccum_accumulator", None)
    if holder is not None and holder() is not None:
        raise RuntimeError("gaccum: this optimizer already has a gaccum Accumulator; call .close() on it first "
                           "(one Accumulator or hook per optimizer)")


def check_scaler_and_scheduler(scaler: Any, scheduler: Any) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"gaccum: scaler must be a torch.amp.GradScaler (or None), got {scaler!r}; e.g. "
                        "scaler=torch.amp.GradScaler('cuda') for fp16")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"gaccum: scheduler must be an LR scheduler with a step() method (e.g. "
                        f"torch.optim.lr_scheduler.LambdaLR(optimizer, ...)), got {scheduler!r}")


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


class _Engine(BoundaryStep):
    """The window's arithmetic and state, shared by the Accumulator and the hook; the step itself is BoundaryStep's."""

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
        nonfinite: str = "discard",
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
        if nonfinite not in ("discard", "raise", "skip"):
            raise ValueError(f"gaccum: nonfinite must be 'discard', 'raise' or 'skip', got {nonfinite!r}")
        self.params = trained_params(params, optimizer)
        use_masters = resolve_master_grads(master_grads, self.params)
        check_scaler_and_scheduler(scaler, scheduler)
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
        self.optimizer = optimizer
        self.scaler = scaler if (scaler is not None and scaler.is_enabled()) else None
        self.scheduler = scheduler
        self.lr_scheduler = scheduler  # whose base_lrs a schedule's LR rule rescales (the hook steps its own)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.distributed = distributed
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
        self.sharded = False  # FSDP2: gradients are DTensor shards, so checks agree across ranks
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
