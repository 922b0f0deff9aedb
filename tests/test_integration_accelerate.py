"""Accelerate, for real on CPU: a plan gives the Accelerator and loader; gaccum works on prepared objects."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import gaccum
from conftest import max_abs_diff, mlp, regression_data
from helpers import large_batch_train, window_plan

pytest.importorskip("accelerate")
from gaccum.integrations.accelerate import accelerator_from_plan  # noqa: E402


def test_a_plan_gives_the_accelerator_and_loader_and_accelerate_trains_the_large_batch():
    x, y = regression_data(64)
    plan = window_plan([4, 4, 4, 4])
    accelerator, loader = accelerator_from_plan(plan, TensorDataset(x, y), accelerator_kwargs={"cpu": True})
    assert accelerator.gradient_accumulation_steps == 4
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:16], y[:16]), (x[16:32], y[16:32]),
                                                                     (x[32:48], y[32:48]), (x[48:], y[48:])])
    model, opt, loader = accelerator.prepare(ours, torch.optim.SGD(ours.parameters(), lr=0.1), loader)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(xb), yb))
            opt.step()
            opt.zero_grad()
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_gaccum_accumulator_on_prepared_objects_weighs_an_uneven_window_exactly():
    x, y = regression_data(512)
    plan = window_plan([52, 51, 51, 51, 51])
    with pytest.warns(UserWarning, match="uneven"):
        accelerator, loader = accelerator_from_plan(plan, TensorDataset(x, y), accelerator_kwargs={"cpu": True})
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), [(x[:256], y[:256]), (x[256:], y[256:])])
    model, opt, loader = accelerator.prepare(ours, torch.optim.AdamW(ours.parameters(), lr=1e-2), loader)
    acc = gaccum.Accumulator(model, opt, plan=plan)
    for xb, yb in loader:
        with acc.accumulate():
            acc.backward(F.mse_loss(model(xb), yb))
    assert acc.optimizer_steps == 2
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_the_plan_owns_the_accumulation_steps_and_gaccum_never_imports_the_frameworks():
    with pytest.raises(TypeError, match="plan sets gradient_accumulation_steps"):
        accelerator_from_plan(window_plan([2]), [0, 1], accelerator_kwargs={"gradient_accumulation_steps": 3})
    code = "import sys, gaccum; print([m for m in ('accelerate', 'lightning', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_accelerate_trains_a_real_plan_under_its_budget(tmp_path, monkeypatch):
    from gaccum.accumulation import MemoryBudget

    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    plan = gaccum.plan(model, 256, lambda b: data[:b], loss, optimizer=opt, memory_limit="1MiB", headroom=0)
    assert plan.accum_steps > 1
    with pytest.warns(UserWarning) if len(set(plan.window)) > 1 else _nothing():
        accelerator, loader = accelerator_from_plan(plan, data, accelerator_kwargs={"cpu": True})
    model, opt, loader = accelerator.prepare(model, opt, loader)
    acc = gaccum.Accumulator(model, opt, plan=plan, memory_limit=plan.budget)  # OOM signal over the budget
    for xb, yb in loader:
        acc.micro_batch((xb, yb), loss)
    assert acc.optimizer_steps == 4 and acc.oom_splits == 0 and acc.peak_memory <= plan.budget


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_a_stream_gets_its_windows_from_accelerator_from_plan_and_gaccum_trains_it_exactly():
    from torch.utils.data import IterableDataset

    x, y = regression_data(22)

    class Stream(IterableDataset):  # no len(): read once, in order
        def __iter__(self):
            return iter(zip(x, y))

    plan = window_plan([4, 3, 3])
    accelerator, loader = accelerator_from_plan(plan, Stream(), accelerator_kwargs={"cpu": True})
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:10], y[:10]), (x[10:20], y[10:20]),
                                                                     (x[20:], y[20:])])
    model, opt = accelerator.prepare(ours, torch.optim.SGD(ours.parameters(), lr=0.1))
    acc = gaccum.Accumulator(model, opt, plan=plan)
    for xb, yb in loader:
        with acc.accumulate():
            acc.backward(F.mse_loss(model(xb), yb))
    assert acc.flush().stepped and acc.optimizer_steps == 3
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12
