"""The boundary: what happens once a window's gradient is final, for every front-end.

Unscale (GradScaler), check for inf/NaN, clip, step, update the scaler, copy FP32
masters back, step the scheduler, and say what happened. The Accumulator, the
hook and ``micro_batch`` all run this one piece of code; the hook's difference
(the user's own ``scaler.unscale_`` / clip may already have run) is an argument.

A failure anywhere inside (a flaky optimizer, a scheduler, a pre-step callback)
leaves a known state: the GradScaler's per-optimizer state is reset (so the next
window's ``unscale_`` works), :attr:`Boundary.stepped` says whether the optimizer
had taken its step, and the caller discards the window and re-raises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .._checks import warn_user
from .._dist import ranks_agree


def grads_finite(grads: list[torch.Tensor], across_ranks: bool = False) -> bool:
    """One fused pass over the window's gradients at the boundary (a single sync), not one per micro-step.

    Sharded (DTensor) gradients are checked on this rank's shard; ``across_ranks`` makes every rank
    agree (a shard elsewhere may hold the inf), so they all skip together.
    """
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    ok = all(bool(torch.stack(torch._foreach_norm(chunk)).isfinite().all())
             for chunk in _by_device_dtype(local)) if local else True
    if across_ranks:
        # every rank calls it (a rank with no gradient too); on the device its backend reduces (NCCL: the GPU)
        ok = ranks_agree(ok, local[0].device if local else torch.device("cpu"))
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
    way to learn this (pytorch/pytorch#67590). ``discarded`` is True when the
    window was dropped because something raised (a backward, the optimizer):
    read it from ``acc.last_result`` after catching the exception.
    """

    stepped: bool = False
    skipped: bool = False
    boundary: bool = False
    grad_norm: Optional[float] = None
    loss_scale: Optional[float] = None
    loss: Optional[float] = None  # at a boundary: the window's mean loss over its items (this rank's)
    micro_step: int = 0
    optimizer_step: int = 0
    discarded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_float(t: torch.Tensor) -> float:
    """A norm as a number; FSDP2's clip returns it as a (replicated) DTensor."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@dataclass(frozen=True)
class Outcome:
    skipped: bool
    grad_norm: Optional[float]
    loss_scale: Optional[float]


class Boundary:
    """The optimizer step at a window's end; built once per Accumulator or hook.

    ``real_step`` is the optimizer's own ``step`` (the hook patches ``optimizer.step``);
    ``masters`` / ``master_weights`` are the FP32 master gradients and weights, or None.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, scaler: Optional[torch.amp.GradScaler],
                 scheduler: Any, max_grad_norm: Optional[float], masters: Any, master_weights: Any,
                 sharded: bool, real_step: Callable[[], Any]) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.masters = masters
        self.master_weights = master_weights
        self.sharded = sharded
        self.real_step = real_step
        # called with the tensors whose .grad is the window's final gradient, before the optimizer steps
        self.pre_step_hooks: list[Callable[[Sequence[torch.Tensor]], None]] = []
        self.stepped = False  # the optimizer took its step in the last run (also when a later part raised)
        self._warned_nonfinite = False

    def weights(self) -> Sequence[torch.Tensor]:
        """What the optimizer steps: the FP32 master weights, or the model's parameters."""
        return self.master_weights.weights if self.master_weights is not None else [
            p for g in self.optimizer.param_groups for p in g["params"]]

    def run(self, *, unscaled_by_user: bool = False) -> Outcome:
        """unscale -> inf/NaN check -> clip -> step -> scaler update -> copy back -> scheduler."""
        self.stepped = False
        scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        try:
            return self._run(scale, unscaled_by_user)
        except BaseException:
            if self.scaler is not None:
                # reset the scaler's per-optimizer state (its public way: update with the scale it had)
                self.scaler.update(new_scale=scale)
            raise

    def _run(self, scale: Optional[float], unscaled_by_user: bool) -> Outcome:
        params = self.weights()
        if self.scaler is not None and not unscaled_by_user:
            self.scaler.unscale_(self.optimizer)
        for fn in self.pre_step_hooks:
            fn(params)
        skipped = not self._finite(params)
        grad_norm = None
        if self.max_grad_norm is not None and not (skipped and self.scaler is None):
            grad_norm = as_float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if skipped and self.scaler is None:
            self.warn_nonfinite()
        elif not skipped or self.scaler is not None:
            if self.master_weights is not None:
                self.master_weights.refresh_stale()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips by itself on inf/NaN
            else:
                self.real_step()
            self.stepped = not skipped
            if self.scaler is not None:
                self.scaler.update()
        if self.stepped:
            if self.master_weights is not None:
                self.master_weights.copy_back()
            if self.scheduler is not None:
                self.scheduler.step()
        return Outcome(skipped=skipped, grad_norm=grad_norm, loss_scale=scale)

    def _finite(self, params: Sequence[torch.Tensor]) -> bool:
        if self.scaler is not None:
            found = self.scaler._found_inf_per_device(self.optimizer)  # what scaler.step will read
            return sum(float(v) for v in found.values()) == 0
        if self.masters is not None:
            return float(self.masters.found_inf) == 0
        return grads_finite([p.grad for p in params if p.grad is not None], across_ranks=self.sharded)

    def warn_nonfinite(self) -> None:
        """One rule on every path without a GradScaler: an inf/NaN window is discarded, counted, said once."""
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warn_user(
                "gaccum: inf/NaN in the accumulated gradient and no GradScaler; the window is discarded and counted "
                "in skipped_steps (StepResult.skipped). This warning is shown once",
                RuntimeWarning,
            )
