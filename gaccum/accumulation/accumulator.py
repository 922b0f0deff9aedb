"""The Accumulator: gradient accumulation for a training loop you write.

``accumulate()`` / ``backward()`` for a loop that runs its own forward,
``micro_batch()`` (micro_batch.py) for one that lets gaccum run it and split a
micro-batch that runs out of memory; both drive the core (core.py), whose
boundary (boundary.py) is shared with the hook (hook.py).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .. import _dist
from .._checks import warn_user
from .._fsdp import check_unreduced_grads, fsdp_root, gradient_sync, load_unreduced_grads, unreduced_grads
from ..batch import fed_size
from ..schedule import AccumulationSchedule, as_schedule
from . import checkpoint
from .boundary import StepResult
from .checks import check_choice, check_items, check_loss, check_plan
from .core import FLUSH, MICRO_STEP, AccumulationCore
from .micro_batch import MicroBatchRunner, check_memory_limit
from .state import WindowState
from .view import reads_core


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of layers whose forward depends on the micro-batch's statistics."""
    return [f"{name} ({type(m).__name__})" if name else type(m).__name__
            for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _resolve_plan(plan: Any, accum_steps: Any, master_grads: bool | str) -> tuple[Any, Any, Any]:
    """(accum_steps, the plan's window, master_grads): a plan fills in what the caller left out."""
    plan = check_plan(plan)
    schedule = as_schedule(accum_steps)
    if schedule is not None:
        accum_steps = schedule
    if plan is None:
        if accum_steps is None:
            raise TypeError("gaccum: Accumulator needs accum_steps=N or plan=gaccum.plan(...)")
        return accum_steps, None, master_grads
    if schedule is None:  # a schedule overrides the plan's steps; an int must agree
        if accum_steps is not None and accum_steps != plan.accum_steps:
            raise ValueError(f"gaccum: accum_steps={accum_steps} disagrees with the plan's {plan.accum_steps}; "
                             "pass one of them")
        accum_steps = plan.accum_steps
    planned = getattr(plan, "master_grads", None)
    if planned is None:
        pass
    elif master_grads == "auto":
        master_grads = bool(planned)  # what the plan measured is what trains
    elif bool(master_grads) != bool(planned):
        raise ValueError(f"gaccum: master_grads={master_grads} disagrees with the plan, which was measured with "
                         f"master_grads={planned}; plan again with master_grads={master_grads}, or leave "
                         "master_grads unset")
    return accum_steps, plan.window, master_grads


class _SizeProbe:
    """A forward pre-hook recording the size of the micro-batch the model is fed; holds its owner weakly."""

    def __init__(self, owner: "Accumulator") -> None:
        self.owner = weakref.ref(owner)

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        acc = self.owner()
        if acc is not None and acc._in_block and acc._fed_size is None:
            acc._fed_size = fed_size(args, kwargs)


@reads_core
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
    (accum_steps, window and master_grads from it). ``master_grads='auto'`` keeps FP32 master
    gradients/weights for fp16/bf16 parameters. ``drop_last=True`` makes
    :meth:`flush` discard a partial last window. Without a GradScaler an
    inf/NaN gradient discards the window at its end (one fused check, warned
    once, counted in ``skipped_steps``); ``nonfinite='raise'`` or ``'skip'``
    also check each micro-batch's loss (a sync per micro-step) and raise, or
    leave that micro-batch out. With a GradScaler, the scaler skips. ``on_oom="split"`` (the default)
    lets :meth:`micro_batch` survive out-of-memory; ``memory_limit`` is a CPU
    budget that raises it like a GPU would (the planner's ``plan.budget``).

    States (:attr:`state`): EMPTY -> IN_MICRO_STEP (inside ``accumulate()`` or ``micro_batch()``) ->
    ACCUMULATING -> ... -> AT_BOUNDARY (the optimizer step) -> EMPTY; :meth:`close` -> CLOSED.
    A backward or an optimizer step that raises discards the window (``discarded_windows``,
    ``last_result.discarded``) and the next micro-step starts a new one. An Accumulator that is
    garbage collected without :meth:`close` is closed then.
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
        check_choice("on_oom", on_oom, ("split", "raise"))
        accum_steps, window, master_grads = _resolve_plan(plan, accum_steps, master_grads)
        self.model = model
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.fsdp = fsdp_root(model)
        inner = model.module if self.ddp else model
        first = next(inner.parameters(), None)
        self.memory_limit = check_memory_limit(memory_limit, first.device if first is not None else None)
        self.core = AccumulationCore(
            self, list(inner.parameters()), optimizer, accum_steps, scaler=scaler, scheduler=scheduler,
            max_grad_norm=max_grad_norm, master_grads=master_grads, nonfinite=nonfinite,
            distributed=self.ddp or self.fsdp is not None, sharded=self.fsdp is not None,
            names={id(p): n for n, p in inner.named_parameters()})
        core = self.core
        if self.fsdp is not None and core.masters is not None:
            core.close()  # the one teardown: the optimizer gets its parameters back
            raise ValueError(
                "gaccum: FP32 master gradients under FSDP2 are not supported; keep FP32 sharded parameters and let "
                "FSDP2 compute in bf16 (fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                "reduce_dtype=torch.float32))), or pass master_grads=False")
        core.teardown.on_collect(self)
        core.window.plan = window
        core.callbacks.extend(callbacks)
        self.drop_last = drop_last
        self._runner = MicroBatchRunner(self, core, on_oom)
        self._in_block = False
        self._fed_size: Optional[int] = None
        self._warned_size = False
        # the size of what the model is fed weighs each micro-batch (exact by default, a short last one too)
        core.teardown.handles([inner.register_forward_pre_hook(_SizeProbe(self), with_kwargs=True)])
        if warn_batchnorm:
            self._warn_batchnorm(inner)

    @staticmethod
    def _warn_batchnorm(inner: nn.Module) -> None:
        names = batch_norm_layers(inner)
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warn_user(
                f"gaccum: {shown} compute statistics over each micro-batch, not the effective batch, so "
                "accumulation does not reproduce large-batch training for them; consider GroupNorm or "
                "LayerNorm, or SyncBatchNorm across ranks",
                UserWarning,
            )

    peak_memory = property(lambda self: self._runner.peak_memory,
                           doc="The last micro_batch()'s peak under memory_limit")

    # -- the loop --------------------------------------------------------------
    def sync_context(self, sync: bool) -> Any:
        """DDP's no_sync, or FSDP2's requires_gradient_sync, for a micro-step that must not reduce."""
        if self.fsdp is not None:
            return gradient_sync(self.fsdp, sync)
        return self.model.no_sync() if (self.ddp and not sync) else contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, last: Optional[bool] = None) -> Iterator["Accumulator"]:
        """One micro-step; allowed in EMPTY or ACCUMULATING. Under DDP, gradient sync only on the window's last.

        ``last=True`` says this micro-step ends the data (so a short last window
        syncs through DDP's own reducer instead of a manual all-reduce in flush()).
        Under DDP/FSDP2 the ranks first check that they are all at this micro-step (WindowMismatchError).
        """
        core = self.core
        core.require_open("accumulate")
        core.check_ranks(MICRO_STEP)
        is_last = core.window.next_is_last() or bool(last)
        sync = is_last and core.masters is None
        core.begin_micro()
        self._in_block, self._fed_size, self._last_flag, self._sync = True, None, bool(last), sync
        self._backward_called = False
        try:
            with self.sync_context(sync):
                yield self
        except BaseException as exc:
            core.abort_micro(exc)
            raise
        finally:
            self._in_block = False
        if core.state is WindowState.IN_MICRO_STEP:
            core.leave_micro()  # nothing was added (a backward() refused its loss, or none was called)
        if not self._backward_called:
            raise RuntimeError(
                "gaccum: the accumulate() block ended without acc.backward(loss). A plain loss.backward() adds to "
                "the gradients but never reaches the window's count, so no optimizer step would ever come; call "
                "acc.backward(loss) (or acc.backward(loss, num_items=n)) inside the block")

    def backward(self, loss: torch.Tensor, num_items: Optional[int | float | torch.Tensor] = None) -> StepResult:
        """IN_MICRO_STEP (inside ``accumulate()``): backward of one micro-batch's mean loss; steps when the
        window is full.

        ``num_items``: the number of items ``loss`` is the mean over (e.g. tokens
        that are not padding). Then the window's gradient is the mean over all
        its items, not a mean of per-micro-batch means.
        """
        core = self.core
        if not self._in_block:
            raise RuntimeError("gaccum: call acc.backward(loss) inside `with acc.accumulate():`")
        self._backward_called = True
        if core.state is not WindowState.IN_MICRO_STEP:
            raise RuntimeError("gaccum: backward() was already called in this accumulate() block; one per micro-batch")
        check_loss(loss)
        fed = self._fed_size
        if num_items is not None:
            n = check_items(num_items)
        elif fed is not None:
            n = float(fed)  # exact by default: a micro-batch weighs the samples it holds
        else:
            n = core.window.default_items()
            self._warn_unknown_size()
        if core.skip_nonfinite(loss):
            core.leave_micro()
            return core.micro_result()
        core.backward(loss, n)
        return core.end_micro(n, self._sync, items_mode=num_items is not None or fed is not None,
                              last=self._last_flag, samples=fed)

    def _warn_unknown_size(self) -> None:
        if self._warned_size:
            return
        self._warned_size = True
        warn_user(
            "gaccum: could not tell how many samples this micro-batch holds (the model was not called in the "
            "accumulate() block, or its inputs have no common batch dimension), so micro-batches are weighted "
            f"{'as the plan sizes them' if self.core.window.plan_window() else 'equally'}; a short one would be "
            "weighted wrong. Pass acc.backward(loss, num_items=n), or use acc.micro_batch(batch, loss_fn). Shown once",
            RuntimeWarning,
        )

    def micro_batch(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Any], *, last: bool = False) -> StepResult:
        """EMPTY / ACCUMULATING: one micro-batch, forward, backward, and the optimizer step when the window is full.

        ``loss_fn(model, batch)`` returns the batch's mean loss, or ``(loss,
        num_items)`` for a loss normalised by token count. Because gaccum runs
        the forward here, an out-of-memory error does not end training: the
        micro-batch is split in two and each half accumulated with its share of
        the weight, so the window's effective batch and gradient stay the same,
        and later micro-batches run in pieces of the size that fitted
        (``micro_batch_limit``; ``oom_splits`` counts the splits).
        """
        if self._in_block:
            raise RuntimeError("gaccum: micro_batch() inside an accumulate() block; use one or the other")
        return self._runner.run(batch, loss_fn, last)

    def _check_fsdp_window_end(self) -> None:
        if self.fsdp is not None and self.core.micro and not self.core.window.last_synced:
            raise RuntimeError(
                "gaccum: under FSDP2 the gradients of micro-steps that did not sync live inside FSDP, unreduced; "
                "they can be neither stepped nor dropped after the fact. Mark the data's last micro-step instead: "
                "acc.accumulate(last=True) or acc.micro_batch(batch, loss_fn, last=True). Nothing was changed"
            )

    def flush(self, drop: Optional[bool] = None) -> Optional[StepResult]:
        """EMPTY / ACCUMULATING: end a partial last window, step it weighted by its real size, or drop it.

        Under DDP every rank must call it: the ranks first check that they all hold the same number of
        micro-steps (WindowMismatchError on every rank otherwise), then the window may be all-reduced.
        """
        core = self.core
        core.require_open("flush")
        core.check_ranks(FLUSH)
        if core.micro == 0:
            return None
        self._check_fsdp_window_end()
        if self.drop_last if drop is None else drop:
            core.discard()
            return None
        return core.end_window(partial=True)

    def zero_grad(self) -> None:
        """EMPTY / ACCUMULATING: discard the current window (its gradients) without stepping."""
        self.core.require_open("zero_grad")
        self._check_fsdp_window_end()
        self.core.discard()

    def state_dict(self) -> dict[str, Any]:
        """EMPTY / ACCUMULATING: the window so far and the counters; resume with :meth:`load_state_dict`, exactly.

        Under FSDP2 mid-window, the micro-steps that did not sync live inside FSDP, unreduced: they are
        saved too (this rank's, unsharded), so each rank saves and loads its own state_dict.
        """
        self.core.require_open("state_dict")
        state = checkpoint.save(self.core, lambda: [p.grad for p in self.core.params])
        if self.fsdp is not None and self.core.micro:
            state["fsdp_unreduced"] = unreduced_grads(self.fsdp)
            state["fsdp_rank"] = (_dist.rank(), _dist.world_size())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """EMPTY / ACCUMULATING. Checks everything first, then assigns: a checkpoint that does not fit
        changes nothing."""
        self.core.require_open("load_state_dict")
        checkpoint.check(self.core, state)
        fsdp_params = self._check_fsdp_state(state)
        checkpoint.load(self.core, state, self._put_grads)
        if fsdp_params:
            load_unreduced_grads(fsdp_params, state["fsdp_unreduced"])

    def _put_grads(self, grads: list[Optional[torch.Tensor]]) -> None:
        for p, g in zip(self.core.params, grads):
            p.grad = g

    def _check_fsdp_state(self, state: dict[str, Any]) -> list[Any]:
        unreduced = state.get("fsdp_unreduced")
        if self.fsdp is not None and state.get("micro", 0) and unreduced is None:
            raise ValueError("gaccum: a mid-window checkpoint without FSDP2's unreduced gradients cannot resume "
                             "under FSDP2; save it from the FSDP2 model (acc.state_dict() on every rank)")
        if unreduced is None:
            return []
        if self.fsdp is None:
            raise ValueError("gaccum: this checkpoint was taken mid-window under FSDP2; load it into an "
                             "Accumulator over the same fully_shard model")
        here = (_dist.rank(), _dist.world_size())
        if tuple(state["fsdp_rank"]) != here:
            raise ValueError(f"gaccum: this mid-window checkpoint is rank {state['fsdp_rank'][0]} of "
                             f"{state['fsdp_rank'][1]}; this process is rank {here[0]} of {here[1]}. Each rank "
                             "loads its own (the unreduced gradients differ per rank)")
        return check_unreduced_grads(self.fsdp, unreduced)

    def close(self) -> None:
        """Any state: remove every hook and give the optimizer its original parameters back (idempotent).
        Every later call but ``close()`` raises."""
        self.core.close()
