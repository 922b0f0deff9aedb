"""Two gloo ranks that end their data differently: the same clear gaccum error on every rank, never an
abort ("Received data size doesn't match") and never a wait for the process-group timeout."""

import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gaccum
from helpers import RaiseOnce, free_port

K, MB = 4, 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()




def _run(front, model, n, micro_step):
    """``n`` micro-batches through ``micro_step(x, y)``, then flush(); (verdict, micro-steps left in the window)."""
    try:
        for _ in range(n):
            x, y = torch.randn(MB, 6, dtype=torch.float64), torch.randn(MB, 3, dtype=torch.float64)
            try:
                micro_step(x, y)
            except RuntimeError as exc:
                if "backward hook failed" not in str(exc):
                    raise
        front.flush()
        return "ok", front.optimizer_steps
    except gaccum.WindowMismatchError as exc:
        return "mismatch: " + str(exc), front.micro_in_window


def _accumulator_run(rank, counts, raise_at=None):
    """``counts[rank]`` micro-batches through accumulate()/backward(), then flush()."""
    torch.manual_seed(rank)
    inner = _model()
    if raise_at is not None and rank == raise_at[0]:
        inner = nn.Sequential(inner[0], RaiseOnce(raise_at[1]), inner[1], inner[2])
    model = nn.parallel.DistributedDataParallel(inner)
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=K)

    def micro_step(x, y):
        with acc.accumulate():
            acc.backward(F.mse_loss(model(x), y))

    try:
        return _run(acc, model, counts[rank], micro_step)
    finally:
        acc.close()


def _hook_run(rank, counts):
    """The same through an unchanged loop under gaccum.hook(model=ddp_model)."""
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gaccum.hook(opt, K, model=model)

    def micro_step(x, y):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    try:
        return _run(h, model, counts[rank], micro_step)
    finally:
        h.remove()


def _bf16_hook_refused(rank):
    model = nn.parallel.DistributedDataParallel(_model().float().to(torch.bfloat16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(opt.param_groups[0]["params"])
    try:
        gaccum.hook(opt, 2, model=model)
        return "accepted"
    except ValueError:
        return "refused, untouched" if opt.param_groups[0]["params"] == params and "step" not in vars(opt) else "left"


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        out[(rank, "8 vs 7")] = _accumulator_run(rank, (8, 7))
        out[(rank, "8 vs 4")] = _accumulator_run(rank, (8, 4))
        out[(rank, "caught")] = _accumulator_run(rank, (8, 8), raise_at=(1, 2))
        out[(rank, "even")] = _accumulator_run(rank, (6, 6))  # and a run that ends alike still trains
        out[(rank, "hook 8 vs 7")] = _hook_run(rank, (8, 7))
        out[(rank, "bf16 hook")] = _bf16_hook_refused(rank)
    finally:
        dist.destroy_process_group()


def test_ranks_that_end_differently_get_the_same_gaccum_error_on_every_rank():
    out = mp.Manager().dict()
    ctx = mp.start_processes(_worker, args=(free_port(), out), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "a rank is waiting: the ranks' collectives did not meet"
    for case in ("8 vs 7", "8 vs 4", "caught", "hook 8 vs 7"):
        for rank in range(2):
            verdict, micro = out[(rank, case)]
            assert verdict.startswith("mismatch: gaccum: the ranks disagree"), (case, rank, verdict)
            assert micro == 0, (case, rank)  # every rank's window discarded: a known state
    assert out[(0, "even")] == out[(1, "even")] == ("ok", 2)  # 4 + a flushed partial 2
    assert out[(0, "bf16 hook")] == out[(1, "bf16 hook")] == "refused, untouched"
