"""FSDP2 (fully_shard) with real processes: 2 ranks on gloo, CPU, through the Accumulator."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gaccum
from helpers import free_port

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD, N, MB, STEPS = 2, 3, 4, 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def _data():
    g = torch.Generator().manual_seed(42)
    total = (STEPS * N + 1) * MB * WORLD  # two windows, then one micro-step more (a partial window)
    return torch.randn(total, 6, generator=g, dtype=torch.float64), torch.randn(total, 3, generator=g,
                                                                             dtype=torch.float64)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_mod

        reductions = []  # test instrumentation: FSDP2's gradient reduction, counted
        original = group_mod.foreach_reduce

        def counting(*a, **k):
            reductions.append(1)
            return original(*a, **k)

        group_mod.foreach_reduce = counting
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        acc = gaccum.Accumulator(model, opt, accum_steps=N, max_grad_norm=0.5)
        x, y = _data()
        per_window = N * MB * WORLD
        counts = []
        for s in range(STEPS):
            for i in range(N):
                lo = s * per_window + rank * N * MB + i * MB
                with acc.accumulate():
                    # uneven items per rank: rank 1 uses half of each micro-batch
                    keep = MB if rank == 0 else MB // 2
                    acc.backward(F.mse_loss(model(x[lo:lo + keep]), y[lo:lo + keep]), num_items=keep)
            counts.append(len(reductions))
        lo = STEPS * per_window + rank * MB
        with acc.accumulate(last=True):  # a partial window, marked as the data's last micro-step: it syncs
            acc.backward(F.mse_loss(model(x[lo:lo + MB]), y[lo:lo + MB]))
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        error = None
        with acc.accumulate():  # unmarked, a partial window cannot be reduced after the fact under FSDP2
            acc.backward(F.mse_loss(model(x[lo:lo + MB]), y[lo:lo + MB]))
        try:
            acc.flush()
        except RuntimeError as exc:
            error = str(exc)
        out[rank] = {"params": full, "counts": counts, "steps": acc.optimizer_steps, "error": error}
    finally:
        dist.destroy_process_group()


def _reference():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _data()
    per_window = N * MB * WORLD
    for s in range(STEPS):
        idx = [s * per_window + r * N * MB + i * MB + k for r in range(WORLD) for i in range(N)
               for k in range(MB if r == 0 else MB // 2)]
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    lo = STEPS * per_window
    opt.zero_grad()
    F.mse_loss(model(x[lo:lo + WORLD * MB]), y[lo:lo + WORLD * MB]).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    return list(model.parameters())


def test_fsdp2_reduces_once_per_window_and_equals_single_process_training():
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn", join=True)
    ref = _reference()
    for rank in range(WORLD):
        assert out[rank]["steps"] == STEPS + 1
        assert "last=True" in out[rank]["error"]
        for p, r in zip(out[rank]["params"], ref):
            assert float((p - r.detach()).abs().max()) < 1e-10, rank
    per_window = out[0]["counts"][0]
    assert per_window >= 1 and out[0]["counts"] == [per_window, 2 * per_window]
    assert per_window <= 3  # one reduction per FSDP group (3 here) per window, never one per micro-step


def _plan_worker(rank, port, limits, out, cache):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GACCUM_CACHE_DIR=cache)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard

        from gaccum.autosplit import MemoryBudget

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        g = torch.Generator().manual_seed(rank)
        sample = lambda b: (torch.randn(b, 64, generator=g), torch.randint(0, 10, (b,), generator=g))  # noqa: E731
        loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plan = gaccum.plan(model, 512, sample, loss, optimizer=opt, memory_limit=limits[rank], headroom=0,
                           cache=False)
        assert not opt.state and all(p.grad is None for p in model.parameters())  # no trace, FSDP2 drained
        acc = gaccum.Accumulator(model, opt, plan=plan)
        with MemoryBudget(plan.budget, model, opt) as meter:  # two windows: any micro-step over it raises
            for i in range(2 * plan.accum_steps):
                with acc.accumulate():
                    acc.backward(loss(model, sample(plan.window[i % plan.accum_steps])))
        out[rank] = (plan.max_micro_batch, plan.micro_batch_size, plan.effective_batch_size, plan.budget,
                     acc.optimizer_steps, meter.peak)
    finally:
        dist.destroy_process_group()


def test_plan_under_fsdp2_agrees_on_the_smallest_budget_and_holds(tmp_path):
    limits = [2 << 20, 1536 << 10]
    out = mp.Manager().dict()
    mp.start_processes(_plan_worker, args=(free_port(), limits, out, str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    assert out[0][:4] == out[1][:4]  # same size, same window, same (smallest) budget on every rank
    largest, micro, effective, budget, steps, peak = out[1]
    assert budget == min(limits) and effective == 512 and 1 < largest < 256 and steps == 2
    assert max(out[0][5], out[1][5]) <= budget
