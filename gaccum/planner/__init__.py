"""The planner: ``plan()`` as its phases, the probe that measures one steady training step, the search.

plan.py    plan(): check -> budget -> snapshot -> warm up -> (cache) -> probe and search -> window -> soak
           -> report, the snapshot restored in ``finally``; Plan and PlanError
probe.py   Snapshot (saves and restores model, optimizer, RNG), Rig (what a window's middle micro-step runs
           with), the probes (CUDA allocator; CPU / fake tensors: LiveBytes and the allocator's events)
search.py  from one or two probes to the largest size that fits, confirmed at b and b + 1; balanced windows
cache.py   plans kept by model, optimizer, shapes and settings
tokens.py  plan_tokens: the largest micro-batch per sequence length from two measured lengths (token budgets)
(gaccum/windows.py: a window as (size, count) runs, shared with the Accumulator and the loaders)
"""

from .plan import Plan, PlanError, plan
from .probe import ProbeResult
from .tokens import TokenPlan, plan_tokens

__all__ = ["Plan", "PlanError", "ProbeResult", "TokenPlan", "plan", "plan_tokens"]
