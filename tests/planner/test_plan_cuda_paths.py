"""The planner's CUDA paths, run on CPU with a stand-in for ``torch.cuda`` (proven on a GPU by gpu-proof).

What is checked is the order of things a GPU run depends on: two micro-steps and
the step with no cache emptied between them, an out-of-memory (cuBLAS/cuDNN
allocation failures included) counted as "does not fit" and collected before
the restore, memory outside torch's allocator kept out of an explicit limit,
the collective warmed up before the limit is read, and a soak that steps down.
"""

import gc
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from gaccum.planner import probe as probe_mod
from gaccum.accumulation import is_oom

budget_mod = importlib.import_module("gaccum.planner.budget")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path / "cache"))


class FakeCuda:
    """Records the calls a probe makes and serves allocator statistics."""

    def __init__(self, monkeypatch, log):
        self.log = log
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, self._rec(name))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 100)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 900)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 1000)

    def _rec(self, name):
        return lambda *a, **k: self.log.append(name)


class FakeRig:
    device = torch.device("cuda", 0)

    def __init__(self, log, error=None):
        self.log, self.error = log, error

    def step(self, sample, loss_fn, b, check=True, micro=1, on_phase=None):
        self.log.append(f"step micro={micro}")
        on_phase("forward")
        if self.error is not None:
            raise self.error
        on_phase("step")

    def settle(self):
        self.log.append("settle")


class FakeSnapshot:
    def __init__(self, log):
        self.log = log

    def restore_weights(self):
        self.log.append("restore")


@pytest.mark.parametrize("msg", ["CUDA out of memory. Tried to allocate 2 GiB",
                                 "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                 "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"])
def test_allocation_failures_of_cuda_libraries_are_out_of_memory(msg):
    assert is_oom(RuntimeError(msg)) and not is_oom(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))


def test_cuda_probe_runs_two_micro_steps_and_the_step_without_emptying_the_cache(monkeypatch):
    log = []
    FakeCuda(monkeypatch, log)
    r = probe_mod.probe_cuda(FakeRig(log), None, None, 8, 950, FakeSnapshot(log))
    assert log.index("step micro=2") > log.index("reset_peak_memory_stats")
    between = log[log.index("step micro=2"):log.index("restore")]
    assert "empty_cache" not in between[: between.index("synchronize", 2) if between.count("synchronize") > 2 else None]
    assert r.peak == 1000 and not r.fit and r.static == 100 and r.activation_peak == 1000  # 1000 > budget 950


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")])
def test_cuda_probe_out_of_memory_is_collected_before_the_restore(monkeypatch, error):
    log = []
    FakeCuda(monkeypatch, log)
    monkeypatch.setattr(gc, "collect", lambda *a: log.append("gc") or 0)
    r = probe_mod.probe_cuda(FakeRig(log, error), None, None, 8, 10**9, FakeSnapshot(log))
    assert not r.fit and r.oom and r.peak is None
    assert log.index("gc") < log.index("settle") < log.index("restore")


def test_cuda_probe_re_raises_what_is_not_out_of_memory(monkeypatch):
    log = []
    FakeCuda(monkeypatch, log)
    with pytest.raises(ValueError):
        probe_mod.probe_cuda(FakeRig(log, ValueError("bad batch")), None, None, 8, 10**9, FakeSnapshot(log))


def test_explicit_limit_keeps_memory_outside_the_allocator_out_and_warms_the_collective_first(monkeypatch):
    log = []
    FakeCuda(monkeypatch, log)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: log.append("mem_get_info") or (30 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 40 << 30)
    monkeypatch.setattr(budget_mod, "world_size", lambda: 2)
    monkeypatch.setattr(budget_mod, "all_reduce_scalars", lambda v, d, op=None: log.append("all_reduce") or list(v))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    limit, outside, note = budget_mod.cuda_limit(torch.device("cuda", 0), "20GiB")
    assert limit == 20 << 30 and outside == 10 << 30  # 80 - 30 free = 50 used, 40 of it torch's
    assert log.index("all_reduce") < log.index("mem_get_info")
    assert "expandable" in note
    limit, outside, _ = budget_mod.cuda_limit(torch.device("cuda", 0), None)
    assert limit == (30 << 30) + (40 << 30) and outside == 0  # what is free plus what torch holds


def test_soak_steps_down_when_steady_training_needs_more_than_the_probes_saw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
    calls = {"n": 0}

    def loss(m, batch):
        calls["n"] += 1
        out = F.cross_entropy(m(batch[0]), batch[1])
        if calls["n"] > 10:  # later batches need more: a long tail the probes did not see
            out = out + (m[2].bias.sum() * torch.zeros(batch[0].shape[0], 256)).sum()
        return out

    sample = lambda b: (torch.randn(b, 64), torch.randint(0, 10, (b,)))  # noqa: E731
    p = gaccum.plan(model, 512, sample, loss, memory_limit="1MiB", headroom=0, soak=20, cache=False)
    assert any("stepped down" in n for n in p.notes) and any("stayed under" in n for n in p.notes)
    assert p.micro_batch_size < max(r.batch for r in p.probes if r.fit)
    acc = gaccum.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3), plan=p, memory_limit=p.budget)
    for i in range(20):
        acc.micro_batch(sample(p.window[i % p.accum_steps]), loss)
    assert acc.oom_splits == 0
