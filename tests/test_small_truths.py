"""Small truths: the metrics' peak on CPU, the window loss in the model's precision."""

import json

import torch
import torch.nn.functional as F

import gaccum
from conftest import mlp, regression_data
from gaccum.metrics import MetricsLogger


def test_metrics_record_the_cpu_budget_peak(tmp_path):
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2,
                             memory_limit="64MiB")
    log = MetricsLogger(tmp_path / "m.jsonl")
    acc.add_callback(log)
    x, y = regression_data(16)
    for i in range(0, 16, 4):
        acc.micro_batch((x[i:i + 4], y[i:i + 4]), lambda m, b: F.mse_loss(m(b[0]), b[1]))
    log.close()
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["peak_memory"] > sum(p.numel() * 8 for p in model.parameters()) for r in recs)


def test_window_loss_keeps_float64():
    model = mlp()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), accum_steps=2)
    x, y = regression_data(8)
    losses = []
    for i in range(0, 8, 4):
        with acc.accumulate():
            loss = F.mse_loss(model(x[i:i + 4]), y[i:i + 4])
            losses.append(loss.item())
            r = acc.backward(loss)
    assert r.loss == (losses[0] + losses[1]) / 2  # exactly, not through float32


def test_a_nan_loss_discards_the_window_by_default_on_the_accumulator_and_the_hook():
    import pytest

    for use_hook in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        driver = gaccum.hook(opt, accum_steps=2) if use_hook else gaccum.Accumulator(model, opt, accum_steps=2)
        before = [p.detach().clone() for p in model.parameters()]
        x, y = regression_data(8)
        with pytest.warns(RuntimeWarning, match="discarded"):
            for i in range(2):
                loss = F.mse_loss(model(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4]) * (float("nan") if i else 1.0)
                if use_hook:
                    loss.backward()
                    r = opt.step()
                    opt.zero_grad()
                else:
                    with driver.accumulate():
                        r = driver.backward(loss)
        assert r.skipped and driver.skipped_steps == 1 and driver.optimizer_steps == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_warnings_point_at_the_users_line():
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gaccum.Accumulator(model, torch.optim.SGD(model[0].parameters(), lr=0.1), accum_steps=2)  # this line
    assert caught and all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
