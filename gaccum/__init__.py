"""gaccum: train at the effective batch size you want on the GPU you have.

The public API, and nothing else, lives here.
"""

from .accumulate import Accumulator, StepResult
from .hook import AccumulationHook, hook
from .lr import num_optimizer_steps, scale_lr
from .memory import format_bytes, parse_bytes
from .ops import unscale_check_accumulate_
from .plan import Plan, PlanError, plan
from .probe import ProbeResult
from .schedule import AccumulationSchedule
from .verify import VerifyReport, verify
from .window_data import WindowBatchSampler, window_loader

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "AccumulationSchedule",
    "AccumulationHook",
    "Plan",
    "PlanError",
    "ProbeResult",
    "StepResult",
    "VerifyReport",
    "WindowBatchSampler",
    "hook",
    "format_bytes",
    "num_optimizer_steps",
    "parse_bytes",
    "plan",
    "scale_lr",
    "unscale_check_accumulate_",
    "verify",
    "window_loader",
]
