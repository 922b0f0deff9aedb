"""Out-of-memory at run time: the micro-batch is split, the window's gradient is unchanged.

The OOMs here are real ``torch.OutOfMemoryError`` exceptions raised where a GPU
would raise them: in the forward, in the middle of the backward (after some
parameters' gradients were already accumulated), and from the planner's memory
budget on CPU (``memory_limit``), which counts every live tensor.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from conftest import max_abs_diff, max_rel_diff, regression_data
from helpers import chunks, large_batch_train


class _OomIfLarger(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit, where):
        ctx.limit, ctx.where = limit, where
        if where == "forward" and x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"simulated OOM: forward of {x.shape[0]} > {limit}")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.where == "backward" and g.shape[0] > ctx.limit:
            raise torch.OutOfMemoryError(f"simulated OOM: backward of {g.shape[0]} > {ctx.limit}")
        return g, None, None


class Gate(nn.Module):
    """Raises OOM like the allocator would for more than ``limit`` samples (limit=None: never)."""

    def __init__(self, where):
        super().__init__()
        self.limit, self.where, self.hits = None, where, 0

    def forward(self, x):
        if self.limit is None:
            return x
        return _OomIfLarger.apply(x, self.limit, self.where)


def gated_mlp(where, dtype=torch.float64):
    torch.manual_seed(0)
    # Backward reaches the last Linear first (its gradients accumulate), then the gate raises:
    # the first Linear has no gradient from that attempt.
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), Gate(where), nn.Linear(12, 3)).to(dtype)


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _run_micro_batches(model, opt, micro_batches, accum_steps, **kw):
    acc = gaccum.Accumulator(model, opt, accum_steps=accum_steps, **kw)
    results = [acc.micro_batch(b, mse) for b in micro_batches]
    acc.flush()
    return acc, results


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_oom_split_gives_the_large_batch_result_float64(where, opt_name):
    make_opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)}[opt_name]
    x, y = regression_data(96)
    ref, ours = gated_mlp(where), gated_mlp(where)
    large_batch_train(ref, make_opt(ref.parameters()), chunks(x, y, 32))
    ours[2].limit = 3  # micro-batches of 8 run out of memory: 8 -> 4 -> 2
    with pytest.warns(RuntimeWarning, match="out of memory on a micro-batch of") as caught:
        acc, results = _run_micro_batches(ours, make_opt(ours.parameters()), chunks(x, y, 8), accum_steps=4)
    assert acc.optimizer_steps == 3 and sum(r.stepped for r in results) == 3
    assert acc.micro_batch_limit == 2
    assert acc.oom_splits == 3  # 8 -> 4+4, then each 4 -> 2+2; later micro-batches run as 2s from the start
    # one warning per new limit, not per split
    assert [str(w.message).split(";")[0].split()[-1] for w in caught] == ["8", "4"]
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-10


def test_oom_mid_backward_keeps_the_gradients_already_accumulated():
    """The failed attempt's last-layer gradient is kept, and not counted again by the halves."""
    x, y = regression_data(16)
    ours = gated_mlp("backward")
    opt = torch.optim.SGD(ours.parameters(), lr=0.0)  # lr 0: read the window's gradient before the step
    acc = gaccum.Accumulator(ours, opt, accum_steps=2)
    seen = {}
    acc.core.boundary.pre_step_hooks.append(lambda ws: seen.update(g=[p.grad.clone() for p in ws]))
    acc.micro_batch((x[:8], y[:8]), mse)  # fits
    ours[2].limit = 3
    with pytest.warns(RuntimeWarning):
        acc.micro_batch((x[8:], y[8:]), mse)  # micro-step 2 of 2: OOM mid-backward, grads exist already
    ref = copy.deepcopy(ours)
    ref[2].limit = None
    ref.zero_grad()
    mse(ref, (x, y)).backward()
    assert max_abs_diff(seen["g"], [p.grad for p in ref.parameters()]) < 1e-14
    assert all(p.requires_grad for p in ours.parameters()), "frozen parameters must be given back"


def test_oom_after_backward_reached_every_parameter_counts_the_piece_once():
    """The input's gradient is computed after every weight's: an OOM there leaves the piece complete."""
    x, y = regression_data(32)
    torch.manual_seed(0)
    model = nn.Sequential(Gate("backward"), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    ref, init = copy.deepcopy(model), copy.deepcopy(model)
    model[0].limit = 4

    calls = []

    def loss_fn(m, b):
        calls.append(b[0].shape[0])
        return mse(m, (b[0].clone().requires_grad_(), b[1]))

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    results = []
    with pytest.warns(RuntimeWarning, match="micro-batch of 8"):
        for i in range(0, 32, 8):
            results.append(acc.micro_batch((x[i : i + 8], y[i : i + 8]), loss_fn))
    assert acc.optimizer_steps == 2 and acc.oom_splits == 1 and acc.micro_batch_limit == 4
    assert calls == [8, 4, 4, 4, 4, 4, 4]  # the 8 that ran out was not run again in halves
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), chunks(x, y, 16))
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-12
    # the window's loss (kept in float32) counts the piece whose backward ran out of memory exactly once
    with torch.no_grad():
        first_window_loss = float(F.mse_loss(init(x[:16]), y[:16]))
    assert results[1].loss == pytest.approx(first_window_loss, rel=1e-6)


def test_oom_split_with_fp32_master_gradients_flushes_the_failed_backward():
    """With FP32 masters, the failed backward's bucket is flushed with its own weight."""
    x, y = regression_data(96, dtype=torch.float32)
    ref, ours = gated_mlp("backward", torch.float32), gated_mlp("backward", torch.float32)
    large_batch_train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), chunks(x, y, 32))
    ours[2].limit = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        acc, _ = _run_micro_batches(ours, torch.optim.AdamW(ours.parameters(), lr=1e-2), chunks(x, y, 8), 4,
                                    master_grads=True)
    assert acc.uses_master_grads and acc.micro_batch_limit == 4
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-5
    assert not acc.core.watch.open and not acc.core.masters._pending


def test_oom_split_with_num_items_from_loss_fn():
    """Variable-length sequences: each piece reports its own token count."""
    torch.manual_seed(0)
    vocab, T = 11, 7
    model = nn.Sequential(nn.Embedding(vocab, 8), Gate("backward"), nn.Linear(8, vocab)).double()
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, vocab, (24, T))
    targets = torch.randint(0, vocab, (24, T))
    lengths = torch.randint(1, T + 1, (24,))
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = -100  # padding

    def loss_fn(m, batch):
        tok, tgt = batch
        logits = m(tok)
        n = int((tgt != -100).sum())
        return F.cross_entropy(logits.reshape(-1, vocab), tgt.reshape(-1), ignore_index=-100), n

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model[1].limit = 2
    acc = gaccum.Accumulator(model, opt, accum_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(3):
            acc.micro_batch((tokens[8 * i : 8 * i + 8], targets[8 * i : 8 * i + 8]), loss_fn)
    assert acc.optimizer_steps == 1 and acc.micro_batch_limit == 2
    ropt = torch.optim.SGD(ref.parameters(), lr=0.5)
    loss_fn(ref, (tokens, targets))[0].backward()  # one mean over every real token of the window
    ropt.step()
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-12


def test_cpu_memory_budget_from_the_planner_splits_and_matches():
    """The real path on CPU: micro-batches twice the planned size run out of the plan's budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sample = lambda b: (torch.randn(b, 64), torch.randint(0, 10, (b,)))  # noqa: E731
    ce = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    plan = gaccum.plan(model, target_bs=256, sample=sample, loss_fn=ce, optimizer=opt, memory_limit="3.9MiB",
                       headroom=0, cache=False)
    assert 8 <= plan.max_micro_batch < 100, plan.table()
    big = 128  # two even micro-batches, each well over what the plan says fits
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    micro = [(x[i : i + big], y[i : i + big]) for i in range(0, 256, big)]
    acc = gaccum.Accumulator(model, opt, accum_steps=len(micro), memory_limit=plan.budget)
    # (the window's first micro-step runs lighter, before any gradient exists; a later one runs out)
    with pytest.warns(RuntimeWarning, match="out of memory on a micro-batch of"):
        for b in micro:
            acc.micro_batch(b, ce)
    acc.flush()
    assert acc.optimizer_steps == 1 and acc.oom_splits >= 1
    assert acc.micro_batch_limit is not None and acc.micro_batch_limit <= plan.max_micro_batch + 1
    assert acc.peak_memory is not None and acc.peak_memory <= plan.budget
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ce(ref, (x, y)).backward()
    ropt.step()
    assert max_rel_diff(model.parameters(), ref.parameters()) < 1e-5


def test_oom_at_one_sample_and_on_oom_raise_and_other_errors_propagate():
    x, y = regression_data(8)
    model = gated_mlp("forward")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[2].limit = 0
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(torch.OutOfMemoryError, match="micro-batch of 1 sample"):
            acc.micro_batch((x[:2], y[:2]), mse)

    strict_model = gated_mlp("forward")
    strict_model[2].limit = 1
    strict = gaccum.Accumulator(strict_model, torch.optim.SGD(strict_model.parameters(), lr=0.1), accum_steps=2,
                                on_oom="raise")
    with pytest.raises(torch.OutOfMemoryError, match="simulated OOM"):
        strict.micro_batch((x[:4], y[:4]), mse)
    assert strict.micro_batch_limit is None and strict.oom_splits == 0

    def broken(m, batch):
        raise KeyError("not an OOM")

    other = gated_mlp("forward")
    with pytest.raises(KeyError):
        gaccum.Accumulator(other, torch.optim.SGD(other.parameters(), lr=0.1), accum_steps=2).micro_batch((x, y), broken)


def test_micro_batch_bad_input_is_clear():
    x, y = regression_data(8)
    model = gated_mlp("forward")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        acc.micro_batch((x, y), "mse")
    with pytest.raises(ValueError, match=r"\(loss, num_items\)"):
        acc.micro_batch((x, y), lambda m, b: (mse(m, b), 3, 4))
    with pytest.raises(ValueError, match="num_items must be > 0"):
        acc.micro_batch((x, y), lambda m, b: (mse(m, b), 0))
    with pytest.raises(ValueError, match="scalar"):
        acc.micro_batch((x, y), lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ValueError, match="on_oom"):
        gaccum.Accumulator(model, opt, accum_steps=2, on_oom="retry")
    with pytest.raises(ValueError, match="cannot parse memory size"):
        gaccum.Accumulator(model, opt, accum_steps=2, memory_limit="lots")
    with acc.accumulate():
        with pytest.raises(RuntimeError, match="inside an accumulate"):
            acc.micro_batch((x, y), mse)
        acc.backward(mse(model, (x, y)))
    assert acc.micro_in_window == 1  # the failed calls left nothing behind
