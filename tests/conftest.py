import os

import pytest
import torch
from torch import nn

from gaccum import _ext, ops

# Tests assert numerics; keep them single-threaded-deterministic and quiet.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def mlp(dtype=torch.float64, seed=0, d_in=6, hidden=12, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def regression_data(n, dtype=torch.float64, seed=1, d_in=6, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def max_rel_diff(a_params, b_params):
    worst = 0.0
    for a, b in zip(a_params, b_params):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return worst


def max_abs_diff(a_params, b_params):
    return max(float((a.detach().double() - b.detach().double()).abs().max()) for a, b in zip(a_params, b_params))


@pytest.fixture(params=["cpu-kernel", "pytorch-fallback"])
def cpu_backend(request, monkeypatch):
    """Run a test on each CPU implementation: the fused pass (gaccum._cpu) and the PyTorch chain."""
    if request.param == "pytorch-fallback":
        monkeypatch.setattr(_ext, "load_cpu", lambda: None)
    elif ops.backend_for("cpu") != "cpu-kernel":
        pytest.skip("gaccum._cpu is not built here (no C++ compiler at install)")
    assert ops.backend_for("cpu") == request.param
    return request.param

