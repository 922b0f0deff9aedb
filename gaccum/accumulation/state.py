"""The window's state machine and arithmetic: one place for every transition and every weight.

States, after torch's ``GradScaler`` ``OptState``::

    EMPTY --begin_micro--> IN_MICRO_STEP --end_micro--> ACCUMULATING --begin_micro--> ...
      ^                         |                           |
      |                    abort_micro                begin_boundary
      |    (a backward raised:  |                           v
      +---- window discarded) --+        AT_BOUNDARY --end_boundary (stepped, skipped or discarded)--+
      |                                                                                             |
      +---------------------------------------------------------------------------------------------+
    any state --close--> CLOSED (every later call raises)

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

import enum
from typing import Optional, Sequence

import torch


class WindowState(enum.Enum):
    EMPTY = "empty"  # between windows: no micro-step counted
    IN_MICRO_STEP = "in a micro-step"  # a micro-step's forward/backward is running
    ACCUMULATING = "accumulating"  # one or more micro-steps counted, the window not yet full
    AT_BOUNDARY = "at the boundary"  # unscale, check, clip, step, update, scheduler
    CLOSED = "closed"


class StateError(RuntimeError):
    """A call in a state that does not allow it; the message names the state and what to do."""


class WindowMismatchError(RuntimeError):
    """Ranks disagree on where a window ends (different numbers of micro-steps); raised on every rank."""


_ALLOWED = {
    "begin_micro": (WindowState.EMPTY, WindowState.ACCUMULATING),
    "end_micro": (WindowState.IN_MICRO_STEP,),
    "abort_micro": (WindowState.IN_MICRO_STEP,),
    "begin_boundary": (WindowState.ACCUMULATING,),
    "end_boundary": (WindowState.AT_BOUNDARY,),
    "load": (WindowState.EMPTY, WindowState.ACCUMULATING),
    "discard": (WindowState.EMPTY, WindowState.ACCUMULATING, WindowState.IN_MICRO_STEP, WindowState.AT_BOUNDARY),
}


class Window:
    """Counts, the running loss and the weights of the current window, and its state.

    Only :meth:`to` changes ``state``; each public transition says in which states it may be called.
    """

    def __init__(self, accum_steps: int) -> None:
        self.state = WindowState.EMPTY
        self.accum_steps = accum_steps
        self.micro = 0  # micro-steps counted in this window
        self.items = 0.0  # T_local: items seen in this window
        self.items_mode = False  # num_items (or real batch sizes) given in this window
        self.samples = 0  # samples fed in this window, while every micro-step's size is known
        self.samples_known = True
        self.loss_sum: Optional[torch.Tensor] = None  # sum of n_i x loss_i, on the device (no sync per micro-step)
        self.ref_total: Optional[float] = None  # R, fixed while accum_steps stays
        self.fixed_ref = False  # the hook sums raw gradients: R = 1 for good
        self.plan: Optional[Sequence[int]] = None  # a plan's (possibly uneven) micro-batch sizes
        self.last_synced = False  # the last backward let DDP reduce

    # -- transitions -----------------------------------------------------------
    def to(self, action: str, new: WindowState) -> None:
        """The one place ``state`` changes; ``action`` must be allowed in the current state."""
        if self.state not in _ALLOWED[action]:
            raise StateError(state_message(self.state, action))
        self.state = new

    def require(self, action: str, *states: WindowState) -> None:
        if self.state not in states:
            raise StateError(state_message(self.state, action))

    def begin_micro(self) -> None:
        """EMPTY / ACCUMULATING -> IN_MICRO_STEP."""
        self.to("begin_micro", WindowState.IN_MICRO_STEP)

    def end_micro(self, n: float, synced: bool, items_mode: bool, samples: Optional[int] = None) -> None:
        """IN_MICRO_STEP -> ACCUMULATING: the micro-step's gradient is in, counted with ``n`` items
        (``samples``: how many samples it held, when known)."""
        self.to("end_micro", WindowState.ACCUMULATING)
        self.micro += 1
        self.items += n
        if samples is None:
            self.samples_known = False
        else:
            self.samples += samples
        self.items_mode |= items_mode
        self.last_synced = synced

    def leave_micro(self) -> None:
        """IN_MICRO_STEP -> back where it was, nothing counted (a micro-step whose loss was skipped)."""
        self.to("end_micro", WindowState.ACCUMULATING if self.micro else WindowState.EMPTY)

    def begin_boundary(self) -> None:
        """ACCUMULATING -> AT_BOUNDARY."""
        self.to("begin_boundary", WindowState.AT_BOUNDARY)

    def reset(self) -> None:
        """Any open state -> EMPTY: counts and loss cleared (the gradients are the core's to drop)."""
        self.to("discard", WindowState.EMPTY)
        self.micro = 0
        self.items = 0.0
        self.items_mode = False
        self.samples, self.samples_known = 0, True
        self.loss_sum = None

    def loaded(self) -> None:
        """EMPTY / ACCUMULATING -> whichever the loaded counts say (a checkpoint was loaded)."""
        self.to("load", WindowState.ACCUMULATING if self.micro else WindowState.EMPTY)

    def close(self) -> None:
        """Any state -> CLOSED."""
        self.state = WindowState.CLOSED

    # -- arithmetic ------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.micro >= self.accum_steps

    def next_is_last(self) -> bool:
        return self.micro + 1 >= self.accum_steps

    def plan_window(self) -> Optional[Sequence[int]]:
        """The plan's window, while the schedule keeps the plan's number of micro-steps."""
        if self.plan is not None and len(self.plan) == self.accum_steps:
            return self.plan
        return None

    def default_items(self) -> float:
        """A micro-step's count when nothing better is known: the plan's size for it, else 1."""
        window = self.plan_window()
        return float(window[self.micro % len(window)]) if window is not None else 1.0

    def expected_total(self, n0: float) -> float:
        window = self.plan_window()
        return float(window_total(window)) if window is not None else n0 * self.accum_steps

    def add_loss(self, loss: torch.Tensor, n: float) -> None:
        # kept in the model's precision (float64 stays float64), half precision upcast
        v = loss.detach().to(torch.promote_types(loss.dtype, torch.float32)) * n
        self.loss_sum = v if self.loss_sum is None else self.loss_sum + v

    def mean_loss(self) -> Optional[float]:
        return float(self.loss_sum) / self.items if self.loss_sum is not None and self.items > 0 else None

    def overfilled(self) -> Optional[str]:
        """At a full window's end: how its samples differ from the plan's window, if they do."""
        window = self.plan_window()
        if window is None or not self.samples_known or self.micro != len(window) or self.samples == window_total(window):
            return None
        return f"{self.samples} samples where the plan's window ({window}) holds {window_total(window)}"


def window_total(window: Sequence[int]) -> int:
    """A plan's window total without iterating a long one (a planner Window knows it)."""
    total = getattr(window, "total", None)
    return int(total) if total is not None else sum(window)


def state_message(state: WindowState, action: str) -> str:
    if state is WindowState.CLOSED:
        return (f"gaccum: {action}() on a closed Accumulator/hook: close()/remove() gave the model and optimizer "
                "back; build a new gaccum.Accumulator (or gaccum.hook) to accumulate again")
    if state is WindowState.IN_MICRO_STEP:
        return (f"gaccum: {action}() inside a micro-step (the window is {state.value}); call it after the "
                "`with acc.accumulate():` block or the micro_batch() call has ended")
    if state is WindowState.AT_BOUNDARY:
        return (f"gaccum: {action}() while the window is {state.value} (the optimizer step is running); call it "
                "from the training loop, not from the optimizer, a scheduler or a step callback")
    return f"gaccum: {action}() is not allowed while the window is {state.value}"
