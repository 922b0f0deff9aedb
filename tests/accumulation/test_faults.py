"""Faults real training meets, written as the user's loop, against a plain float64 large-batch reference.

A flaky optimizer that raises once, a backward hook that raises once, an Accumulator dropped without
close(), checkpoints loaded in the other order or into another window: each ends in a known state and
the windows after it train exactly as a large-batch loop that skipped the failed window.
"""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from conftest import max_abs_diff, max_rel_diff, mlp, regression_data
from helpers import RaiseOnce, chunks

MICRO, K = 4, 4
WINDOWS = 4  # 64 samples: 4 windows of 4 micro-batches of 4


def reference(dtype=torch.float64, skip=(), opt_fn=None, lr=0.1, clip=None, seed=0):
    """The large-batch loop written plainly: one step per window, windows in ``skip`` left out."""
    x, y = regression_data(MICRO * K * WINDOWS)
    model = mlp(seed=seed)
    opt = (opt_fn or (lambda p: torch.optim.SGD(p, lr=lr)))(model.parameters())
    for w, (xb, yb) in enumerate(chunks(x, y, MICRO * K)):
        if w in skip:
            continue
        opt.zero_grad()
        F.mse_loss(model(xb), yb).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


class Flaky(torch.optim.SGD):
    """An optimizer whose step raises once, on its ``fail_at``-th call (as a flaky I/O or NaN guard would)."""

    def __init__(self, params, fail_at, **kw):
        super().__init__(params, **kw)
        self.calls, self.fail_at = 0, fail_at

    @torch.no_grad()
    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("flaky optimizer")
        return super().step(closure)




def micro_batches(dtype=torch.float64):
    x, y = regression_data(MICRO * K * WINDOWS)
    return [(a.to(dtype), b.to(dtype)) for a, b in chunks(x, y, MICRO)]


# ------------------------------------------------------------------ an optimizer step that raises once
@pytest.mark.parametrize("path", ["accumulate", "micro_batch"])
def test_a_flaky_optimizer_under_a_gradscaler_discards_one_window_and_training_goes_on(path):
    model = mlp()
    opt = Flaky(model.parameters(), fail_at=2, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    acc = gaccum.Accumulator(model, opt, accum_steps=K, scaler=scaler)
    failures = 0
    for i, (xb, yb) in enumerate(micro_batches()):
        try:
            if path == "accumulate":
                with acc.accumulate():
                    acc.backward(F.mse_loss(model(xb), yb))
            else:
                acc.micro_batch((xb, yb), lambda m, b: F.mse_loss(m(b[0]), b[1]))
        except RuntimeError as exc:
            assert "flaky" in str(exc)
            failures += 1
            assert acc.last_result.discarded and acc.micro_in_window == 0
    assert failures == 1 and acc.optimizer_steps == 3 and acc.discarded_windows == 1
    assert scaler.get_scale() == 1024.0
    assert max_abs_diff(model.parameters(), reference(skip={1}).parameters()) < 1e-12


def test_the_hook_under_a_gradscaler_with_a_flaky_optimizer_never_steps_scaled_gradients():
    model = mlp()
    opt = Flaky(model.parameters(), fail_at=2, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    h = gaccum.hook(opt, accum_steps=K, scaler=scaler)
    failures = 0
    for xb, yb in micro_batches():
        scaler.scale(F.mse_loss(model(xb), yb)).backward()
        try:
            scaler.step(opt)
        except RuntimeError:
            failures += 1
        scaler.update()
        opt.zero_grad()
    assert failures == 1 and h.optimizer_steps == 3 and h.discarded_windows == 1
    # before: the failed step was counted and the next window stepped with gradients 1024x too large
    assert max_abs_diff(model.parameters(), reference(skip={1}).parameters()) < 1e-12


# ------------------------------------------------------------------ a backward that raises mid-window
def _with_raising_layer(dtype, when):
    torch.manual_seed(0)
    model = mlp()
    net = nn.Sequential(model[0], RaiseOnce(when), model[1], model[2]).to(dtype)
    return net


@pytest.mark.parametrize("path", ["accumulate", "micro_batch", "hook"])
def test_a_backward_that_raises_mid_window_never_keeps_part_of_a_micro_batch(path):
    net = _with_raising_layer(torch.float64, when=6)  # the 6th micro-batch: window 1, micro-step 2
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    front = gaccum.hook(opt, K) if path == "hook" else gaccum.Accumulator(net, opt, accum_steps=K)
    failures = 0
    for xb, yb in micro_batches():
        try:
            if path == "accumulate":
                with front.accumulate():
                    front.backward(F.mse_loss(net(xb), yb))
            elif path == "micro_batch":
                front.micro_batch((xb, yb), lambda m, b: F.mse_loss(m(b[0]), b[1]))
            else:
                F.mse_loss(net(xb), yb).backward()
                opt.step()
                opt.zero_grad()
        except RuntimeError as exc:
            assert "backward hook failed" in str(exc)
            failures += 1
    assert failures == 1 and front.discarded_windows == 1
    # window 1 lost micro-batches 4-5 (discarded); micro-batches 6.. form the windows after it
    x, y = regression_data(MICRO * K * WINDOWS)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    starts = [0, 6 * MICRO, 10 * MICRO]  # windows: 0-3, 6-9, 10-13 (and 14-15 left partial)
    for s in starts:
        ref_opt.zero_grad()
        F.mse_loss(ref(x[s:s + MICRO * K]), y[s:s + MICRO * K]).backward()
        ref_opt.step()
    assert front.optimizer_steps == 3 and front.micro_in_window == 2
    assert max_abs_diff([p for p in net.parameters()], ref.parameters()) < 1e-12


@pytest.mark.parametrize("path", ["accumulate", "hook"])
def test_a_backward_that_raises_on_a_bf16_model_leaves_the_fp32_masters_consistent(path):
    net = _with_raising_layer(torch.bfloat16, when=6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    front = gaccum.hook(opt, K, max_grad_norm=1e9) if path == "hook" else gaccum.Accumulator(net, opt, accum_steps=K)
    for xb, yb in micro_batches(torch.bfloat16):
        try:
            if path == "hook":
                F.mse_loss(net(xb).float(), yb.float()).backward()
                opt.step()
            else:
                with front.accumulate():
                    front.backward(F.mse_loss(net(xb).float(), yb.float()))
        except RuntimeError as exc:
            assert "backward hook failed" in str(exc)
    # before: every later boundary raised "masters 5 and 9 overlap in memory"
    assert front.discarded_windows == 1 and front.optimizer_steps == 3
    x, y = regression_data(MICRO * K * WINDOWS)
    x, y = x.bfloat16().float(), y.bfloat16().float()
    ref = mlp(torch.float32)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in (0, 6 * MICRO, 10 * MICRO):
        ref_opt.zero_grad()
        F.mse_loss(ref(x[s:s + MICRO * K]), y[s:s + MICRO * K]).backward()
        ref_opt.step()
    assert max_rel_diff(net.parameters(), ref.parameters()) < 5e-2


# ------------------------------------------------------------------ teardown
def test_a_dropped_bf16_accumulator_gives_the_model_and_optimizer_back():
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    assert opt.param_groups[0]["params"][0] is not params[0]  # the FP32 copies are in
    del acc
    gc.collect()
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
    x, y = regression_data(8, dtype=torch.float32)
    F.mse_loss(model(x.bfloat16()).float(), y).backward()  # a plain loop trains again
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    gaccum.Accumulator(model, opt, accum_steps=2).close()  # and a new Accumulator can be built


def test_every_call_after_close_raises_naming_the_state():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    acc.close()
    acc.close()  # idempotent
    x, y = regression_data(4)
    assert acc.state is gaccum.WindowState.CLOSED
    for call in (lambda: acc.accumulate().__enter__(), acc.flush, acc.state_dict, acc.zero_grad,
                 lambda: acc.micro_batch((x, y), lambda m, b: F.mse_loss(m(b[0]), b[1]))):
        with pytest.raises(gaccum.StateError, match="closed"):
            call()
    h = gaccum.hook(opt, 2)
    h.remove()
    with pytest.raises(gaccum.StateError, match="closed"):
        h.flush()


def test_a_refused_constructor_leaves_the_optimizer_as_it_was():
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(opt.param_groups[0]["params"])
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        gaccum.Accumulator(model, opt, accum_steps=2, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    assert opt.param_groups[0]["params"] == params and "step" not in vars(opt)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters() if p._post_accumulate_grad_hooks)


# ------------------------------------------------------------------ plans, clips and resume order
def test_an_accumulator_keeps_fp32_masters_only_when_its_plan_measured_them():
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sample = lambda b: (torch.randn(b, 6).bfloat16(), torch.randn(b, 3).bfloat16())  # noqa: E731
    loss = lambda m, b: F.mse_loss(m(b[0]).float(), b[1].float())  # noqa: E731
    for masters in (False, True):
        p = gaccum.plan(model, target_bs=64, sample=sample, loss_fn=loss, optimizer=opt, memory_limit="64MiB",
                        master_grads=masters, cache=False)
        acc = gaccum.Accumulator(model, opt, plan=p)
        assert acc.uses_master_grads is masters
        acc.close()
        acc = gaccum.Accumulator(model, opt, plan=p.to_dict())  # a saved plan works as well
        assert acc.uses_master_grads is masters
        acc.close()
    with pytest.raises(ValueError, match="measured with master_grads=True"):
        gaccum.Accumulator(model, opt, plan=p, master_grads=False)


def test_the_hook_on_a_bf16_model_warns_that_a_loop_clip_cannot_reach_the_window():
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="pass max_grad_norm="):
        gaccum.hook(opt, 2).remove()


def test_bf16_resume_is_bitwise_whichever_is_loaded_first():
    def bf16():
        return mlp(torch.float32).to(torch.bfloat16)

    x, y = regression_data(96, dtype=torch.float32)
    x, y = x.bfloat16(), y.bfloat16()

    def run(acc, model, lo, hi):
        for i in range(lo, hi, 4):
            with acc.accumulate():
                acc.backward(F.mse_loss(model(x[i:i + 4]).float(), y[i:i + 4].float()))

    ref = bf16()
    ref_acc = gaccum.Accumulator(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), accum_steps=4)
    run(ref_acc, ref, 0, 96)
    model = bf16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = gaccum.Accumulator(model, opt, accum_steps=4)
    run(acc, model, 0, 40)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()})
    model2 = bf16()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    acc2 = gaccum.Accumulator(model2, opt2, accum_steps=4)
    acc2.load_state_dict(ckpt["acc"])
    model2.load_state_dict(ckpt["model"])  # after the Accumulator's: was 0.002 off after 3 windows
    run(acc2, model2, 40, 96)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), ref.parameters()))


# ------------------------------------------------------------------ checkpoints that cannot mean the same
def _mid_window(accum_steps=4, scaler=None):
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=accum_steps,
                             scaler=scaler)
    x, y = regression_data(8)
    with acc.accumulate():
        acc.backward(F.mse_loss(model(x), y))
    return acc


def test_a_mid_window_checkpoint_refuses_another_window_or_scaler_and_changes_nothing():
    state = _mid_window(4).state_dict()
    other = _mid_window(3)
    before = [p.grad.clone() for p in other.core.params]
    with pytest.raises(ValueError, match="accum_steps=4"):
        other.load_state_dict(state)
    assert other.accum_steps == 3 and other.micro_in_window == 1
    assert all(torch.equal(p.grad, b) for p, b in zip(other.core.params, before))
    with pytest.raises(TypeError, match="the dict that state_dict"):
        other.load_state_dict(None)
    scaled = _mid_window(4, torch.amp.GradScaler("cpu", init_scale=1024.0)).state_dict()
    with pytest.raises(ValueError, match="with a GradScaler"):
        _mid_window(4).load_state_dict(scaled)


def test_a_hook_checkpoint_resumes_mid_window_exactly():
    x, y = regression_data(64)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = gaccum.hook(opt, K)
    batches = chunks(x, y, MICRO)
    for xb, yb in batches[:6]:
        F.mse_loss(model(xb), yb).backward()
        opt.step()
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "hook": h.state_dict()})
    model2 = mlp(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    h2 = gaccum.hook(opt2, K)
    h2.load_state_dict(ckpt["hook"])
    for xb, yb in batches[6:]:
        F.mse_loss(model2(xb), yb).backward()
        opt2.step()
        model2.zero_grad()
    assert h2.optimizer_steps == 4
    assert max_abs_diff(model2.parameters(), reference().parameters()) < 1e-12


# ------------------------------------------------------------------ bad arguments
def test_bad_arguments_are_named():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="plan= takes"):
        gaccum.Accumulator(model, opt, plan=5)
    with pytest.raises(TypeError, match="not a saved plan"):
        gaccum.Accumulator(model, opt, plan={"accum": 3})
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    calls = []
    with pytest.raises(ValueError, match="empty batch"):
        acc.micro_batch((torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)),
                        lambda m, b: calls.append(1))
    assert not calls  # refused before the forward ran
    x, y = regression_data(8)
    for tol in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            gaccum.verify(mlp(), lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 4, tolerance=tol)
    with pytest.raises(ValueError, match="finite"):
        gaccum.scale_lr(float("inf"), 32, 64)
    for v in (float("inf"), float("nan"), 0.5):
        with pytest.raises(ValueError, match="memory size"):
            gaccum.parse_bytes(v)
