"""gaccum: train at the effective batch size you want on the GPU you have.

The public API, and nothing else, lives here.
"""

from .accumulate import Accumulator, StepResult
from .hook import AccumulationHook, hook
from .lr import num_optimizer_steps, scale_lr
from .ops import unscale_check_accumulate_
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "AccumulationHook",
    "StepResult",
    "VerifyReport",
    "hook",
    "num_optimizer_steps",
    "scale_lr",
    "unscale_check_accumulate_",
    "verify",
]
