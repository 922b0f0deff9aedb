"""Misuse is named, never half-done: each wrong argument gets a TypeError/ValueError saying what to pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from conftest import mlp, regression_data


def test_wrong_arguments_say_what_to_pass_and_change_nothing():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="scheduler must be an LR scheduler with a step"):
        gaccum.Accumulator(model, opt, accum_steps=2, scheduler="linear")
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        gaccum.Accumulator(model, opt, accum_steps=2, scaler=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        gaccum.Accumulator(model, opt, accum_steps=2, max_grad_norm=float("nan"))
    with pytest.raises(TypeError, match="scheduler must be"):
        gaccum.hook(opt, accum_steps=2, scheduler="linear")
    assert "step" not in vars(opt)  # the failed hook patched nothing
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    gaccum.Accumulator(model, opt, accum_steps=2).close()  # and nothing was left registered on the optimizer


def test_an_optimizer_missing_trainable_parameters_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) are not in the optimizer \(1.weight, 1.bias\)"):
        gaccum.Accumulator(model, opt, accum_steps=2)


def test_verify_misuse_and_a_float32_layer_in_a_float64_model_is_explained():
    model = mlp()
    x, y = regression_data(8)
    with pytest.raises(ValueError, match="larger than the batch"):
        gaccum.verify(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 16)
    with pytest.raises(ValueError, match="scalar"):
        gaccum.verify(model, lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="none"), (x, y), 4)

    class Float32Norm(nn.Module):  # as Llama's RMSNorm: computes in float32, returns the input dtype
        def forward(self, h):
            h32 = h.float()
            return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)

    net = nn.Sequential(nn.Linear(6, 12), Float32Norm(), nn.Tanh(), nn.Linear(12, 3)).double()
    report = gaccum.verify(net, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 2)
    if not report.passed:
        assert "float32 level" in str(report) and "tolerance=1e-6" in str(report)
    assert gaccum.verify(net, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 2, tolerance=1e-6).passed


def test_a_failure_inside_the_boundary_ends_the_window_in_a_known_state():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Exploding:
        calls = 0

        def step(self):
            Exploding.calls += 1
            if Exploding.calls == 1:
                raise RuntimeError("scheduler bug")

    acc = gaccum.Accumulator(model, opt, accum_steps=2, scheduler=Exploding())
    x, y = regression_data(8)
    with pytest.raises(RuntimeError, match="scheduler bug"):
        for i in range(2):
            with acc.accumulate():
                acc.backward(F.mse_loss(model(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4]))
    # the optimizer had stepped: counted; the window is gone, not half-kept
    assert acc.optimizer_steps == 1 and acc.micro_in_window == 0
    assert all(p.grad is None for p in model.parameters())
    for i in range(2):  # and training goes on
        with acc.accumulate():
            r = acc.backward(F.mse_loss(model(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4]))
    assert r.stepped and acc.optimizer_steps == 2


def test_a_failure_at_the_hooks_boundary_ends_the_window_too():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gaccum.hook(opt, accum_steps=2, max_grad_norm=float(1.0))
    x, y = regression_data(8)
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def exploding(*a, **k):  # a failure inside the boundary, before the optimizer steps
        calls.append(1)
        raise RuntimeError("clip bug")

    torch.nn.utils.clip_grad_norm_ = exploding
    try:
        with pytest.raises(RuntimeError, match="clip bug"):
            for i in range(2):
                F.mse_loss(model(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4]).backward()
                opt.step()
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip
    assert calls and h.optimizer_steps == 0 and h.core.micro == 0 and not h.stash
    assert all(p.grad is None for p in model.parameters())
    for i in range(2):  # and the next window runs normally
        F.mse_loss(model(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4]).backward()
        r = opt.step()
    assert r.stepped and h.optimizer_steps == 1
