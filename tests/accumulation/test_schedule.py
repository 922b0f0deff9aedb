"""Accumulation schedules: the window changes only between windows; the LR follows the rule."""

import math

import pytest
import torch
import torch.nn.functional as F

import gaccum
from conftest import max_abs_diff, mlp, regression_data


def reference(x, y, sizes, lrs, momentum=0.9):
    """Plain large-batch SGD with the given batch sizes and LRs: what the schedule must equal."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=momentum)
    start = 0
    for size, lr in zip(sizes, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        F.mse_loss(model(x[start : start + size]), y[start : start + size]).backward()
        opt.step()
        start += size
    return model


@pytest.mark.parametrize("rule,factor", [("linear", 2.0), ("sqrt", math.sqrt(2.0)), (None, 1.0)])
def test_schedule_by_step_equals_large_batches_with_the_lr_rule(rule, factor):
    x, y = regression_data(48)
    mb, lr0 = 4, 0.05
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9)
    sched = gaccum.AccumulationSchedule({0: 2, 2: 4}, by="step", lr_rule=rule)
    acc = gaccum.Accumulator(model, opt, accum_steps=sched)
    steps_at = []
    for i in range(0, 48, mb):
        r = acc.micro_batch((x[i : i + mb], y[i : i + mb]), lambda m, b: F.mse_loss(m(b[0]), b[1]))
        if r.stepped:
            steps_at.append(i + mb)
    assert steps_at == [8, 16, 32, 48]  # windows of 2, 2, then 4 micro-batches
    assert acc.core.accum_history == [(0, 2), (2, 4)]
    assert acc.accum_steps == 4
    ref = reference(x, y, [8, 8, 16, 16], [lr0, lr0, lr0 * factor, lr0 * factor])
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-10
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * factor, rel=1e-15)


def test_a_dict_is_a_schedule_by_step_and_the_lr_scheduler_keeps_the_scale():
    x, y = regression_data(40)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    acc = gaccum.Accumulator(model, opt, accum_steps={0: 1, 2: 3}, scheduler=sched)
    for i in range(0, 20, 4):  # 2 steps of 1 micro-batch, then one of 3
        with acc.accumulate():
            acc.backward(F.mse_loss(model(x[i : i + 4]), y[i : i + 4]))
    assert acc.optimizer_steps == 3
    # after the change at step 2 the scheduler's base LR is 3x: lambda(3) * 0.3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * lam(3))
    assert sched.base_lrs == [pytest.approx(0.3)]
    assert sched.get_last_lr() == [pytest.approx(0.3 * lam(3))]


def test_schedule_by_epoch_changes_only_at_a_window_boundary():
    x, y = regression_data(40)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=gaccum.AccumulationSchedule({0: 2, 1: 3}, by="epoch"))
    stepped = []

    def micro(i):
        with acc.accumulate():
            stepped.append(acc.backward(F.mse_loss(model(x[i : i + 2]), y[i : i + 2])).stepped)

    acc.set_epoch(0)
    for i in range(3):  # one full window, then one micro-batch into the next
        micro(2 * i)
    acc.set_epoch(1)  # mid-window: the open window still ends after 2
    assert acc.accum_steps == 2 and acc.epoch == 1
    for i in range(3, 7):
        micro(2 * i)
    assert stepped == [False, True, False, True, False, False, True]
    assert acc.accum_steps == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.15)


def test_hook_follows_a_schedule():
    x, y = regression_data(32)
    lr0 = 0.05
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9)
    h = gaccum.hook(opt, accum_steps={0: 2, 1: 3})
    for i in range(0, 32, 4):  # 8 micro-batches: windows 2, 3, 3
        opt.zero_grad()
        F.mse_loss(model(x[i : i + 4]), y[i : i + 4]).backward()
        opt.step()
    assert h.optimizer_steps == 3 and h.accum_steps == 3
    h.remove()
    ref = reference(x, y, [8, 12, 12], [lr0, 1.5 * lr0, 1.5 * lr0])
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-10


def test_schedule_survives_a_checkpoint():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gaccum.Accumulator(model, opt, accum_steps=gaccum.AccumulationSchedule({0: 2, 3: 5}, by="epoch"))
    acc.set_epoch(4)
    state = acc.state_dict()
    acc.close()  # one Accumulator per optimizer at a time
    again = gaccum.Accumulator(model, opt, accum_steps=gaccum.AccumulationSchedule({0: 2, 3: 5}, by="epoch"))
    again.load_state_dict(state)
    assert again.accum_steps == 5 and again.epoch == 4


def test_plan_with_a_schedule_and_bad_schedules_are_clear():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    S = gaccum.AccumulationSchedule
    with pytest.raises(TypeError, match="non-empty dict"):
        S({})
    with pytest.raises(ValueError, match="add a 0 key"):
        S({10: 4})
    with pytest.raises(ValueError, match="accumulation steps"):
        S({0: 0})
    with pytest.raises(ValueError, match="accumulation steps"):
        S({0: 2.5})
    with pytest.raises(ValueError, match="ints >= 0"):
        S({0: 2, -1: 3})
    with pytest.raises(ValueError, match="by must be"):
        S({0: 2}, by="batch")
    with pytest.raises(ValueError, match="lr_rule"):
        S({0: 2}, lr_rule="cubic")
    x, y = regression_data(8)
    plan = gaccum.plan(model, target_bs=8, sample=lambda b: (x[:b], y[:b]), optimizer=opt, memory_limit="1GiB",
                       loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), cache=False)
    assert plan.accum_steps == 1
    with pytest.raises(ValueError, match="disagrees with the plan"):
        gaccum.Accumulator(model, opt, plan=plan, accum_steps=3)
    acc = gaccum.Accumulator(model, opt, plan=plan, accum_steps={0: 2})  # a schedule overrides the plan's steps
    assert acc.accum_steps == 2
    with pytest.raises(ValueError, match="epoch must be"):
        acc.set_epoch(-1)
    assert S({0: 2, 5: 4}).at(4) == 2 and S({0: 2, 5: 4}).at(5) == 4
