"""Token budgets: variable-length data planned per length, bucketed, windows token-normalised exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from gaccum.accumulation import MemoryBudget

VOCAB = 50


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix, self.out = nn.Embedding(VOCAB, 32), nn.Linear(32, 64), nn.Linear(64, VOCAB)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def corpus(n=300, seed=0):
    """A long tail: most sequences short, a few 8x longer."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in (torch.distributions.Exponential(1 / 24.0).sample((n,)).clamp(4, 192))]
    lengths[7] = 192
    return [torch.randint(0, VOCAB, (L,), generator=g) for L in lengths], lengths


def collate(seqs):
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        labels[i, : len(s) - 1] = s[1:]
    return ids, labels


def token_loss(m, batch):
    ids, labels = batch
    return F.cross_entropy(m(ids).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def sample(b, L):
    return collate([torch.randint(0, VOCAB, (L,)) for _ in range(b)])


def test_a_token_plan_fits_more_short_sequences_and_every_micro_batch_holds_under_the_budget():
    data, lengths = corpus()
    model = LM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tp = gaccum.plan_tokens(model, sample, token_loss, lengths, target_tokens=4096, optimizer=opt,
                            memory_limit="3MiB", headroom=0)
    (typical, longest), (b_typ, b_long) = tp.lengths, tp.max_batch
    assert longest == 192 and typical < longest / 4 and b_typ > 3 * b_long  # planned at the longest only: b_long
    assert tp.probes <= 12 and "4096 tokens" in str(tp)
    budget = MemoryBudget(tp.budget, model, opt)
    loader = tp.loader(data, lengths, collate_fn=collate, generator=torch.Generator().manual_seed(1))
    acc = gaccum.Accumulator(model, opt, accum_steps=10**6, memory_limit=tp.budget)
    with budget:  # every micro-batch, padded to its longest, trains under the plan's budget
        for batch, last in loader:
            with acc.accumulate(last=last):
                acc.backward(token_loss(model, batch), num_items=int(batch[1].ne(-100).sum()))
    assert acc.oom_splits == 0 and budget.peak <= tp.budget and acc.optimizer_steps >= 2


def test_token_windows_are_the_exact_token_mean_of_their_samples():
    data, lengths = corpus(120, seed=2)
    ref = LM().double()
    ours = copy.deepcopy(ref)
    plan = gaccum.TokenPlan((20, 192), (16, 2), budget=1 << 30, probes=0, seconds=0.0, target_tokens=600)
    loader = plan.loader(data, lengths, collate_fn=collate, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    acc = gaccum.Accumulator(ours, opt, accum_steps=10**6)
    windows, current = [], []
    for (ids, labels), last in loader:
        current.append((ids, labels))
        with acc.accumulate(last=last):
            acc.backward(token_loss(ours, (ids, labels)), num_items=int(labels.ne(-100).sum()))
        if last:
            windows.append(current)
            current = []
    assert not current and acc.optimizer_steps == len(windows) >= 3
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for w in windows:  # one large batch per window: the mean over every real token of its samples
        ref_opt.zero_grad()
        total = sum(int(lb.ne(-100).sum()) for _, lb in w)
        sum(F.cross_entropy(ref(i).reshape(-1, VOCAB), lb.reshape(-1), ignore_index=-100, reduction="sum")
            for i, lb in w).div(total).backward()
        ref_opt.step()
    assert max(float((a - b).abs().max()) for a, b in zip(ours.parameters(), ref.parameters())) < 1e-12
    seen = sorted(int(i) for w in windows for ids, _ in w for i in range(len(ids)))
    assert len(seen) == len(data)  # every sample once per epoch


def test_token_plan_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="one of the two"):
        gaccum.plan_tokens(LM(), sample, token_loss, [5, 6], memory_limit="4MiB")
    with pytest.raises(ValueError, match="lengths"):
        gaccum.plan_tokens(LM(), sample, token_loss, [], target_bs=4, memory_limit="4MiB")
