"""Every micro-batch weighs what it holds, against one large batch in float64 written plainly."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gaccum
from conftest import max_abs_diff, mlp, regression_data
from helpers import large_batch_train, window_plan


def mse(m, b):
    return F.mse_loss(m(b[0]), b[1])


def test_micro_batch_weights_a_short_batch_by_its_size_and_flush_too():
    x, y = regression_data(38)  # a window of 8 + 8 + 8 + 3 = 27, then a flushed 8 + 3
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:27], y[:27]), (x[27:], y[27:])])
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), accum_steps=4)
    for a, b in [(0, 8), (8, 16), (16, 24), (24, 27), (27, 35), (35, 38)]:
        acc.micro_batch((x[a:b], y[a:b]), mse)
    assert acc.optimizer_steps == 1 and acc.flush().stepped
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-14


def test_plan_loader_feeds_the_uneven_window_and_a_wrong_loader_is_named():
    x, y = regression_data(512)
    plan = window_plan([52, 51, 51, 51, 51])
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:256], y[:256]), (x[256:], y[256:])])
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), plan=plan)
    loader = plan.loader(TensorDataset(x, y))
    assert [len(b[0]) for b in loader][:6] == [52, 51, 51, 51, 51, 52] and len(loader) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan's own sizes: nothing to say
        for xb, yb in loader:
            with acc.accumulate():
                acc.backward(F.mse_loss(ours(xb), yb))
    assert acc.optimizer_steps == 2
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-14
    acc.close()

    for items in (False, True):  # with num_items too: the window's samples are counted apart from its items
        model = mlp()
        acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=plan)
        with pytest.warns(RuntimeWarning, match=r"held 260 samples where the plan's window \(1 x 52 \+ 4 x 51\) holds "
                                                r"256.*plan.loader"):
            for xb, yb in DataLoader(TensorDataset(x, y), batch_size=plan.micro_batch_size):
                with acc.accumulate():
                    acc.backward(F.mse_loss(model(xb), yb), num_items=len(xb) if items else None)


@pytest.mark.parametrize("plan_window", [None, [4, 4, 4]])
def test_the_documented_loop_weighs_a_short_last_micro_batch_by_its_size(plan_window):
    """README's loop, no num_items: 18 samples in windows of 4 + 4 + 4, the last window 4 + 2 (flushed)."""
    x, y = regression_data(18)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:12], y[:12]), (x[12:], y[12:])])
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    if plan_window is None:
        acc = gaccum.Accumulator(ours, opt, accum_steps=3)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
    else:
        plan = window_plan(plan_window)
        acc = gaccum.Accumulator(ours, opt, plan=plan)
        loader = plan.loader(TensorDataset(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every size is known and weighed
        for xb, yb in loader:
            with acc.accumulate():
                acc.backward(F.mse_loss(ours(xb), yb))
        assert acc.flush().stepped
    # was 0.235 relative off the large batch of the last window's 6 samples
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_a_size_gaccum_cannot_see_is_said_at_the_first_micro_step():
    x, y = regression_data(8)
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    out = model(x)  # the forward ran before the block: gaccum never saw the batch
    with pytest.warns(RuntimeWarning, match="could not tell how many samples"):
        with acc.accumulate():
            acc.backward(F.mse_loss(out, y))
    assert acc.micro_in_window == 1


def test_window_sampler_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="window"):
        gaccum.WindowBatchSampler(range(10), [])
    with pytest.raises(TypeError, match="batch_size"):
        gaccum.window_loader(list(range(10)), [3], batch_size=4)
    assert list(gaccum.WindowBatchSampler(range(10), [4, 3], drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert list(gaccum.WindowBatchSampler(range(10), [4, 3]))[-1] == [7, 8, 9]  # short, weighted by its size
    assert len(gaccum.WindowBatchSampler(range(10), [4, 3], drop_last=True)) == 2
    assert len(gaccum.WindowBatchSampler(range(11), [4, 3])) == 3


def test_loss_backward_without_acc_backward_is_named():
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    x, y = regression_data(4)
    with pytest.raises(RuntimeError, match="without acc.backward"):
        with acc.accumulate():
            F.mse_loss(model(x), y).backward()
