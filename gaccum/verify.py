"""Check that accumulation reproduces the one-large-batch gradient on your model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._checks import is_int
from .accumulation import Accumulator, paused
from .batch import batch_size, split_batch

# Largest relative difference (max |g_acc - g_big| / max |g_big|) accepted, by
# the parameters' dtype: summation order alone moves the last bits.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class VerifyReport:
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool
    dtype: str
    batch_size: int
    micro_batch_size: int
    accum_steps: int
    worst_parameter: str

    @property
    def verdict(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        text = (f"{word}: {self.accum_steps} micro-batches of {self.micro_batch_size} vs one batch of "
                f"{self.batch_size}: max rel diff {self.max_rel_diff:.2e} (tolerance {self.tolerance:.0e} for "
                f"{self.dtype}), max abs diff {self.max_abs_diff:.2e}")
        if not self.passed and self.dtype == "float64" and self.max_rel_diff < 1e-5:
            text += (f". The difference is at float32 level though the model is float64: some layer computes in "
                     f"float32 inside (an RMSNorm or softmax that upcasts to float32, a loss on .float() logits; "
                     f"worst parameter: {self.worst_parameter}). Accumulation cannot be more exact than that layer: "
                     "pass tolerance=1e-6, or make the layer compute in the model's dtype")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    def __str__(self) -> str:
        return self.verdict


def verify(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    micro_batch_size: int,
    *,
    num_items_fn: Optional[Callable[[Any], int]] = None,
    train_mode: bool = False,
    tolerance: Optional[float] = None,
) -> VerifyReport:
    """Gradient of ``batch`` in one pass vs accumulated over micro-batches.

    ``loss_fn(model, batch)`` returns the mean loss; ``num_items_fn(micro)``
    gives the item count for token-normalised losses. The model runs in eval
    mode unless ``train_mode`` (dropout would make the two passes differ); its
    weights, gradients and mode are left as they were.
    """
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 <= tolerance < math.inf):
        raise ValueError(f"gaccum: tolerance must be a finite number >= 0 (a relative difference, e.g. 1e-6) or "
                         f"None for the dtype's default, got {tolerance!r}")
    if not is_int(micro_batch_size) or micro_batch_size < 1:
        raise ValueError(f"gaccum: micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("gaccum: the model has no trainable parameters")
    n = batch_size(batch)
    if micro_batch_size > n:
        raise ValueError(f"gaccum: micro_batch_size={micro_batch_size} is larger than the batch ({n} samples); "
                         "verify compares the batch in one pass with the same batch split into micro-batches")
    names = {p: n for n, p in model.named_parameters()}
    with paused(params):  # a live Accumulator or hook on this model keeps its window untouched
        return _verify(model, loss_fn, batch, micro_batch_size, params, names, n, num_items_fn, train_mode, tolerance)


def _verify(model, loss_fn, batch, micro_batch_size, params, names, n, num_items_fn, train_mode, tolerance):
    saved_grads = [p.grad for p in params]
    was_training = model.training
    model.train(train_mode)
    micro = split_batch(batch, micro_batch_size)
    try:
        for p in params:
            p.grad = None
        whole = loss_fn(model, batch)
        if not isinstance(whole, torch.Tensor) or whole.numel() != 1:
            shape = tuple(whole.shape) if isinstance(whole, torch.Tensor) else type(whole).__name__
            raise ValueError(f"gaccum: verify's loss_fn must return the batch's mean loss as a scalar tensor, got {shape}")
        whole.backward()
        big = [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double() for p in params]
        for p in params:
            p.grad = None
        probe = torch.optim.SGD(params, lr=0.0)
        acc = Accumulator(model, probe, accum_steps=len(micro), warn_batchnorm=False)
        got: list[torch.Tensor] = []

        def capture(ws: Any) -> None:  # what the optimizer steps: FP32 masters or the parameters
            got.extend(torch.zeros_like(w, dtype=torch.float64) if w.grad is None else w.grad.double() for w in ws)

        acc.core.boundary.pre_step_hooks.append(capture)
        try:
            for mb in micro:
                with acc.accumulate():
                    items = num_items_fn(mb) if num_items_fn is not None else batch_size(mb)
                    acc.backward(loss_fn(model, mb), num_items=items)
            acc.flush()
        finally:
            acc.close()
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        model.train(was_training)
    scale = max(float(b.abs().max()) for b in big) or 1.0
    worst, max_abs = "", 0.0
    for p, a, b in zip(params, got, big):
        d = float((a - b).abs().max()) if a.numel() else 0.0
        if d >= max_abs:
            worst, max_abs = names.get(p, "?"), d
    dtype = params[0].dtype
    tol = tolerance if tolerance is not None else TOLERANCES.get(dtype, 1e-4)
    rel = max_abs / scale
    return VerifyReport(max_abs, rel, tol, rel <= tol, str(dtype).replace("torch.", ""), n, micro_batch_size,
                        len(micro), worst)
