"""The Python side of the CUDA path, run in CI: csrc/'s kernel built against the host emulation and
loaded as gaccum.ops' backend for CPU tensors. Everything between the op (or MasterGrads' hot path) and
the launch runs as it does on a GPU -- the split into kernel-eligible and fallback tensors, pointer
tables, the MasterSet registered once, the launch call -- and is checked against float64 and against
the PyTorch fallback, bit for bit."""

from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

import gaccum
from gaccum import _ext, _hostemu, ops
from gaccum.accumulation import MasterGrads

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the host emulation")


@pytest.fixture(scope="module")
def emulated():
    module = _hostemu.load_module()
    assert module.device_count() == 1  # the emulated device
    return module


@pytest.fixture
def host(emulated):
    prev = ops.set_host_backend(emulated)
    yield emulated
    ops.set_host_backend(prev)


def test_the_emulated_module_is_never_taken_for_an_imported_gaccum_C(emulated):
    """Both are `_C` extension modules; loaded under the real one's name, Python hands back the real one."""
    prebuilt = _ext._find_prebuilt()
    if prebuilt is not None and not torch.cuda.is_available():
        assert _ext.load_from(prebuilt).device_count() == 0  # no GPU here: the real module says so
    assert _hostemu.load_module().device_count() == 1


def expected(m: torch.Tensor, g: torch.Tensor, s: float, overwrite: bool = False) -> torch.Tensor:
    """float32((0 or m) + float32(g * s)): each step in float64, then rounded, which is exact per step."""
    prod = (g.double().numpy() * np.float64(np.float32(s))).astype(np.float32)
    base = np.zeros(m.shape) if overwrite else m.double().numpy()
    return torch.from_numpy((base + prod.astype(np.float64)).astype(np.float32))


def test_backend_reports_the_emulation(host):
    assert ops.backend_for("cpu") == "host-emulation"


@pytest.mark.parametrize("overwrite", [False, True])
def test_op_through_the_kernel_path_equals_float64_and_the_fallback(host, monkeypatch, overwrite):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3 * 65536 + 9, generator=gen)
    conv = torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    grads = [base[1:70002], base.half()[3:40003], base.bfloat16()[5:], torch.randn(7, generator=gen),
             torch.zeros(0), conv]
    masters_k = [torch.randn(g.shape, generator=gen) for g in grads]
    masters_f = [m.clone() for m in masters_k]
    want = [expected(m, g, 0.375, overwrite) for m, g in zip(masters_k, grads)]
    seen = []
    real_fallback = ops._fallback
    monkeypatch.setattr(ops, "_fallback", lambda g, *a, **k: (seen.append(len(g)), real_fallback(g, *a, **k)))
    found_k, sq_k = torch.zeros(1), torch.zeros(1)
    ops.unscale_check_accumulate_(grads, masters_k, found_k, 0.375, overwrite=overwrite, sq_norm=sq_k)
    # only the channels_last gradient (its master is contiguous) left the kernel for the fallback
    assert seen == [1]
    found_f, sq_f = torch.zeros(1), torch.zeros(1)
    real_fallback([g.clone() for g in grads], masters_f, found_f, torch.tensor([0.375]), overwrite, False, sq_f)
    for k, f, w in zip(masters_k, masters_f, want):
        assert torch.equal(k, w) and torch.equal(k, f)
    assert float(found_k) == float(found_f) == 0.0
    torch.testing.assert_close(sq_k, sq_f, rtol=1e-5, atol=0)


def test_inf_zero_grads_and_a_flag_that_stays_set(host):
    g = torch.randn(65536 * 2 + 3)
    g[65536 + 7] = float("inf")
    m = torch.zeros_like(g)
    found = torch.zeros(1)
    ops.unscale_check_accumulate_([g, torch.ones(5)], [m, torch.zeros(5)], found, 1.0, zero_grads=True)
    assert float(found) == 1.0 and not torch.isfinite(m).all() and not g.any()
    ops.unscale_check_accumulate_([torch.ones(5)], [torch.zeros(5)], found, 1.0)
    assert float(found) == 1.0  # never cleared


def test_overlapping_masters_are_refused_before_any_launch(host):
    flat = torch.zeros(100)
    with pytest.raises(ValueError, match="overlap"):
        ops.unscale_check_accumulate_([torch.ones(60), torch.ones(60)], [flat[:60], flat[40:]], torch.zeros(1))
    assert not flat.any()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 33)  # 33 x 145: not a multiple of 4, the next master pads
        self.fc2 = nn.Linear(33, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_master_grads_hot_path_equals_the_fallback_and_float64(emulated, channels_last):
    """MasterGrads registers its masters with the kernel once (FusedMasters) and flushes by index;
    the window's FP32 gradient is the fallback's, bit for bit, and float64's to rounding."""
    torch.manual_seed(0)
    base = Net().bfloat16()
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 6, 6, generator=gen).bfloat16(), torch.randint(0, 5, (n,), generator=gen))
               for n in (4, 4, 4)]

    def window(use_host):
        model = Net().bfloat16()
        model.load_state_dict(base.state_dict())
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        prev = ops.set_host_backend(emulated if use_host else None)
        try:
            masters = MasterGrads(list(model.parameters()))
            assert (masters._fused is not None) == use_host
            for x, y in batches:
                loss = nn.functional.cross_entropy(model(x).float(), y) / len(batches)
                loss.backward()
            masters.finalize()
            out = [v.clone() for v in masters.views]
            masters.remove()
            return out, model
        finally:
            ops.set_host_backend(prev)

    kernel, model = window(True)
    fallback, _ = window(False)
    assert all(torch.equal(a, b) for a, b in zip(kernel, fallback))
    # float64: the same bf16 model's gradients summed in float64
    ref = [torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()]
    for x, y in batches:
        model.zero_grad()
        (nn.functional.cross_entropy(model(x).float(), y) / len(batches)).backward()
        for r, p in zip(ref, model.parameters()):
            r += p.grad.double()
    for k, r in zip(kernel, ref):
        torch.testing.assert_close(k.double(), r, rtol=1e-6, atol=1e-7)


def test_hot_path_keeps_no_half_gradient_after_a_flush(host):
    model = Net().bfloat16()
    masters = MasterGrads(list(model.parameters()))
    assert masters._fused is not None
    refs = []
    for p in model.parameters():  # registered after MasterGrads' hooks: sees each half gradient
        p.register_post_accumulate_grad_hook(lambda p: refs.append(weakref.ref(p.grad)))
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6).bfloat16()).float().sum().backward()
    gc.collect()
    assert len(refs) == 3 * len(list(model.parameters())) and all(r() is None for r in refs)
    assert all(p.grad is None for p in model.parameters())
    masters.remove()


def test_accumulator_steps_the_same_through_the_hot_path(emulated):
    """A bf16 model under the Accumulator: two windows with masters flushed by the emulated kernel
    give the weights the fallback gives, bit for bit (the hot path changes where, not what)."""
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).bfloat16().state_dict()
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 12, generator=gen).bfloat16(), torch.randint(0, 3, (n,), generator=gen))
            for n in (4, 4, 4, 3, 4, 4, 4, 4)]

    def train(use_host):
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).bfloat16()
        model.load_state_dict(init)
        prev = ops.set_host_backend(emulated if use_host else None)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            acc = gaccum.Accumulator(model, opt, accum_steps=4)
            assert (acc.core.masters._fused is not None) == use_host
            for x, y in data:
                with acc.accumulate():
                    acc.backward(nn.functional.cross_entropy(model(x).float(), y), num_items=len(y))
            acc.close()
        finally:
            ops.set_host_backend(prev)
        return [p.detach().clone() for p in model.parameters()]

    kernel, fallback = train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(kernel, fallback))
    assert not all(torch.equal(a, b) for a, b in zip(kernel, init.values()))


def test_fused_masters_refuse_what_the_kernel_cannot_take(host):
    found, inv = torch.zeros(1), torch.ones(1)
    ok = [torch.zeros(8), torch.zeros(3)]
    with pytest.raises(ValueError, match="master 1 must be a contiguous float32"):
        ops.fused_masters([ok[0], torch.zeros(3, dtype=torch.float64)], [torch.bfloat16] * 2, found, inv)
    with pytest.raises(TypeError, match="gradient 0 has dtype torch.float64"):
        ops.fused_masters(ok, [torch.float64, torch.bfloat16], found, inv)
    flat = torch.zeros(10)
    with pytest.raises(ValueError, match="overlap"):
        ops.fused_masters([flat[:6], flat[4:]], [torch.float32] * 2, found, inv)
    with pytest.raises(TypeError, match="found_inf must be a one-element float32"):
        ops.fused_masters(ok, [torch.float32] * 2, torch.zeros(2), inv)
    fused = ops.fused_masters(ok, [torch.float32] * 2, found, inv)
    with pytest.raises(IndexError):
        fused.launch([0, 2], [torch.ones(8).data_ptr(), torch.ones(3).data_ptr()], True)  # 2 is outside the set
    assert not ok[0].any()
