"""The hook on the loops people really write, against one large batch written plainly (float64).

``model.zero_grad()`` instead of the optimizer's, a clip every micro-step, the
nanoGPT pattern (``scaler.unscale_``, clip, ``scaler.step``), a partial last
window with a scheduler: each must give the large-batch result.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gaccum
from conftest import max_abs_diff, max_rel_diff, mlp, regression_data
from helpers import chunks, free_port

MICRO, K = 4, 4  # 4 micro-batches of 4 make one large batch of 16


def large_batch(model, opt, batches, clip=None, sched=None):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("zero", ["model", "optimizer", "none-first"])
def test_model_zero_grad_does_not_wipe_the_window(zero):
    x, y = regression_data(48)
    ref, ours = mlp(), mlp()
    large_batch(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), chunks(x, y, MICRO * K))
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    h = gaccum.hook(opt, accum_steps=K)
    for xb, yb in chunks(x, y, MICRO):
        if zero == "none-first":
            ours.zero_grad(set_to_none=False)  # zeroing in place, before the backward
        F.mse_loss(ours(xb), yb).backward()
        opt.step()
        if zero == "model":
            ours.zero_grad()
        elif zero == "optimizer":
            opt.zero_grad()
    assert h.optimizer_steps == 3
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_a_clip_every_micro_step_clips_the_window_as_a_large_batch_does():
    x, y = regression_data(48)
    ref, ours = mlp(), mlp()
    large_batch(ref, torch.optim.SGD(ref.parameters(), lr=0.5), chunks(x, y, MICRO * K), clip=0.05)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    gaccum.hook(opt, accum_steps=K)
    norms = []
    for xb, yb in chunks(x, y, MICRO):
        F.mse_loss(ours(xb), yb).backward()
        norms.append(float(nn.utils.clip_grad_norm_(ours.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
    assert norms[0] == 0.0 and norms[K - 1] > 0.05  # between boundaries there is nothing to clip
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_nanogpt_pattern_unscale_clip_scaler_step():
    x, y = regression_data(48, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    ref_opt, opt = torch.optim.SGD(ref.parameters(), lr=0.5), torch.optim.SGD(ours.parameters(), lr=0.5)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    for xb, yb in chunks(x, y, MICRO * K):
        ref_scaler.scale(F.mse_loss(ref(xb), yb)).backward()
        ref_scaler.unscale_(ref_opt)
        nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    h = gaccum.hook(opt, accum_steps=K, scaler=scaler)
    clipped = []
    for xb, yb in chunks(x, y, MICRO):
        scaler.scale(F.mse_loss(ours(xb), yb)).backward()
        scaler.unscale_(opt)
        clipped.append(float(nn.utils.clip_grad_norm_(ours.parameters(), 0.05)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert h.optimizer_steps == 3 and scaler.get_scale() == ref_scaler.get_scale()
    assert max(clipped) < 10  # the clip saw the unscaled window (~0.1-1), never the scaled one (~1e3-1e4)
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-6


def test_flush_steps_a_partial_window_and_keeps_the_scheduler_in_step():
    x, y = regression_data(24)  # 16 + a partial 8
    ref, ours = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    large_batch(ref, ref_opt, [(x[:16], y[:16]), (x[16:], y[16:])], sched=ref_sched)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    h = gaccum.hook(opt, accum_steps=K, scheduler=sched)
    for xb, yb in chunks(x, y, MICRO):
        F.mse_loss(ours(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert h.flush().stepped
    assert h.optimizer_steps == 2 and sched.last_epoch == 2 == ref_sched.last_epoch
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_nonfinite_window_is_discarded_on_every_path_without_a_scaler():
    for dtype in (torch.float64, torch.bfloat16):
        model = mlp().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        acc = gaccum.Accumulator(model, opt, accum_steps=2)
        x, y = regression_data(8)
        with pytest.warns(RuntimeWarning, match="discarded"):
            for i in range(2):
                with acc.accumulate():
                    out = model(x.to(dtype))
                    # a finite loss whose gradient is NaN: sqrt at 0
                    loss = F.mse_loss(out, y.to(dtype)) + (out * 0).sqrt().sum() * (i == 1)
                    r = acc.backward(loss)
        assert r.skipped and not r.stepped and acc.skipped_steps == 1 and acc.optimizer_steps == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        acc.close()


def test_one_accumulator_or_hook_per_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    with pytest.raises(RuntimeError, match="already has a gaccum Accumulator"):
        gaccum.Accumulator(model, opt, accum_steps=2)
    with pytest.raises(RuntimeError, match="already has a gaccum Accumulator"):
        gaccum.hook(opt, accum_steps=2)
    acc.close()
    h = gaccum.hook(opt, accum_steps=2)
    with pytest.raises(RuntimeError, match="already has a gaccum hook"):
        gaccum.Accumulator(model, opt, accum_steps=2)
    h.remove()
    gaccum.Accumulator(model, opt, accum_steps=2).close()


def _hook_under_ddp(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(mlp())
        try:
            gaccum.hook(torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
            out[rank] = "no error"
        except ValueError as exc:
            out[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_hook_refuses_under_ddp_with_the_way_out():
    out = mp.Manager().dict()
    mp.start_processes(_hook_under_ddp, args=(free_port(), out), nprocs=2, start_method="spawn", join=True)
    assert all("no_sync" in out[r] and "Accumulator" in out[r] for r in range(2))


def test_hook_on_gpt2_with_model_zero_grad_and_a_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).double()
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 16), generator=g)

    def loss(m, b):
        logits = m(input_ids=b).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), b[:, 1:].reshape(-1))

    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for i in range(0, 32, 16):
        ref_opt.zero_grad()
        loss(ref, ids[i:i + 16]).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    gaccum.hook(opt, accum_steps=4)
    for i in range(0, 32, 4):
        loss(ours, ids[i:i + 4]).backward()
        nn.utils.clip_grad_norm_(ours.parameters(), 0.5)
        opt.step()
        ours.zero_grad()
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def _hook_ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, y = regression_data(40)
        model = nn.parallel.DistributedDataParallel(mlp())
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        reductions = []

        def counting(state, bucket):  # DDP's public comm-hook API: count what DDP reduces
            reductions.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        h = gaccum.hook(opt, accum_steps=2, model=model)
        for i in range(5):  # global micro-batches of 8: 4 per rank; windows of 2, then a partial one
            lo = i * 8 + rank * 4
            F.mse_loss(model(x[lo:lo + 4]), y[lo:lo + 4]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            model.zero_grad()
        r = h.flush()
        out[rank] = ([p.detach().clone() for p in model.parameters()], h.optimizer_steps, r.stepped, len(reductions))
        h.remove()
    finally:
        dist.destroy_process_group()


def test_hook_with_the_ddp_model_reduces_once_per_window_and_equals_the_global_batch():
    out = mp.Manager().dict()
    mp.start_processes(_hook_ddp_worker, args=(free_port(), out), nprocs=2, start_method="spawn", join=True)
    x, y = regression_data(40)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    large_batch(ref, ref_opt, [(x[:16], y[:16]), (x[16:32], y[16:32])], clip=0.05)
    large_batch(ref, ref_opt, [(x[32:], y[32:])])  # flush() runs after the loop: the loop's clip never sees it
    for rank in range(2):
        params, steps, flushed, reductions = out[rank]
        assert steps == 3 and flushed
        assert reductions == 2  # one bucket, once per full window (the partial one is flush()'s own)
        assert max_abs_diff(params, ref.parameters()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_with_the_model_the_hook_weighs_a_short_micro_batch_by_its_size(dtype):
    x, y = regression_data(22)  # windows of 4 x 4 = 16, then 4 + 2 flushed
    if dtype == torch.float64:
        ref, xr, yr = mlp(), x, y
    else:  # the bf16 model against FP32 training on the same bf16-rounded data
        ref, xr, yr = mlp(torch.float32), x.bfloat16().float(), y.bfloat16().float()
    large_batch(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(xr[:16], yr[:16]), (xr[16:], yr[16:])])
    ours = mlp(torch.float32).to(dtype) if dtype != torch.float64 else mlp()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    h = gaccum.hook(opt, accum_steps=K, model=ours, max_grad_norm=1e9 if dtype != torch.float64 else None)
    for xb, yb in chunks(x.to(dtype), y.to(dtype), MICRO):
        F.mse_loss(ours(xb).double(), yb.double()).backward()
        opt.step()
        opt.zero_grad()
    assert h.flush().stepped and h.optimizer_steps == 2
    if dtype == torch.float64:  # was a mean of the two micro-batch means: the 2-sample one weighed as 4
        assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12
    else:
        assert max_rel_diff(ours.parameters(), ref.parameters()) < 3e-2
