"""What a plan is: :class:`Plan` (micro-batch, window, peak, probes, notes) and :class:`PlanError`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch

from ..lr import scale_lr as _scale_lr
from ..memory import format_bytes
from .probe import ProbeResult
from ..windows import Window


class PlanError(RuntimeError):
    """Even the smallest micro-batch does not fit; the message says what would help."""


@dataclass
class Plan:
    micro_batch_size: int
    accum_steps: int
    effective_batch_size: int
    window: Window  # micro-batch sizes as (size, count) runs; behaves as the list of sizes
    target_bs: int
    world_size: int
    peak_memory: Optional[int]
    memory_limit: int
    headroom: int
    device: str
    amp: Optional[str]
    probes: list[ProbeResult] = field(default_factory=list)
    max_micro_batch: int = 0
    estimate: bool = False
    allowance: int = 0
    seconds: float = 0.0
    objective: str = "memory"
    throughput: dict[int, float] = field(default_factory=dict)
    cached: bool = False
    notes: list[str] = field(default_factory=list)
    master_grads: bool = False
    agreed_budget: Optional[int] = None  # under torch.distributed: the smallest rank's budget, which all used
    peak_interpolated: bool = False  # the chosen size was not probed itself: its peak lies between two probes
    mode: str = "train"  # "eval": the largest forward-only batch, planned apart from training

    @property
    def budget(self) -> int:
        if self.agreed_budget is not None:
            return self.agreed_budget
        return self.memory_limit - self.headroom - self.allowance

    def loader(self, dataset: Any, **kwargs: Any) -> Any:
        """A DataLoader whose micro-batches are this plan's window (52, 51, 51, 51, 51, ...), in turn.

        ``DataLoader(batch_size=plan.micro_batch_size)`` would feed only full
        micro-batches and overfill an uneven window. Keyword arguments go to
        the DataLoader (``shuffle``, ``sampler``, ``drop_last``, ``num_workers``, ...).
        """
        from ..window_data import window_loader

        return window_loader(dataset, self.window, **kwargs)

    def scale_lr(self, base_lr: float, base_bs: int, rule: str = "linear") -> float:
        """LR for this plan's effective batch, given one tuned at ``base_bs``."""
        return _scale_lr(base_lr, base_bs, self.effective_batch_size, rule)

    def __post_init__(self) -> None:
        self.window = Window.of(self.window)  # a list of sizes, saved runs, or a Window

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the window as its ``[[size, count], ...]`` runs."""
        return {**asdict(self), "window": self.window.to_json(), "budget": self.budget,
                "seconds": round(self.seconds, 4), "throughput": {str(k): v for k, v in self.throughput.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        rebuilt = {"probes", "throughput", "cached"}  # probes and int keys are rebuilt; a loaded plan says if cached
        plan = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in rebuilt})
        plan.probes = [ProbeResult(**p) for p in d.get("probes", [])]
        plan.throughput = {int(k): v for k, v in d.get("throughput", {}).items()}
        return plan

    def __str__(self) -> str:
        kind = "estimate (fake tensors, no device memory used)" if self.estimate else "measured"
        head = [
            ("micro-batch size", f"{self.micro_batch_size}" + (f" per rank x {self.world_size} ranks" if self.world_size > 1 else "")),
            ("accumulation steps", str(self.accum_steps)),
            ("effective batch", f"{self.effective_batch_size} (target {self.target_bs})"),
            ("window", str(self.window)),
            ("largest that fits", str(self.max_micro_batch)),
            (f"peak at {self.micro_batch_size}", format_bytes(self.peak_memory)
             + (" (between two probes)" if self.peak_interpolated else "")),
            ("memory limit", format_bytes(self.memory_limit)),
            ("headroom", format_bytes(self.headroom)),
        ]
        if self.allowance:
            head.append(("allowance (unseen)", format_bytes(self.allowance)))
        head.append(("budget", format_bytes(self.budget)
                     + (" (the smallest rank's, used by all)" if self.world_size > 1 else "")))
        head += [("device", f"{self.device}" + (f", amp={self.amp}" if self.amp else "")
                  + (", FP32 master gradients" if self.master_grads else "")),
                 ("plan", kind + (" (from cache, 0 probes)" if self.cached else "")
                  + (", eval: forward only under inference_mode" if self.mode == "eval" else "")),
                 ("probes", f"{len(self.probes)} in {self.seconds:.2f} s")]
        width = max(len(k) for k, _ in head)
        lines = ["gaccum plan", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in head]
        if self.probes:
            lines += ["", f"{'probe':>6} {'batch':>8} {'peak':>12} {'fits':>5} {'seconds':>8}"]
            for i, p in enumerate(self.probes, 1):
                lines.append(f"{i:>6} {p.batch:>8} {format_bytes(p.peak):>12} {'yes' if p.fit else 'no':>5} {p.seconds:>8.3f}")
        if self.throughput:
            lines += ["", "throughput (samples/s): " + ", ".join(f"{b}: {v:.1f}" for b, v in sorted(self.throughput.items()))]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def does_not_fit(first: ProbeResult, start: int, budget: int, limit: int, head: int, masters: bool,
                 model: Any, allowance: int = 0) -> str:
    """The PlanError message: what was seen at the smallest size, the budget's arithmetic, what would help."""
    seen = (f"peak {format_bytes(first.peak)}" if first.peak is not None
            else "out of memory" if first.oom and first.static is None
            else "the step was stopped well over the budget")
    floor = (f"; weights, gradients, optimizer state{' and FP32 masters' if masters else ''} alone take "
             f"{format_bytes(first.static)}" if first.static is not None else "")
    kept = f" - {format_bytes(allowance)} kept for what an estimate cannot see" if allowance else ""
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    helps = ["activation checkpointing (torch.utils.checkpoint)"]
    if not half:
        helps.append("bf16 (amp='bf16' or model.to(torch.bfloat16))")
    helps += ["a lighter optimizer (SGD keeps less state than Adam)", "freezing part of the model", "a smaller model"]
    return (
        f"gaccum: even a micro-batch of {start} does not fit in steady training: {seen} at b={start} against a "
        f"budget of {format_bytes(budget)} ({format_bytes(limit)} limit - {format_bytes(head)} headroom{kept})"
        f"{floor}. What would help: {', '.join(helps[:-1])}, or {helps[-1]}"
    )
