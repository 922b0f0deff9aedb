"""Planning variable-length data in tokens: the largest micro-batch for each sequence length.

A corpus whose typical sequence is a fifth of its longest, planned at its longest only, trains
micro-batches mostly of padding or far below what fits. ``plan_tokens`` measures memory at two
lengths -- the longest the data holds and a typical one (the median) -- with the ordinary planner
(a few probes each, not a grid), and answers for every length between: the memory one sequence
needs grows with its length and is convex in it (linear layers, plus attention's square), so the
chord between the two measured per-sequence costs lies above the true cost and the sizes it gives
fit. Below the typical length it keeps the typical length's size. ``TokenPlan.loader`` then buckets
samples by length into micro-batches under that curve and groups them into windows of a target
number of samples or tokens, for an exact token-normalised window (``acc.backward(loss,
num_items=tokens)`` with ``acc.accumulate(last=window_ends)``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn

from .._checks import is_int
from .plan import plan

if TYPE_CHECKING:
    from ..token_data import TokenWindowLoader


@dataclass
class TokenPlan:
    """The largest micro-batch per sequence length, from two measured lengths."""

    lengths: tuple[int, int]  # (typical, longest) lengths probed
    max_batch: tuple[int, int]  # the largest batch that fits at each
    budget: int
    probes: int
    seconds: float
    target_bs: Optional[int] = None
    target_tokens: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def max_batch_for(self, length: int) -> int:
        """The largest micro-batch of sequences padded to ``length`` that fits (at least 1)."""
        (lo, hi), (b_lo, b_hi) = self.lengths, self.max_batch
        if length <= lo or hi == lo:
            return b_lo if length <= lo else b_hi
        if length >= hi:
            return max(1, int(b_hi * hi / length))  # past the longest measured: cost at least proportional
        # per-sequence cost in budgets: 1/b at each measured length, the chord between them (above the curve)
        cost = 1 / b_lo + (1 / b_hi - 1 / b_lo) * (length - lo) / (hi - lo)
        return max(1, int(1 / cost))

    @property
    def token_budget(self) -> int:
        """Tokens per micro-batch at the longest length (shorter ones fit at least as many per sequence)."""
        return self.max_batch[1] * self.lengths[1]

    def loader(self, dataset: Any, lengths: Sequence[int], **kwargs: Any) -> "TokenWindowLoader":
        """Micro-batches bucketed by length under this plan's curve, in windows of the plan's target:
        ``for batch, last in loader: with acc.accumulate(last=last): acc.backward(loss, num_items=tokens)``."""
        from ..token_data import TokenWindowLoader

        return TokenWindowLoader(dataset, lengths, self.max_batch_for, target_bs=self.target_bs,
                                 target_tokens=self.target_tokens, **kwargs)

    def __str__(self) -> str:
        (lo, hi), (b_lo, b_hi) = self.lengths, self.max_batch
        target = f"{self.target_tokens} tokens" if self.target_tokens else f"{self.target_bs} samples"
        rows = [f"gaccum token plan: windows of {target}", f"  length {lo:>6} (typical): up to {b_lo} per micro-batch",
                f"  length {hi:>6} (longest): up to {b_hi} per micro-batch ({self.token_budget} tokens)",
                f"  {self.probes} probes in {self.seconds:.2f} s"]
        return "\n".join(rows + [f"  note: {n}" for n in self.notes])


def plan_tokens(model: nn.Module, sample: Callable[[int, int], Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                lengths: Sequence[int], *, target_tokens: Optional[int] = None, target_bs: Optional[int] = None,
                **plan_kwargs: Any) -> TokenPlan:
    """Plan variable-length data: ``sample(b, L)`` returns b sequences of length L; ``lengths`` are the
    data's sequence lengths (all of them, or a fair sample). Windows hold ``target_tokens`` real tokens or
    ``target_bs`` samples (one of the two). Other arguments are :func:`gaccum.plan`'s (``memory_limit``,
    ``optimizer``, ``amp``, ``headroom``...)."""
    if (target_tokens is None) == (target_bs is None):
        raise TypeError("gaccum: plan_tokens needs target_tokens=N (real tokens per window) or target_bs=N "
                        "(samples per window), one of the two")
    target = target_tokens if target_tokens is not None else target_bs
    if not is_int(target) or target < 1:
        raise ValueError(f"gaccum: the window's target must be an int >= 1, got {target!r}")
    lens = [int(n) for n in lengths]
    if not lens or min(lens) < 1:
        raise ValueError("gaccum: lengths must be the data's sequence lengths, each >= 1")
    longest, typical = max(lens), int(statistics.median(lens))
    t0 = time.perf_counter()
    plan_kwargs.setdefault("cache", False)
    cap = min(len(lens), target_bs or len(lens))  # never more sequences in a micro-batch than a window holds
    sizes, probes, budget, notes = [], 0, 0, []
    for length in sorted({typical, longest}):
        p = plan(model, max(cap, 1), lambda b, L=length: sample(b, L), loss_fn, **plan_kwargs)
        sizes.append(p.max_micro_batch)
        probes += len(p.probes)
        budget = p.budget
        notes += [n for n in p.notes if n not in notes and not n.startswith("balanced window")]
    if len(sizes) == 1:
        sizes.append(sizes[0])
    return TokenPlan((typical, longest), (sizes[0], sizes[1]), budget, probes, time.perf_counter() - t0,
                     target_bs=target_bs, target_tokens=target_tokens, notes=notes)
