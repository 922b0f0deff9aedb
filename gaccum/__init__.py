"""gaccum: train at the effective batch size you want on the GPU you have.

The public API, and nothing else, lives here.
"""

from .accumulation import (AccumulationHook, Accumulator, StateError, StepResult, WindowMismatchError,
                           WindowState, hook)
from .lr import num_optimizer_steps, scale_lr
from .memory import format_bytes, parse_bytes
from .ops import unscale_check_accumulate_
from .planner import Plan, PlanError, ProbeResult, TokenPlan, plan, plan_tokens
from .schedule import AccumulationSchedule
from .verify import VerifyReport, verify
from .window_data import WindowBatchSampler, WindowStream, window_loader

from ._version import __version__

__all__ = [
    "Accumulator",
    "AccumulationSchedule",
    "AccumulationHook",
    "Plan",
    "PlanError",
    "ProbeResult",
    "StateError",
    "TokenPlan",
    "StepResult",
    "VerifyReport",
    "WindowBatchSampler",
    "WindowMismatchError",
    "WindowState",
    "WindowStream",
    "hook",
    "format_bytes",
    "num_optimizer_steps",
    "parse_bytes",
    "plan",
    "plan_tokens",
    "scale_lr",
    "unscale_check_accumulate_",
    "verify",
    "window_loader",
]
