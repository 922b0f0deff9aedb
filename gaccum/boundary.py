"""The boundary step: what happens once a window's gradient is final.

Unscale (GradScaler), check for inf/NaN, clip, step, copy FP32 masters back,
step the scheduler, count, and say what happened in a :class:`StepResult`. The
window's arithmetic (weights, totals, the correction that makes the gradient the
mean over the window's items) is the engine's (engine.py); the hook, which lets
the user's own unscale/clip/step run, has its own boundary (hook.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ._checks import warn_user
from ._dist import all_reduce_scalars


def grads_finite(grads: list[torch.Tensor], across_ranks: bool = False) -> bool:
    """One fused pass over the window's gradients at the boundary (a single sync), not one per micro-step.

    Sharded (DTensor) gradients are checked on this rank's shard; ``across_ranks`` makes every rank
    agree (a shard elsewhere may hold the inf), so they all skip together.
    """
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    ok = all(bool(torch.stack(torch._foreach_norm(chunk)).isfinite().all())
             for chunk in _by_device_dtype(local)) if local else True
    if across_ranks:
        import torch.distributed as dist

        # every rank calls it (a rank with no gradient too); on the device its backend reduces (NCCL: the GPU)
        device = local[0].device if local else torch.device("cpu")
        ok = all_reduce_scalars([0.0 if ok else 1.0], device, op=dist.ReduceOp.MAX)[0] == 0.0
    return ok


def _by_device_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


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


def _as_float(t: torch.Tensor) -> float:
    """A norm as a number; FSDP2's clip returns it as a (replicated) DTensor."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


class BoundaryStep:
    """Mixed into the engine: the optimizer step at a window's end (the engine supplies the state)."""

    def _optimizer_step(self) -> StepResult:
        """The step. Whatever raises inside it (a scheduler, a hook, the optimizer), the window ends:
        it is discarded, and the counters say whether the optimizer had stepped, so training can go on
        from a known state (the exception is re-raised)."""
        window_loss = float(self.loss_sum) / self.items if self.loss_sum is not None and self.items > 0 else None
        self._stepped_now = False
        try:
            skipped, grad_norm, scale = self._step_window()
        except BaseException:
            if self._stepped_now:
                self.optimizer_steps += 1
            self.discard()
            raise
        if skipped:
            self.skipped_steps += 1
        self.discard()
        result = StepResult(
            stepped=not skipped, skipped=skipped, boundary=True, grad_norm=grad_norm, loss_scale=scale,
            micro_step=self.micro_steps, optimizer_step=self.optimizer_steps, loss=window_loss,
        )
        for cb in self.callbacks:
            cb(result, self)
        return result

    def _step_window(self) -> tuple[bool, Optional[float], Optional[float]]:
        """(skipped, grad norm, loss scale); counts a real step as soon as the optimizer has taken it."""
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
                grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(opt_params, self.max_grad_norm))
            found = sum(float(v) for v in self.scaler._found_inf_per_device(self.optimizer).values())
            skipped = found > 0
            if self.master_weights is not None:
                self.master_weights.refresh_stale()
            self.scaler.step(self.optimizer)
            self._stepped_now = not skipped
            self.scaler.update()
        else:
            for fn in self.pre_step_hooks:
                fn(self)
            if self.masters is not None:
                skipped = float(self.masters.found_inf) > 0
            else:
                skipped = not grads_finite([p.grad for p in opt_params if p.grad is not None],
                                           across_ranks=self.sharded)
            if skipped:
                self.warn_nonfinite()
            else:
                if self.max_grad_norm is not None:
                    grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(opt_params, self.max_grad_norm))
                if self.master_weights is not None:
                    self.master_weights.refresh_stale()
                self.optimizer.step()
                self._stepped_now = True
        if not skipped:
            if self.master_weights is not None:
                self.master_weights.copy_back()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer_steps += 1
            self._stepped_now = False  # counted
        return skipped, grad_norm, scale

    def warn_nonfinite(self) -> None:
        """One rule on every path without a GradScaler: an inf/NaN window is discarded, counted, said once."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warn_user(
                "gaccum: inf/NaN in the accumulated gradient and no GradScaler; the window is discarded and counted "
                "in skipped_steps (StepResult.skipped). This warning is shown once",
                RuntimeWarning,
            )
