import pytest
import torch
import torch.nn.functional as F

import gaccum
from conftest import max_abs_diff, max_rel_diff, mlp, regression_data
from helpers import chunks, large_batch_train


def unchanged_loop(model, opt, micro, scaler=None, sched=None, dtype=None):
    """The loop a user will not touch: step and zero_grad on every micro-batch."""
    for x, y in micro:
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_hook_makes_unchanged_loop_match_large_batch(opt_name):
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else (
        lambda p: torch.optim.AdamW(p, lr=1e-2))
    x, y = regression_data(48)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, make(ref.parameters()), chunks(x, y, 16))
    opt = make(ours.parameters())
    h = gaccum.hook(opt, accum_steps=4)
    unchanged_loop(ours, opt, chunks(x, y, 4))
    assert h.optimizer_steps == 3
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-10


def test_hook_zero_grad_keeps_the_window_and_flush_weights_partial_window():
    x, y = regression_data(24)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:16], y[:16]), (x[16:], y[16:])])
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    h = gaccum.hook(opt, accum_steps=4)
    unchanged_loop(ours, opt, chunks(x, y, 4)[:2])
    ours.zero_grad()  # neither this nor the loop's optimizer.zero_grad() reaches the window
    unchanged_loop(ours, opt, chunks(x, y, 4)[2:])
    assert h.flush().stepped
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_hook_with_scaler_and_scheduler():
    x, y = regression_data(32, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), chunks(x, y, 16))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    h = gaccum.hook(opt, accum_steps=4, scaler=scaler, scheduler=sched)
    unchanged_loop(ours, opt, chunks(x, y, 4), scaler=scaler, sched=sched)
    assert h.optimizer_steps == 2 and sched.last_epoch == 2
    assert scaler.get_scale() == 1024.0  # grew once per real step (growth_interval=1), not per micro-batch
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-6


def test_hook_half_params_accumulate_in_fp32_masters():
    x, y = regression_data(64, dtype=torch.float32)
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gaccum.hook(opt, accum_steps=8)
    assert h.core.masters is not None
    unchanged_loop(model, opt, chunks(x, y, 4), dtype=torch.bfloat16)
    assert h.optimizer_steps == 2
    ref = mlp(torch.float32)
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), chunks(x.bfloat16().float(), y.bfloat16().float(), 32))
    assert max_rel_diff(model.parameters(), ref.parameters()) < 5e-2


def test_hook_remove_restores_optimizer():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gaccum.hook(opt, accum_steps=2)
    with pytest.raises(RuntimeError, match="already has a gaccum hook"):
        gaccum.hook(opt, accum_steps=2)
    h.remove()
    assert "step" not in vars(opt) and "zero_grad" not in vars(opt)
    x, y = regression_data(4)
    F.mse_loss(model(x), y).backward()
    before = [p.clone() for p in model.parameters()]
    opt.step()  # the real step again
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hook_bad_input():
    with pytest.raises(TypeError):
        gaccum.hook("opt", accum_steps=2)
    m = mlp()
    with pytest.raises(ValueError):
        gaccum.hook(torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=0)
