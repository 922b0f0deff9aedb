"""The Accumulator: gradient accumulation for a training loop you write.

``accumulate()`` / ``backward()`` for a loop that runs its own forward,
``micro_batch()`` (autosplit.py) for one that lets gaccum run it and split a
micro-batch that runs out of memory; both feed the engine (engine.py), whose
boundary step (boundary.py) is shared with the hook (hook.py).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import _dist
from ._checks import warn_user
from ._fsdp import check_unreduced_grads, fsdp_root, gradient_sync, load_unreduced_grads, unreduced_grads
from .autosplit import MicroBatchMixin, TouchTracker, check_memory_limit
from .batch import batch_size
from .boundary import StepResult
from .engine import _check_items, _check_loss, _Engine, check_unclaimed
from .schedule import AccumulationSchedule, as_schedule


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of layers whose forward depends on the micro-batch's statistics."""
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Accumulator(MicroBatchMixin):
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
    :meth:`flush` discard a partial last window. Without a GradScaler an
    inf/NaN gradient discards the window at its end (one fused check, warned
    once, counted in ``skipped_steps``); ``nonfinite='raise'`` or ``'skip'``
    also check each micro-batch's loss (a sync per micro-step) and raise, or
    leave that micro-batch out. With a GradScaler, the scaler skips. ``on_oom="split"`` (the default)
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
        nonfinite: str = "discard",
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
        self.fsdp = fsdp_root(model)
        inner = model.module if self.ddp else model
        first = next(inner.parameters(), None)
        self.memory_limit = check_memory_limit(memory_limit, first.device if first is not None else None)
        check_unclaimed(optimizer)
        self.engine = _Engine(
            list(inner.parameters()), optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
            max_grad_norm=max_grad_norm, master_grads=master_grads, nonfinite=nonfinite, distributed=self.ddp or self.fsdp is not None,
            names={id(p): n for n, p in inner.named_parameters()},
        )
        self.engine.window = window
        self.engine.sharded = self.fsdp is not None
        if self.fsdp is not None and self.engine.masters is not None:
            self.engine.masters.remove()
            if self.engine.master_weights is not None:
                self.engine.master_weights.restore()
            raise ValueError(
                "gaccum: FP32 master gradients under FSDP2 are not supported; keep FP32 sharded parameters and let "
                "FSDP2 compute in bf16 (fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                "reduce_dtype=torch.float32))), or pass master_grads=False"
            )
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
                warn_user(
                    f"gaccum: {shown} compute statistics over each micro-batch, not the effective batch, so "
                    "accumulation does not reproduce large-batch training for them; consider GroupNorm or "
                    "LayerNorm, or SyncBatchNorm across ranks",
                    UserWarning,
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
        ctx = self.sync_context(sync)
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
        warn_user(
            f"gaccum: the model was fed a micro-batch of {self._fed_size} samples where the plan's window "
            f"({' + '.join(map(str, self.engine.window or []))}) has {expected}; without num_items each micro-batch "
            "is weighted as the plan's size, so the window is no longer the mean over its samples. Feed the plan's "
            "window with plan.loader(dataset) (or gaccum.window_loader), pass num_items=, or use acc.micro_batch(), "
            "which weighs every batch by its size. Shown once",
            RuntimeWarning,
        )

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when a non-finite loss is to be skipped; raises under nonfinite='raise'."""
        eng = self.engine
        if eng.scaler is not None or eng.nonfinite == "discard" or bool(torch.isfinite(loss.detach()).all()):
            return False  # the boundary's one check sees what a non-finite loss leaves in the gradient
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
    def sync_context(self, sync: bool) -> Any:
        """DDP's no_sync, or FSDP2's requires_gradient_sync, for a micro-step that must not reduce."""
        if self.fsdp is not None:
            return gradient_sync(self.fsdp, sync)
        return self.model.no_sync() if (self.ddp and not sync) else contextlib.nullcontext()

    def _check_fsdp_window_end(self) -> None:
        if self.fsdp is not None and self.engine.micro and not self.engine.last_synced:
            raise RuntimeError(
                "gaccum: under FSDP2 the gradients of micro-steps that did not sync live inside FSDP, unreduced; "
                "they can be neither stepped nor dropped after the fact. Mark the data's last micro-step instead: "
                "acc.accumulate(last=True) or acc.micro_batch(batch, loss_fn, last=True). Nothing was changed"
            )

    def flush(self, drop: Optional[bool] = None) -> Optional[StepResult]:
        """End a partial last window: step it weighted by its real size, or drop it.

        Under DDP every rank must call it (it may all-reduce).
        """
        if self._in_micro:
            raise RuntimeError("gaccum: flush() inside an accumulate() block; call it after the loop")
        eng = self.engine
        if eng.micro == 0:
            return None
        self._check_fsdp_window_end()
        if self.drop_last if drop is None else drop:
            eng.discard()
            return None
        return eng.step(partial=True)

    def zero_grad(self) -> None:
        """Discard the current window (its gradients) without stepping."""
        self._check_fsdp_window_end()
        self.engine.discard()

    def state_dict(self) -> dict[str, Any]:
        """The window so far and the counters; resume with :meth:`load_state_dict`, exactly.

        Under FSDP2 mid-window, the micro-steps that did not sync live inside FSDP, unreduced: they are
        saved too (this rank's, unsharded), so each rank saves and loads its own state_dict.
        """
        state = self.engine.state_dict()
        if self.fsdp is not None and self.engine.micro:
            state["fsdp_unreduced"] = unreduced_grads(self.fsdp)
            state["fsdp_rank"] = (_dist.rank(), _dist.world_size())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checks everything first, then assigns: a checkpoint that does not fit changes nothing."""
        unreduced = state.get("fsdp_unreduced")
        fsdp_params: list[Any] = []
        if self.fsdp is not None and state.get("micro", 0) and unreduced is None:
            raise ValueError("gaccum: a mid-window checkpoint without FSDP2's unreduced gradients cannot resume "
                             "under FSDP2; save it from the FSDP2 model (acc.state_dict() on every rank)")
        if unreduced is not None:
            if self.fsdp is None:
                raise ValueError("gaccum: this checkpoint was taken mid-window under FSDP2; load it into an "
                                 "Accumulator over the same fully_shard model")
            here = (_dist.rank(), _dist.world_size())
            if tuple(state["fsdp_rank"]) != here:
                raise ValueError(f"gaccum: this mid-window checkpoint is rank {state['fsdp_rank'][0]} of "
                                 f"{state['fsdp_rank'][1]}; this process is rank {here[0]} of {here[1]}. Each rank "
                                 "loads its own (the unreduced gradients differ per rank)")
            fsdp_params = check_unreduced_grads(self.fsdp, unreduced)
        self.engine.load_state_dict(state)
        if unreduced is not None:
            load_unreduced_grads(fsdp_params, unreduced)

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
