"""Argument checks of the accumulation front-ends: each wrong value is named with what to pass instead.

Every check runs before gaccum touches the model or the optimizer, so a refused call changes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch

from .._checks import is_int
from ..windows import Window

HALF = (torch.float16, torch.bfloat16)


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


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"gaccum: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def check_unclaimed(optimizer: Any) -> None:
    """One Accumulator or hook per optimizer: two would each step it and each keep a window."""
    holder = getattr(optimizer, "_gaccum_owner", None)
    owner = holder() if holder is not None else None
    if owner is not None:
        kind, verb = ("hook", "remove") if type(owner).__name__ == "AccumulationHook" else ("Accumulator", "close")
        raise RuntimeError(f"gaccum: this optimizer already has a gaccum {kind}; call .{verb}() on it first "
                           "(one Accumulator or hook per optimizer)")


def check_scaler_and_scheduler(scaler: Any, scheduler: Any, optimizer: Any = None) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"gaccum: scaler must be a torch.amp.GradScaler (or None), got {scaler!r}; e.g. "
                        "scaler=torch.amp.GradScaler('cuda') for fp16")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"gaccum: scheduler must be an LR scheduler with a step() method (e.g. "
                        f"torch.optim.lr_scheduler.LambdaLR(optimizer, ...)), got {scheduler!r}")
    owner = getattr(scheduler, "optimizer", None)
    if optimizer is not None and isinstance(owner, torch.optim.Optimizer) and owner is not optimizer:
        raise ValueError("gaccum: the scheduler was built on another optimizer, so stepping it would never change "
                         "this optimizer's learning rate; build it on the optimizer you pass to gaccum")


def check_accum_steps(accum_steps: Any, name: str = "accum_steps") -> int:
    if not is_int(accum_steps):
        raise TypeError(f"gaccum: {name} must be an int >= 1, got {accum_steps!r} ({type(accum_steps).__name__})")
    if accum_steps < 1:
        raise ValueError(f"gaccum: {name} must be >= 1, got {accum_steps}")
    return accum_steps


def check_max_grad_norm(value: Any) -> Optional[float]:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"gaccum: max_grad_norm must be a positive number or None, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"gaccum: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


class SavedPlan:
    """What the Accumulator reads of a plan saved with ``Plan.to_dict()``: steps, window, master_grads."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.accum_steps = d["accum_steps"]
        self.window = Window.of(d["window"])
        self.master_grads = d.get("master_grads")


def check_plan(plan: Any) -> Any:
    """A gaccum Plan (or None); a plan saved with ``to_dict()`` is read as it was saved."""
    if plan is None:
        return None
    if hasattr(plan, "accum_steps") and hasattr(plan, "window"):
        return plan
    if isinstance(plan, dict):
        try:
            return SavedPlan(plan)
        except (KeyError, TypeError) as exc:
            raise TypeError(f"gaccum: plan= got a dict that is not a saved plan ({exc}); pass the gaccum.Plan that "
                            "gaccum.plan(...) returns, or its to_dict()") from exc
    raise TypeError(f"gaccum: plan= takes the gaccum.Plan that gaccum.plan(...) returns, got {type(plan).__name__}")


def check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"gaccum: loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"gaccum: loss must be a scalar (mean-reduced), got shape {tuple(loss.shape)}; reduce it with .mean()"
        )
    if not loss.requires_grad:
        raise ValueError("gaccum: loss does not require grad (computed under no_grad, or detached?)")


def check_items(num_items: Any) -> float:
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
