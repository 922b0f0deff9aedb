"""Accelerate: a plan gives the ``Accelerator`` and its dataloader in one call.

``accelerator, loader = accelerator_from_plan(plan, dataset, shuffle=True)`` sets
``gradient_accumulation_steps`` from the plan and feeds the plan's window (52, 51, 51, 51, 51, ...)
as micro-batches. Accelerate's own accumulation divides every micro-batch's loss by the number of
steps, so in an uneven window a sample of a short micro-batch weighs a little more (52 against 51:
2%); gaccum's ``Accumulator`` works on the prepared model and optimizer and weighs them exactly
(``acc = gaccum.Accumulator(model, optimizer, plan=plan)`` after ``accelerator.prepare``).
"""

from __future__ import annotations

from typing import Any, Optional

from .._checks import warn_user


def accelerator_from_plan(plan: Any, dataset: Any, *, shuffle: bool = False,
                          accelerator_kwargs: Optional[dict[str, Any]] = None, **loader_kwargs: Any) -> tuple:
    """``(Accelerator(gradient_accumulation_steps=plan.accum_steps, ...), plan's window DataLoader)``.

    Prepare the loader with the model and optimizer (``accelerator.prepare(model, opt, loader)``):
    across processes Accelerate then gives each its own micro-batches, and the plan's ``target_bs``
    is global as the plan says.
    """
    try:
        from accelerate import Accelerator
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("gaccum.integrations.accelerate needs accelerate: pip install gaccum[integrations]") from exc
    kwargs = dict(accelerator_kwargs or {})
    if "gradient_accumulation_steps" in kwargs or "gradient_accumulation_plugin" in kwargs:
        raise TypeError("gaccum: the plan sets gradient_accumulation_steps; leave it out of accelerator_kwargs")
    if len(plan.window.runs) > 1:
        warn_user(
            f"gaccum: the plan's window is uneven ({plan.window}); Accelerate divides every "
            "micro-batch's loss by the number of steps, so samples of the short micro-batches weigh slightly more. "
            "For the exact mean, train the prepared model with gaccum.Accumulator(model, optimizer, plan=plan)",
            UserWarning,
        )
    accelerator = Accelerator(gradient_accumulation_steps=plan.accum_steps, **kwargs)
    return accelerator, plan.loader(dataset, shuffle=shuffle, **loader_kwargs)
