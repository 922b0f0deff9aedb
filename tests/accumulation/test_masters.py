"""FP32 master weights never go stale: loads, resumes, close() and verify() on a bf16 model."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gaccum
from conftest import mlp, regression_data


def bf16_model(seed=0):
    return mlp(torch.float32, seed=seed).to(torch.bfloat16)


def data(n=64, seed=1):
    x, y = regression_data(n, dtype=torch.float32, seed=seed)
    return x.bfloat16(), y.bfloat16()


def run(acc, model, x, y, start, stop, size=4):
    for i in range(start, stop, size):
        with acc.accumulate():
            acc.backward(F.mse_loss(model(x[i:i + size]).float(), y[i:i + size].float()))


def test_weights_loaded_after_the_accumulator_was_built_are_the_ones_stepped():
    model, other = bf16_model(0), bf16_model(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    model.load_state_dict(other.state_dict())
    x, y = data(8)
    run(acc, model, x, y, 0, 8)
    assert acc.optimizer_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))  # lr=0 moves nothing


def test_resume_in_the_usual_order_is_bitwise():
    x, y = data(96)
    ref = bf16_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_acc = gaccum.Accumulator(ref, ref_opt, accum_steps=4)
    run(ref_acc, ref, x, y, 0, 96)

    model = bf16_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = gaccum.Accumulator(model, opt, accum_steps=4)
    run(acc, model, x, y, 0, 40)  # two windows and a half
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()})

    model2 = bf16_model(3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])  # casts the FP32 state to bf16: the checkpoint's FP32 copy undoes it
    acc2 = gaccum.Accumulator(model2, opt2, accum_steps=4)
    acc2.load_state_dict(ckpt["acc"])
    run(acc2, model2, x, y, 40, 96)
    assert acc2.optimizer_steps == ref_acc.optimizer_steps == 6
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), ref.parameters()))


def test_after_close_the_optimizer_steps_the_models_own_parameters():
    model = bf16_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    x, y = data(8)
    run(acc, model, x, y, 0, 8)
    acc.close()
    before = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(x).float(), y.float()).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(v.dtype == torch.bfloat16 for s in opt.state.values() for k, v in s.items() if k != "step")


def test_verify_works_beside_a_live_accumulator_and_leaves_its_window_alone():
    model = bf16_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=4)
    x, y = data(16)
    run(acc, model, x, y, 0, 8)  # half a window in the FP32 masters
    window = acc.core.masters.flat.clone()
    report = gaccum.verify(model, lambda m, b: F.mse_loss(m(b[0]).float(), b[1].float()), (x, y), 4)
    assert report.passed
    assert torch.equal(acc.core.masters.flat, window)
    run(acc, model, x, y, 8, 16)
    assert acc.optimizer_steps == 1


def test_load_state_dict_checks_every_shape_before_assigning():
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    x, y = regression_data(4)
    with acc.accumulate():
        acc.backward(F.mse_loss(model(x), y))
    state = acc.state_dict()
    before = [p.grad.clone() for p in model.parameters()]
    bad = dict(state, grads=list(state["grads"][:-1]) + [torch.zeros(7)], micro=0)
    with pytest.raises(ValueError, match="do not match"):
        acc.load_state_dict(bad)
    assert acc.core.micro == 1 and all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_a_parameter_whose_shape_changed_is_refused_before_any_master_is_read_past():
    model = bf16_model()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    x, y = data(4)
    model[2].bias.data = torch.zeros(1, dtype=torch.bfloat16)  # broadcasts in the forward: 1 element, master 3
    with pytest.raises(ValueError, match="now has 1 elements but its FP32 master 3"):
        with acc.accumulate():
            acc.backward(F.mse_loss(model(x).float(), y.float()))


def test_on_cpu_a_flush_waits_for_32_mib():
    from gaccum.accumulation.masters import bucket_bytes_for

    assert bucket_bytes_for(torch.device("cpu")) == 32 << 20
    model = bf16_model()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    assert acc.core.masters.bucket_bytes == 32 << 20
    acc.close()
