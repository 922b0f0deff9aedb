"""Where Accelerate's own accumulation leaves the one-large-batch gradient, side by side with gaccum.

Two cases people meet, float64 on CPU, one SGD step from the same weights, over several seeds:
1. a partial last window: 18 samples, micro-batches of 4, windows of 3 (the last holds 4 + 2);
2. a token-mean loss over variable-length sequences (padding masked), windows of 4 micro-batches.
The error is |update - large-batch update| / |large-batch update| over all parameters, for the
window that differs. Writes results/accelerate_gaps.json.
Run: python benchmarks/bench_accelerate_gaps.py [--seeds 5]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

import gaccum  # noqa: E402

VOCAB, LR = 32, 0.5


def rel_err(model, start, ref):
    got = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
    want = torch.cat([(r.detach() - s).reshape(-1) for r, s in zip(ref.parameters(), start)])
    return float((got - want).norm() / want.norm())


def partial_window(seed):
    """The last window (4 + 2 samples) alone, after a full one: each tool against the large batch of 6."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(18, 6, generator=g, dtype=torch.float64), torch.randn(18, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for a, b in ((0, 12), (12, 18)):
        opt.zero_grad()
        F.mse_loss(ref(x[a:b]), y[a:b]).backward()
        opt.step()
    out = {}
    for tool in ("accelerate", "gaccum"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        if tool == "accelerate":
            from accelerate import Accelerator

            acc = Accelerator(gradient_accumulation_steps=3, cpu=True)
            model, opt, loader = acc.prepare(model, opt, loader)
            for xb, yb in loader:
                with acc.accumulate(model):
                    acc.backward(F.mse_loss(model(xb), yb))
                    opt.step()
                    opt.zero_grad()
        else:
            acc = gaccum.Accumulator(model, opt, accum_steps=3)
            for xb, yb in loader:
                with acc.accumulate():
                    acc.backward(F.mse_loss(model(xb), yb))
            acc.flush()
        out[tool] = rel_err(model, [p.detach() for p in base.parameters()], ref)
    return out


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def token_mean(model, ids, labels):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def variable_length(seed, micro=4, accum=4):
    """One window of 4 micro-batches of sequences 2-40 tokens long, padded, loss the token mean."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 41, (micro * accum,), generator=g)
    ids = torch.randint(0, VOCAB, (micro * accum, 40), generator=g)
    labels = ids.clone()
    for i, n in enumerate(lengths.tolist()):
        labels[i, n:] = -100
    torch.manual_seed(seed)
    base = TinyLM().double()
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    token_mean(ref, ids, labels).backward()
    opt.step()
    out = {}
    for tool in ("accelerate", "gaccum"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(TensorDataset(ids, labels), batch_size=micro)
        if tool == "accelerate":
            from accelerate import Accelerator

            acc = Accelerator(gradient_accumulation_steps=accum, cpu=True)
            model, opt, loader = acc.prepare(model, opt, loader)
            for xb, lb in loader:
                with acc.accumulate(model):
                    acc.backward(token_mean(model, xb, lb))
                    opt.step()
                    opt.zero_grad()
        else:
            acc = gaccum.Accumulator(model, opt, accum_steps=accum)
            for xb, lb in loader:
                with acc.accumulate():
                    acc.backward(token_mean(model, xb, lb), num_items=int(lb.ne(-100).sum()))
        out[tool] = rel_err(model, [p.detach() for p in base.parameters()], ref)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    import accelerate

    cases = {"partial_last_window": partial_window, "variable_length_token_mean": variable_length}
    results = {}
    for name, fn in cases.items():
        runs = [fn(seed) for seed in range(args.seeds)]
        results[name] = {tool: {"min": min(r[tool] for r in runs), "max": max(r[tool] for r in runs),
                                "runs": [r[tool] for r in runs]} for tool in ("accelerate", "gaccum")}
        acc, ga = results[name]["accelerate"], results[name]["gaccum"]
        print(f"{name}: Accelerate {acc['min']:.3g}-{acc['max']:.3g}, gaccum {ga['min']:.2g}-{ga['max']:.2g} "
              "relative to the large batch's update")
    path = write("accelerate_gaps.json", {"environment": {**environment(), "accelerate": accelerate.__version__},
                                          "seeds": args.seeds, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
