"""The planner's edges: nothing fits, messages that say the right thing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4)).to(dtype)


def _sample(dtype=torch.float32):
    return lambda b: (torch.randn(b, 32, dtype=dtype), torch.randint(0, 4, (b,)))


def _ce(m, b):
    return F.cross_entropy(m(b[0]).float(), b[1])


def test_out_of_memory_at_batch_one_in_the_warm_up_is_a_plan_error_with_advice():
    def loss(m, b):  # what a GPU does when even one sample does not fit: the allocator raises
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gaccum.PlanError, match="even a micro-batch of 1 does not fit.*activation checkpointing"):
        gaccum.plan(model, 64, _sample(), loss, memory_limit="64MiB", cache=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # and left as it was


def test_a_bf16_model_is_not_advised_to_try_bf16_and_an_estimate_shows_its_allowance():
    model = _mlp(torch.bfloat16)
    with pytest.raises(gaccum.PlanError) as info:
        gaccum.plan(model, 64, _sample(torch.bfloat16), _ce, memory_limit=4096, headroom=0, cache=False)
    assert "bf16 (" not in str(info.value) and "activation checkpointing" in str(info.value)
    with pytest.raises(gaccum.PlanError) as info:
        gaccum.plan(_mlp(), 64, _sample(), _ce, device="meta", memory_limit=32768, headroom=0, cache=False)
    assert "kept for what an estimate cannot see" in str(info.value)  # the arithmetic adds up


def test_the_batchnorm_warning_names_the_layer_by_its_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4)))
    with pytest.warns(UserWarning, match=r"1\.0 \(BatchNorm2d\)"):
        gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2).close()


def test_any_target_plans_in_bounded_memory_and_its_window_is_written_as_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path))
    p = gaccum.plan(_mlp(), 10**15, _sample(), _ce, memory_limit="4MiB", headroom=0)  # was a MemoryError
    assert p.effective_batch_size == 10**15 and p.window.total == 10**15 and len(p.window.runs) <= 2
    assert len(p.window) == p.accum_steps and p.window[-1] <= p.window[0] == p.micro_batch_size
    assert " x " in str(p).split("window", 1)[1].splitlines()[0]  # '1 x 4097 + ...', never a billion sizes
    again = gaccum.Plan.from_dict(p.to_dict())
    assert again.window == p.window and gaccum.plan(_mlp(), 10**15, _sample(), _ce, memory_limit="4MiB",
                                                    headroom=0).cached


def test_a_cache_that_cannot_be_written_never_loses_the_plan(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(blocker / "cache"))  # a folder under a file: every write fails
    p = gaccum.plan(_mlp(), 256, _sample(), _ce, memory_limit="4MiB", headroom=0)
    assert p.effective_batch_size == 256 and not p.cached


def test_an_eval_plan_is_the_largest_forward_only_batch_and_leaves_the_training_plan_alone():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = gaccum.plan(model, 65536, _sample(), _ce, optimizer=opt, memory_limit="1MiB", headroom=0, cache=False)
    ev = gaccum.plan(model, 65536, _sample(), lambda m, b: m(b[0]).argmax(-1), memory_limit="1MiB", headroom=0,
                     mode="eval", cache=False)
    assert ev.mode == "eval" and "eval: forward only" in str(ev)
    # no gradients, no optimizer state, no activations kept for backward: a larger batch fits (1603 vs 1097)
    assert ev.max_micro_batch > 1.3 * train.max_micro_batch
    assert not opt.state and all(p.grad is None for p in model.parameters()) and model.training
    # and the eval size really runs under the budget, by the CPU allocator's own events
    from gaccum.accounting import AllocatorEvents

    model.eval()
    with torch.inference_mode(), AllocatorEvents() as events:
        model(torch.randn(ev.micro_batch_size, 32)).argmax(-1)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params + events.peak <= 1 << 20
    with pytest.raises(ValueError, match="mode must be"):
        gaccum.plan(model, 64, _sample(), _ce, memory_limit="4MiB", mode="test")


def test_a_compiled_model_is_probed_as_its_eager_module_and_the_plan_says_so():
    model = _mlp()
    compiled = torch.compile(model)
    p = gaccum.plan(compiled, 4096, _sample(), _ce, memory_limit="1MiB", headroom=0, cache=False)
    eager = gaccum.plan(model, 4096, _sample(), _ce, memory_limit="1MiB", headroom=0, cache=False)
    assert p.max_micro_batch == eager.max_micro_batch  # what was measured is the eager module, and said
    assert any("torch.compile'd model: probed eager" in n for n in p.notes)
