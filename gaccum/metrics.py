"""Per-optimizer-step metrics that users can keep: JSONL, and TensorBoard when installed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .accumulation import StepResult


class MetricsLogger:
    """Attach with ``acc.add_callback(logger)``; feed ``logger.micro(loss, samples, tokens)`` per micro-step.

    Each optimizer step writes one JSON line: step, loss (the Accumulator's
    item-weighted window mean; else the mean of the losses given to ``micro``,
    which may be None), samples/s, tokens/s, peak memory, master-gradient bytes,
    skipped (overflow) steps, discarded windows, the loss scale, the accumulation
    steps in force (a schedule changes them) and what out-of-memory splits have learned.

    With a TensorBoard ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``, or ``tensorboard_dir``
    to make one) the same goes to TensorBoard per optimizer step, under ``gaccum/``: the peak and, with
    ``budget=`` (``plan.budget``), the peak as a fraction of it, the master buffer, skipped and
    discarded windows, OOM splits, samples/s and tokens/s, the loss and the accumulation steps.
    """

    SCALARS = ("loss", "samples_per_s", "tokens_per_s", "peak_memory", "peak_of_budget", "master_grad_bytes",
               "skipped_steps", "discarded_windows", "oom_splits", "accum_steps")

    def __init__(self, path: str | Path, *, tensorboard_dir: Optional[str | Path] = None, writer: Any = None,
                 budget: Optional[int] = None, peak_memory: Optional[Callable[[], int]] = None,
                 extra: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a")
        self.peak_memory = peak_memory
        self.extra = extra or {}
        self.records: list[dict[str, Any]] = []
        self._reset()
        self.budget = budget
        self.writer = writer
        if writer is None and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self.writer = None

    def _reset(self) -> None:
        self._losses: list[float] = []
        self._samples = 0
        self._tokens = 0
        self._t0 = time.perf_counter()

    def micro(self, loss: Optional[float | torch.Tensor], samples: int, tokens: int = 0) -> None:
        if loss is not None:
            self._losses.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
        self._samples += int(samples)
        self._tokens += int(tokens)

    def __call__(self, result: StepResult, acc: Any) -> None:
        """A step callback: ``result`` and the Accumulator (or hook) that stepped."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rec = {
            "step": acc.optimizer_steps, "micro_step": result.micro_step,
            "loss": result.loss if result.loss is not None else (
                sum(self._losses) / len(self._losses) if self._losses else None),
            "samples": self._samples,
            "samples_per_s": self._samples / dt, "tokens_per_s": self._tokens / dt,
            "peak_memory": self.peak_memory() if self.peak_memory is not None else _default_peak(acc),
            "master_grad_bytes": acc.master_grad_bytes,
            "skipped_steps": acc.skipped_steps, "skipped": result.skipped, "loss_scale": result.loss_scale,
            "grad_norm": result.grad_norm, "accum_steps": acc.accum_steps,
            "micro_batch_limit": acc.micro_batch_limit, "oom_splits": acc.oom_splits,
            "discarded_windows": acc.discarded_windows, **self.extra,
        }
        if self.budget:
            rec["peak_of_budget"] = rec["peak_memory"] / self.budget if rec["peak_memory"] else None
        self.records.append(rec)
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self.writer is not None:
            for k in self.SCALARS:
                if rec.get(k) is not None:
                    self.writer.add_scalar(f"gaccum/{k}", rec[k], rec["step"])
        self._reset()

    def close(self) -> None:
        self._fh.close()
        if self.writer is not None:
            self.writer.close()


def _default_peak(acc: Any) -> int:
    """The window's peak: the CPU budget's count under ``memory_limit``, else the CUDA allocator's."""
    measured = acc.last_window_peak
    if measured:
        return int(measured)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return 0
