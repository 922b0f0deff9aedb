import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gaccum
from helpers import free_port, largest_under, steady_state_peak
from gaccum.planner.probe import ProbeResult
from gaccum.planner.search import search
from gaccum.windows import balanced_window


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path / "cache"))


def simulated(P0, A, s, budget, peaks_on_failure=True):
    """Peak flat at P0 below the knee, A + s*b above it; fits iff under budget."""
    calls = []

    def probe(b):
        calls.append(b)
        peak = max(P0, A + s * b)
        fit = peak <= budget
        return ProbeResult(b, peak if (fit or peaks_on_failure) else None, fit)

    return probe, calls


def exhaustive(P0, A, s, budget, cap):
    return max([b for b in range(1, cap + 1) if max(P0, A + s * b) <= budget], default=0)


def doubling_then_bisection(fits, cap):
    """Lightning's 'binsearch' mode in spirit: double until OOM, then bisect."""
    calls, b, lo, hi = 0, 1, 0, None
    while hi is None:
        calls += 1
        if fits(b):
            lo = b
            if b >= cap:
                return lo, calls
            b = min(cap, b * 2)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        calls += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, calls


CASES = [  # (P0, A, s, budget, cap): low knee, high knee, knee past the answer, everything fits, tight
    (10**8, 5 * 10**7, 10**5, 5 * 10**7 + 10**5 * 2488, 4096),
    (2 * 10**9, 10**9, 10**6, 10**9 + 10**6 * 1500, 4096),  # knee at 1000
    (3 * 10**9, 10**9, 10**6, 3 * 10**9 + 10**6 * 5, 4096),  # knee at 2000, answer right after it
    (10**8, 10**7, 10**4, 10**12, 1024),
    (10**6, 10**6 - 7, 7, 10**6 + 70, 10000),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("peaks_on_failure", [True, False], ids=["cpu-like", "oom-like"])
def test_search_finds_exact_max_and_only_returns_probed_sizes(case, peaks_on_failure):
    P0, A, s, budget, cap = case
    probe, calls = simulated(P0, A, s, budget, peaks_on_failure)
    best, probes = search(probe, cap, budget)
    assert best == exhaustive(P0, A, s, budget, cap)
    assert best in calls and probe(best).fit
    if best < cap:
        assert best + 1 in calls and not probe(best + 1).fit  # proved the largest


def test_spec_case_five_probes_vs_doubling_bisection():
    """A true max of 2488 (as in the issue): gaccum in <= 5 probes, 100%."""
    P0, A, s, budget, cap = CASES[0]
    probe, calls = simulated(P0, A, s, budget)
    best, probes = search(probe, cap, budget)
    base, base_calls = doubling_then_bisection(lambda b: max(P0, A + s * b) <= budget, cap)
    assert best == base == 2488
    assert len(probes) <= 5 < base_calls


def test_search_probe_counts_on_random_models_beat_bisection():
    import random

    rnd = random.Random(0)
    ours, theirs = [], []
    for _ in range(300):
        s = rnd.randint(1, 10**6)
        A = rnd.randint(0, 10**9)
        knee = rnd.choice([1, 10, 300, 2000])
        P0, cap = A + s * knee, rnd.choice([256, 4096])
        budget = rnd.randint(P0, max(P0, A + s * cap * 2))
        probe, _ = simulated(P0, A, s, budget)
        best, probes = search(probe, cap, budget)
        assert best == exhaustive(P0, A, s, budget, cap)
        ours.append(len(probes))
        theirs.append(doubling_then_bisection(lambda b: max(P0, A + s * b) <= budget, cap)[1])
    assert sum(ours) / len(ours) < 0.5 * sum(theirs) / len(theirs)
    assert sorted(ours)[len(ours) // 2] <= 5  # median


def test_search_with_seed_confirms_in_few_probes():
    P0, A, s, budget, cap = CASES[1]
    probe, calls = simulated(P0, A, s, budget, peaks_on_failure=False)
    best, probes = search(probe, cap, budget, seed=exhaustive(P0, A, s, budget, cap))
    assert best == 1500 and len(probes) <= 4


@pytest.mark.parametrize("target,mx,uneven,expected", [
    (1024, 300, False, [256] * 4), (1024, 300, True, [300, 300, 300, 124]), (1000, 400, False, [334, 333, 333]),
    (64, 64, False, [64]), (7, 100, False, [7]),
])
def test_windows(target, mx, uneven, expected):
    assert balanced_window(target, mx, uneven) == expected


# ---------------------------------------------------------------- real CPU models
def mlp_factory(width=256, depth=2, d_in=32):
    torch.manual_seed(0)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    sample = lambda b: (torch.randn(b, d_in), torch.randint(0, 10, (b,)))  # noqa: E731
    loss = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    return model, sample, loss


def conv_factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    sample = lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,)))  # noqa: E731
    loss = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    return model, sample, loss


def wide_input_factory():  # activations from the first sample on: no flat part
    return mlp_factory(width=64, depth=2, d_in=4096)


def high_knee_factory():  # a big head, small activations: peak is flat up to b ~ 28
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 8192), nn.ReLU(), nn.Linear(8192, 10))
    sample = lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,)))  # noqa: E731
    loss = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    return model, sample, loss


def _truth(factory, budget, cap, make_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-3)):
    """The largest b whose plain training loop stays under budget in steady state, by the CPU allocator's
    own events: convolutions' oneDNN scratch, which no tensor holds, counts too (the probe counts it)."""

    def peak_of(b):
        model, sample, loss = factory()
        return steady_state_peak(model, make_opt(model.parameters()), sample, loss, b, measure="allocator")

    return largest_under(peak_of, budget, cap)


@pytest.mark.parametrize("factory,limit", [(wide_input_factory, 7 << 20), (conv_factory, 3 << 20),
                                           (high_knee_factory, 7 << 20), (high_knee_factory, int(4.6 * 2**20))])
def test_plan_on_cpu_equals_an_independent_steady_state_measure(factory, limit):
    model, sample, loss = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # fresh: no state yet, as in the documented flow
    cap = 96
    p = gaccum.plan(model, target_bs=cap, sample=sample, loss_fn=loss, optimizer=opt, memory_limit=limit, headroom=0,
                    cache=False)
    truth = _truth(factory, limit, cap)
    assert 1 <= truth < cap, "the budget should make accumulation necessary"
    assert p.max_micro_batch == truth
    assert any(r.batch == truth and r.fit for r in p.probes) and any(r.batch == truth + 1 and not r.fit for r in p.probes)
    assert len(p.probes) <= 8  # the worst case; a curve that bends near the knee takes the most
    assert p.effective_batch_size == cap and sum(p.window) == cap and max(p.window) <= truth


def _state(model, opt):
    return ([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            json.dumps({k: v for k, v in opt.state_dict().items() if k != "state"}, default=str),
            {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()} for k, s in opt.state_dict()["state"].items()},
            model.training, torch.get_rng_state().clone())


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[2] == b[2] and a[4] == b[4] and torch.equal(a[5], b[5])
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        for n in a[3][k]:
            x, y = a[3][k][n], b[3][k][n]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.mark.parametrize("warm", [False, True])
def test_plan_leaves_no_trace_bitwise(warm):
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Dropout(0.3), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if warm:  # optimizer state, grads and BN running stats already exist
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        model(torch.randn(4, 8)).sum().backward()
    model.eval()
    sample = lambda b: (torch.randn(b, 8), torch.randn(b, 2))  # noqa: E731 - consumes RNG on purpose
    loss = lambda m, batch: F.mse_loss(m(batch[0]), batch[1])  # noqa: E731
    before = _state(model, opt)
    gaccum.plan(model, target_bs=64, sample=sample, loss_fn=loss, optimizer=opt, memory_limit="200KB", cache=False)
    _same(before, _state(model, opt))
    with pytest.raises(ValueError):  # and after an error
        gaccum.plan(model, target_bs=64, sample=lambda b: sample(b + 1), loss_fn=loss, optimizer=opt, memory_limit="1MiB")
    _same(before, _state(model, opt))


def test_target_that_fits_gives_one_step_and_b1_that_does_not_fit_explains():
    model, sample, loss = mlp_factory()
    p = gaccum.plan(model, target_bs=8, sample=sample, loss_fn=loss, memory_limit="1GiB", cache=False)
    assert p.accum_steps == 1 and p.micro_batch_size == 8 and len(p.probes) == 2
    with pytest.raises(gaccum.PlanError, match=r"at b=1.*weights, gradients, optimizer state alone take .*checkpointing.*bf16"):
        gaccum.plan(model, target_bs=8, sample=sample, loss_fn=loss, memory_limit="10KB", cache=False)


def test_plan_table_dict_lr_and_accumulator_consumes_it():
    model, sample, loss = mlp_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = gaccum.plan(model, target_bs=100, sample=sample, loss_fn=loss, optimizer=opt, memory_limit=3 << 20,
                    headroom="64KiB", uneven=True, cache=False)
    text = str(p)
    assert "micro-batch size" in text and "probe" in text and "headroom" in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["window"] == p.window and d["probes"][0]["batch"] == 1 and d["headroom"] == 65536
    assert p.window[:-1] == [p.max_micro_batch] * (len(p.window) - 1)  # uneven: full ones then the rest
    assert p.scale_lr(0.1, 25) == pytest.approx(0.1 * 100 / 25)
    acc = gaccum.Accumulator(model, opt, plan=p)
    assert acc.accum_steps == p.accum_steps
    for b in p.window:
        with acc.accumulate():
            acc.backward(loss(model, sample(b)))
    assert acc.optimizer_steps == 1


@pytest.mark.parametrize("kwargs,err,match", [
    ({"target_bs": 0}, ValueError, "target_bs"), ({"target_bs": 3.5}, TypeError, "target_bs"),
    ({"target_bs": True}, TypeError, "target_bs"), ({"memory_limit": "lots"}, ValueError, "memory size"),
    ({"memory_limit": None}, ValueError, "memory_limit is required"), ({"amp": "fp8"}, ValueError, "amp"),
    ({"sample": lambda b: (torch.randn(b + 1, 32), torch.zeros(b + 1, dtype=torch.long))}, ValueError, "exactly b"),
    ({"loss_fn": lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none")}, ValueError, "scalar"),
    ({"device": "meta", "memory_limit": None}, ValueError, "memory_limit"),
])
def test_bad_input_is_clear_and_leaves_model_untouched(kwargs, err, match):
    model, sample, loss = mlp_factory()
    before = [p.clone() for p in model.parameters()]
    args = {"target_bs": 64, "sample": sample, "loss_fn": loss, "memory_limit": "1GiB", **kwargs}
    with pytest.raises(err, match=match):
        gaccum.plan(model, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sample_on_another_device_is_rejected():
    model, sample, loss = mlp_factory()
    with pytest.raises(ValueError, match="device"):
        gaccum.plan(model, 16, sample=lambda b: (torch.randn(b, 32, device="meta"), torch.zeros(b, dtype=torch.long)),
                    loss_fn=loss, memory_limit="1GiB")


def test_meta_estimate_without_the_device():
    model, sample, loss = mlp_factory(width=512)
    before = [p.clone() for p in model.parameters()]
    p = gaccum.plan(model, target_bs=4096, sample=sample, loss_fn=loss, device="meta", memory_limit="1100MiB",
                    cache=False)
    assert p.estimate and p.allowance > 0 and "estimate" in str(p) and "allowance" in str(p)
    assert any("not seen" in n for n in p.notes)
    assert p.budget == p.memory_limit - p.headroom - p.allowance
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(r.seconds < 5 for r in p.probes)


def test_cache_second_plan_costs_no_probe_and_refresh_ignores_it():
    model, sample, loss = mlp_factory()
    kw = dict(target_bs=96, sample=sample, loss_fn=loss, memory_limit=3 << 20)
    first = gaccum.plan(model, **kw)
    second = gaccum.plan(model, **kw)
    assert not first.cached and second.cached and second.probes == []
    assert second.micro_batch_size == first.micro_batch_size and second.window == first.window
    third = gaccum.plan(model, refresh=True, **kw)
    assert not third.cached and len(third.probes) == len(first.probes)
    other = gaccum.plan(model, **{**kw, "memory_limit": 4 << 20})  # another key
    assert not other.cached


def test_objective_throughput_picks_among_probed_fitting_sizes():
    model, sample, loss = mlp_factory()
    p = gaccum.plan(model, target_bs=96, sample=sample, loss_fn=loss, memory_limit=3 << 20, objective="throughput",
                    cache=False)
    fitting = {r.batch for r in p.probes if r.fit}
    assert set(p.throughput) == fitting and max(p.window) <= max(p.throughput, key=p.throughput.get)
    assert "throughput" in str(p)


# ---------------------------------------------------------------- two ranks, different budgets
def _plan_worker(rank, port, limits, out, cache_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GACCUM_CACHE_DIR=cache_dir)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, sample, loss = conv_factory()
        p = gaccum.plan(model, target_bs=192, sample=sample, loss_fn=loss, memory_limit=limits[rank], headroom=0,
                        cache=False)
        out[rank] = (sum(p.window), p.accum_steps, p.effective_batch_size, p.max_micro_batch, p.world_size,
                     [r.batch for r in p.probes], p.budget, "the smallest rank's, used by all" in str(p))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_different_budgets_agree_on_the_minimum(tmp_path):
    limits = [3 << 20, 2 << 20]
    out = mp.Manager().dict()
    mp.start_processes(_plan_worker, args=(free_port(), limits, out, str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    assert out[0] == out[1]  # never diverged: same probes, same answer
    per_rank, steps, eff, mx, world, _, budget, said = out[0]
    assert world == 2 and eff == 192 and per_rank * 2 == 192
    assert budget == min(limits) and said  # the table shows the budget every rank planned with
    model, sample, loss = conv_factory()
    alone = [gaccum.plan(model, target_bs=96, sample=sample, loss_fn=loss, memory_limit=lim, headroom=0,
                         cache=False).max_micro_batch for lim in limits]
    assert mx == min(alone)


# ---------------------------------------------------------------- CLI
FACTORY = '''
import torch, torch.nn as nn, torch.nn.functional as F
def make():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 10))
    return m, (lambda b: (torch.randn(b, 32), torch.randint(0, 10, (b,)))), \\
        (lambda m, b: F.cross_entropy(m(b[0]), b[1])), torch.optim.AdamW(m.parameters())
'''


def test_cli_plan_prints_table_and_json(tmp_path):
    f = tmp_path / "fac.py"
    f.write_text(FACTORY)
    env = {**os.environ, "GACCUM_CACHE_DIR": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "gaccum.cli", "plan", f"{f}:make", "--target-bs", "256",
                        "--memory-limit", "2MiB"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "gaccum plan" in r.stdout and "accumulation steps" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gaccum.cli", "plan", f"{f}:make", "--target-bs", "256",
                        "--memory-limit", "2MiB", "--json", "--refresh"], capture_output=True, text=True, env=env)
    d = json.loads(r.stdout)
    assert d["effective_batch_size"] == 256 and d["probes"]
    r = subprocess.run([sys.executable, "-m", "gaccum.cli", "plan", f"{f}:make", "--target-bs", "256"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "memory_limit is required" in r.stderr


def test_cli_plan_error_factory_shape_headroom_and_version(tmp_path):
    f = tmp_path / "fac.py"
    f.write_text(FACTORY + "\ndef only_model():\n    return make()[0]\n")
    env = {**os.environ, "GACCUM_CACHE_DIR": str(tmp_path / "c")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gaccum.cli", *args], capture_output=True, text=True, env=env)

    r = cli("plan", f"{f}:make", "--target-bs", "256", "--memory-limit", "64KiB")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not fit" in r.stderr and "What would help" in r.stderr
    r = cli("plan", f"{f}:only_model", "--target-bs", "256", "--memory-limit", "2MiB")
    assert r.returncode == 2 and "returned a Sequential" in r.stderr and "(model, sample, loss_fn)" in r.stderr
    r = cli("plan", f"{f}:make", "--target-bs", "256", "--memory-limit", "2MiB", "--headroom", "256KiB", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headroom"] == 256 << 10
    r = cli("plan", f"{f}:make", "--target-bs", "256", "--memory-limit", "2MiB", "--headroom", "1.0")
    assert r.returncode == 2 and "fraction" in r.stderr
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gaccum {gaccum.__version__}"


def test_cli_user_errors_are_one_line_and_exit_2_from_the_console_script(tmp_path):
    (tmp_path / "mymod.py").write_text(FACTORY + "\nnot_a_function = 5\n")
    (tmp_path / "a-file").write_text("")
    script = Path(sys.executable).parent / "gaccum"  # the installed command, as a user runs it
    env = {**os.environ, "GACCUM_CACHE_DIR": str(tmp_path / "c")}

    def cli(*args):
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path)

    r = cli("plan", "mymod:make", "--target-bs", "64", "--memory-limit", "2MiB")  # a module in the current folder
    assert r.returncode == 0 and "gaccum plan" in r.stdout, r.stderr
    for args, said in ((("plan", "nosuchmod:make"), "cannot import 'nosuchmod'"),
                       (("plan", "mymod:not_a_function"), "mymod:not_a_function is a int, not a function"),
                       (("plan", "mymod:make", "--device", "tpu"), "--device 'tpu' is not a torch device"),
                       (("demo", "--out", str(tmp_path / "a-file" / "report"), "--steps", "1"), "error:")):
        extra = () if args[0] == "demo" else ("--target-bs", "64", "--memory-limit", "2MiB")
        r = cli(*args, *extra)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
