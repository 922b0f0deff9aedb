"""Variable-length data, three ways, one epoch each under the same memory budget (CPU).

A GPT-2-shaped model from a small config (pre-LN blocks, learned positions, causal attention) on a
long-tailed corpus of lengths 16-1024 (most short, a few long):
- fixed: micro-batches of one size planned at the longest length, in random order (what a plan at the
  worst case gives);
- group_by_length: the same size through Hugging Face's ``LengthGroupedSampler`` (the Trainer's
  ``group_by_length``): similar lengths together, less padding, the same number of sequences;
- gaccum tokens: ``plan_tokens`` (the largest micro-batch per length) and its bucketed loader.
Every run trains through the Accumulator, windows of ``--window-tokens`` real tokens, under
``MemoryBudget`` (gaccum's live-tensor meter: any micro-batch over the budget would raise). Reported:
real tokens/s, padding fraction, micro-batches, peak against the budget, probes and planning seconds.
Writes results/tokens.json. Run: python benchmarks/bench_tokens.py [--n 600]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

import gaccum  # noqa: E402
from gaccum.accumulation import MemoryBudget  # noqa: E402
from gaccum.demo.model import TinyGPT  # noqa: E402

VOCAB, LONGEST = 256, 1024


def corpus(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.distributions.LogNormal(4.3, 0.8).sample((n,)).clamp(16, LONGEST).int().tolist()
    lengths[0] = LONGEST
    return [torch.randint(0, VOCAB, (L + 1,), generator=g) for L in lengths], lengths


def collate(seqs):
    ids = torch.zeros(len(seqs), max(len(s) - 1 for s in seqs), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s) - 1], labels[i, : len(s) - 1] = s[:-1], s[1:]
    return ids, labels


def loss_fn(m, batch):
    ids, labels = batch
    return F.cross_entropy(m(ids).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def model():
    torch.manual_seed(0)
    return TinyGPT(d=64, layers=2, heads=4, seq_len=LONGEST, vocab=VOCAB)


def train(batches, budget, window_tokens):
    """One epoch of (batch, ends_window) through the Accumulator under the budget."""
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    acc = gaccum.Accumulator(net, opt, accum_steps=10**6)
    meter = MemoryBudget(budget, net, opt)
    real = slots = micro = 0
    t0 = time.perf_counter()
    with meter:
        for batch, last in batches:
            n = int(batch[1].ne(-100).sum())
            with acc.accumulate(last=last):
                acc.backward(loss_fn(net, batch), num_items=n)
            real, slots, micro = real + n, slots + batch[1].numel(), micro + 1
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": round(real / seconds, 1), "padding": round(1 - real / slots, 3), "micro_batches": micro,
            "optimizer_steps": acc.optimizer_steps, "peak": meter.peak, "peak_of_budget": round(meter.peak / budget, 3),
            "seconds": round(seconds, 2)}


def windowed(batches, lengths_of, window_tokens):
    """Flag window ends every ``window_tokens`` real tokens for a fixed-size loader."""
    out, filled = [], 0
    for batch in batches:
        filled += lengths_of(batch)
        out.append((batch, filled >= window_tokens))
        if filled >= window_tokens:
            filled = 0
    if out:
        out[-1] = (out[-1][0], True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--limit", default="48MiB")
    ap.add_argument("--window-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data, lengths = corpus(args.n)
    sample = lambda b, L: collate([torch.randint(0, VOCAB, (L + 1,)) for _ in range(b)])  # noqa: E731

    t0 = time.perf_counter()
    tp = gaccum.plan_tokens(model(), sample, loss_fn, lengths, target_tokens=args.window_tokens,
                            memory_limit=args.limit, headroom=0)
    plan_seconds = time.perf_counter() - t0
    fixed_b = tp.max_batch[1]  # the size a plan at the longest length gives
    count = lambda batch: int(batch[1].ne(-100).sum())  # noqa: E731
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(data), generator=g).tolist()
    fixed = [collate([data[i] for i in order[s:s + fixed_b]]) for s in range(0, len(order), fixed_b)]
    rows = {"fixed (planned at the longest)": train(windowed(fixed, count, args.window_tokens), tp.budget,
                                                    args.window_tokens)}
    try:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        idx = list(LengthGroupedSampler(fixed_b, lengths=lengths, generator=torch.Generator().manual_seed(1)))
        grouped = [collate([data[i] for i in idx[s:s + fixed_b]]) for s in range(0, len(idx), fixed_b)]
        rows["HF group_by_length"] = train(windowed(grouped, count, args.window_tokens), tp.budget,
                                           args.window_tokens)
    except ImportError:
        rows["HF group_by_length"] = {"skipped": "transformers is not installed"}
    loader = tp.loader(data, lengths, collate_fn=collate, generator=torch.Generator().manual_seed(1))
    rows["gaccum plan_tokens"] = train(list(loader), tp.budget, args.window_tokens)
    rows["gaccum plan_tokens"].update(probes=tp.probes, plan_seconds=round(plan_seconds, 2))
    for name, r in rows.items():
        print(f"{name:<32} {r}")
    print(tp)
    path = write("tokens.json", {"environment": environment(), "n": args.n, "limit": args.limit,
                                 "lengths": {"min": min(lengths), "median": sorted(lengths)[len(lengths) // 2],
                                             "max": max(lengths)},
                                 "plan": {"lengths": tp.lengths, "max_batch": tp.max_batch, "budget": tp.budget},
                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
