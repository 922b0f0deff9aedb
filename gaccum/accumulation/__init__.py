"""The accumulation core: one window state machine, one boundary, one teardown, three front-ends.

state.py       WindowState and the window's arithmetic (weights, totals, the boundary correction)
core.py        AccumulationCore: composes the window, the masters, the boundary and the teardown; faults
boundary.py    the one optimizer step at a window's end (unscale, check, clip, step, update, scheduler)
masters.py     FP32 master gradients and weights for half-precision parameters
lifecycle.py   Teardown (close / remove / refused constructor / garbage collection) and BackwardWatch
checkpoint.py  the one state_dict format, checked before anything is assigned
accumulator.py the Accumulator (accumulate()/backward(), flush, checkpoints)
micro_batch.py Accumulator.micro_batch: gaccum runs the forward and splits a micro-batch on OOM
hook.py        gaccum.hook: an unchanged loop's optimizer.step() drives the same core
checks.py      argument checks shared by the front-ends and the planner
"""

from .accumulator import Accumulator, batch_norm_layers
from .boundary import StepResult, grads_finite
from .checks import HALF, resolve_master_grads, trained_params
from .hook import AccumulationHook, hook
from .masters import MasterGrads, flat_masters, paused
from .micro_batch import MemoryBudget, is_oom
from .state import StateError, WindowMismatchError, WindowState

__all__ = ["Accumulator", "AccumulationHook", "HALF", "MasterGrads", "MemoryBudget", "StateError", "StepResult",
           "WindowMismatchError", "WindowState", "batch_norm_layers", "flat_masters", "grads_finite", "hook",
           "is_oom", "paused", "resolve_master_grads", "trained_params"]
