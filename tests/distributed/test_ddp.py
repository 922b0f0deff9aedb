"""DDP with real processes: 2 ranks on gloo, spawned by the test."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gaccum
from helpers import free_port

WORLD = 2


def _dtype(mode):
    return torch.float32 if mode == "masters" else torch.float64  # FP32 masters need <= fp32 params


def _model(mode):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(_dtype(mode))


def _global_data(steps, n_micro, mb, mode):
    g = torch.Generator().manual_seed(42)
    total = steps * n_micro * mb * WORLD
    return (torch.randn(total, 6, generator=g, dtype=torch.float64).to(_dtype(mode)),
            torch.randn(total, 3, generator=g, dtype=torch.float64).to(_dtype(mode)))


def _worker(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        N, mb, steps = 3, 4, 2
        x, y = _global_data(steps, N, mb, mode)
        model = nn.parallel.DistributedDataParallel(_model(mode))
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            fut = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        model.register_comm_hook(None, counting_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        # micro_batch: only rank 1 has a CPU budget, and it cannot hold a micro-batch of 4 (see heavy_mse)
        limit = "3MiB" if (mode == "micro_batch" and rank == 1) else None
        acc = gaccum.Accumulator(model, opt, accum_steps=N, master_grads=(mode == "masters"), memory_limit=limit)
        per_window = N * mb * WORLD
        syncs = []
        for s in range(steps):
            window = slice(s * per_window, (s + 1) * per_window)
            xs, ys = x[window], y[window]
            for i in range(N):
                # rank r takes its own contiguous share of the global window
                lo = rank * N * mb + i * mb
                xb, yb = xs[lo : lo + mb], ys[lo : lo + mb]
                if mode == "micro_batch":  # gaccum runs the forward; rank 1 runs out of memory and splits
                    acc.micro_batch((xb, yb), heavy_mse)
                    continue
                with acc.accumulate():
                    if mode == "items":
                        # variable items per rank: rank 1 sees only half its samples
                        keep = mb if rank == 0 else mb // 2
                        acc.backward(F.mse_loss(model(xb[:keep]), yb[:keep]), num_items=keep)
                    else:
                        acc.backward(F.mse_loss(model(xb), yb))
            syncs.append(len(calls))
        out[rank] = {"params": [p.detach().clone() for p in model.module.parameters()], "syncs": syncs,
                     "steps": acc.optimizer_steps, "oom_splits": acc.oom_splits}
    finally:
        dist.destroy_process_group()


def heavy_mse(m, b):
    """The MSE, plus a zero term that keeps 800 KB per sample alive until backward (a memory-hungry layer)."""
    held = m.module[0].bias.sum() * torch.zeros(b[0].shape[0], 200_000)
    return F.mse_loss(m(b[0]), b[1]) + 0 * held.sum()


def _reference(mode):
    N, mb, steps = 3, 4, 2
    x, y = _global_data(steps, N, mb, mode)
    model = _model(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per_window = N * mb * WORLD
    for s in range(steps):
        xs, ys = x[s * per_window : (s + 1) * per_window], y[s * per_window : (s + 1) * per_window]
        if mode == "items":
            idx = [r * N * mb + i * mb + k for r in range(WORLD) for i in range(N) for k in range(mb if r == 0 else mb // 2)]
            xs, ys = xs[idx], ys[idx]
        opt.zero_grad()
        F.mse_loss(model(xs), ys).backward()  # mean over the concatenated global batch
        opt.step()
    return list(model.parameters())


@pytest.mark.parametrize("mode", ["plain", "items", "masters", "micro_batch"])
def test_ddp_two_ranks_equal_single_process_on_global_batch(mode):
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(free_port(), mode, out), nprocs=WORLD, start_method="spawn", join=True)
    ref = _reference(mode)
    for rank in range(WORLD):
        assert out[rank]["steps"] == 2
        for p, r in zip(out[rank]["params"], ref):
            tol = 1e-5 * float(r.detach().abs().max()) if mode == "masters" else 1e-10
            assert float((p - r.detach()).abs().max()) < tol, (mode, rank)
    if mode == "micro_batch":
        # rank 1 ran out of memory and split (later micro-batches run in the pieces that fit), rank 0 never;
        # the window was still the global batch's mean
        assert out[1]["oom_splits"] >= 1 and out[0]["oom_splits"] == 0
    if mode in ("masters", "micro_batch"):
        # gaccum reduces the window itself, once at its end: DDP's reducer never runs, so a rank that
        # split (more backward passes) never leaves the other waiting in a collective
        assert out[0]["syncs"] == [0, 0]
    else:
        # DDP's reducer ran once per window (one bucket here), not once per micro-step
        assert out[0]["syncs"] == [1, 2]
