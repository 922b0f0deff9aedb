"""Finding the micro-batch on real models: gaccum vs Lightning's finder vs Accelerate's, on CPU.

Every tool gets the same out-of-memory signal: a CPU memory budget that raises
``torch.OutOfMemoryError("CUDA out of memory. ...")`` from the first operator
that takes the live tensors over it (gaccum's MemoryBudget; the message is the
one Lightning and Accelerate look for). Each tool runs its own real training
steps: Lightning's ``Tuner.scale_batch_size`` (power and binsearch, 3 steps a
trial, a fresh optimizer as a LightningModule has), Accelerate's
``find_executable_batch_size`` (from the target down, two real steps a trial:
the second is the first with optimizer state), gaccum's ``plan``.

Reported per model, budget and tool: trials (probes), real training steps,
seconds, the size found, the true steady-state largest size by a measure
independent of every tool (a plain training loop's second window, measured by
torch's MemTracker or by the CPU allocator's own events), and whether 20
micro-steps at the found size through gaccum's Accumulator stay under the
budget. A simulated-oracle sweep across the knee sits beside it.
Writes results/planner.json.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

import gaccum  # noqa: E402
from gaccum.accumulation import MemoryBudget  # noqa: E402
from gaccum.planner.probe import ProbeResult  # noqa: E402
from gaccum.planner.search import search  # noqa: E402

torch.set_num_threads(2)
warnings.filterwarnings("ignore")


# ------------------------------------------------------------------ models (each: model, sample, loss)
SEQ = 32  # token-shaped inputs: activations, not the optimizer step, decide from b = 1 on


def tokens(d):
    return lambda b: (torch.randn(b, SEQ, d), torch.randint(0, 10, (b, SEQ)))


def token_ce(m, x):
    return F.cross_entropy(m(x[0]).flatten(0, 1), x[1].flatten())


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
    return m, tokens(128), token_ce


def cnn_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                      nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return m, lambda b: (torch.randn(b, 3, 24, 24), torch.randint(0, 10, (b,))), \
        lambda m, x: F.cross_entropy(m(x[0]), x[1])


def gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)

    def sample(b):
        ids = torch.randint(0, 256, (b, 64))
        return {"input_ids": ids, "labels": ids}

    return m, sample, lambda m, x: m(**x).loss


class LoRA(nn.Module):
    def __init__(self, d, r=8):
        super().__init__()
        self.base = nn.Linear(d, d).requires_grad_(False)
        self.a, self.b = nn.Parameter(torch.randn(r, d) * 0.01), nn.Parameter(torch.zeros(d, r))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def lora():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 512).requires_grad_(False), nn.GELU(), LoRA(512), nn.GELU(), LoRA(512), nn.GELU(),
                      nn.Linear(512, 10))
    return m, tokens(128), token_ce


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
                                    for _ in range(4))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        for blk in self.blocks:
            x = x + checkpoint(blk, x, use_reentrant=False)
        return self.head(x)


def ckpt():
    torch.manual_seed(0)
    return Checkpointed(), tokens(256), token_ce


MODELS = {"mlp": mlp, "cnn+batchnorm": cnn_bn, "gpt2-tiny": gpt2, "lora": lora, "checkpointed": ckpt}
TARGET = 256


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


class OOM(MemoryBudget):
    """The one out-of-memory signal every tool sees, worded as the peers look for it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(f"CUDA out of memory. {exc}") from None


# ------------------------------------------------------------------ an independent steady-state measure
def steady_peak(make, b, conv: bool) -> int:
    """A plain loop's second window (2 micro-steps and the step), measured by torch itself."""
    model, sample, loss = make()
    model.train()
    opt = optimizer_for(model)
    held = {}

    def micro():
        held["x"] = sample(b)
        loss(model, held["x"]).backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    micro(), micro(), step()
    held.clear()
    if conv:  # oneDNN convolutions take scratch no tensor holds: count tensors, as the budget does
        from torch.distributed._tools.mem_tracker import MemTracker

        peaks = []
        for fn in (micro, micro, step):
            t = MemTracker()
            t.track_external(model, opt)
            with t:
                fn()
            peaks.append(int(sum(v.get("Total", 0) for v in t.get_tracker_snapshot("peak").values())))
        return max(peaks)
    from torch.profiler import ProfilerActivity, profile

    seen, base = set(), 0
    for t in [*model.parameters(), *model.buffers(), *[v for s in opt.state.values() for v in s.values()
                                                         if torch.is_tensor(v)]]:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            base += st.nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        micro(), micro(), step()
    cur = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return base + peak


def true_max(make, budget, conv):
    if steady_peak(make, 1, conv) > budget:
        return 0
    if steady_peak(make, TARGET, conv) <= budget:
        return TARGET
    lo, hi = 1, TARGET
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if steady_peak(make, mid, conv) <= budget else (lo, mid)
    return lo


# ------------------------------------------------------------------ the tools
def run_gaccum(make, budget):
    model, sample, loss = make()
    p = gaccum.plan(model, TARGET, sample, loss, optimizer=optimizer_for(model), memory_limit=budget, headroom=0,
                    cache=False)
    return p.max_micro_batch, len(p.probes), len(p.probes) + 1  # + the validation step that warms the optimizer


def run_accelerate(make, budget):
    from accelerate.utils import find_executable_batch_size

    model, sample, loss = make()
    trials = []

    @find_executable_batch_size(starting_batch_size=TARGET)
    def train(batch_size):
        trials.append(batch_size)
        m = copy.deepcopy(model)
        opt = optimizer_for(m)
        for _ in range(2):
            with OOM(budget, m, opt):
                loss(m, sample(batch_size)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return batch_size

    return train(), len(trials), 2 * len(trials)


def run_lightning(make, budget, mode):
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    model, sample, loss = make()
    steps = []

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 100_000

        def __getitem__(self, i):
            return i

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model
            self.batch_size = 2
            self.automatic_optimization = False  # the whole step inside the budget

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Data(), batch_size=self.batch_size)

        def training_step(self, batch, _):
            b = batch.shape[0]
            steps.append(b)
            opt = self.optimizers()
            with OOM(budget, self.net, opt.optimizer):
                self.manual_backward(loss(self.net, sample(b)))
                opt.step()
                opt.zero_grad(set_to_none=True)

        def configure_optimizers(self):
            return optimizer_for(self.net)

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
        found = Tuner(trainer).scale_batch_size(Module(), mode=mode, init_val=2, max_trials=25, steps_per_trial=3,
                                                max_val=TARGET)
    trials = len({(i, b) for i, b in enumerate(steps) if i == 0 or steps[i - 1] != b})
    return found, trials, len(steps)


def holds(make, budget, b, micro_steps=20):
    """20 micro-steps at b through the Accumulator under the budget: does any run out of memory?"""
    if b <= 0:
        return False
    model, sample, loss = make()
    acc = gaccum.Accumulator(model, optimizer_for(model), accum_steps=4, memory_limit=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(micro_steps):
            acc.micro_batch(sample(b), loss)
    return acc.oom_splits == 0


def budgets_for(make, conv):
    """Three budgets per model: the true max about 1-2, mid-range, and the target fitting whole."""
    p1, p2 = steady_peak(make, 1, conv), steady_peak(make, 2, conv)
    pt = steady_peak(make, TARGET, conv)
    return {"max 1-2": (p1 + p2) // 2 + 1, "mid": p1 + (pt - p1) // 4, "target fits": int(pt * 1.05)}


# ------------------------------------------------------------------ the simulated oracle, across the knee
def oracle_sweep():
    static, const, slope, bump, cap = 50 * 10**6, 2 * 10**6, 10**5, 30 * 10**6, 4096
    knee = (bump - const) // slope  # below it the optimizer step's bump is the peak
    counts = []
    for bb in list(range(0, 60, 2)) + [100, 300, 1000, 2000, 3000, 3700]:
        budget = static + bump + slope * bb + slope // 3  # the answer lies bb past the knee

        def probe(b):
            act = static + const + slope * b
            peak = max(act, static + bump)
            over = peak > 1.5 * budget
            return ProbeResult(b, None if over else peak, peak <= budget, 0.0, over, None if over else act, static)

        counts.append(len(search(probe, cap, budget)[1]))
    return {"budgets": len(counts), "median_probes": statistics.median(counts), "max_probes": max(counts),
            "knee_at": knee}


def main():
    rows = []
    for name, make in MODELS.items():
        conv = name.startswith("cnn")
        for label, budget in budgets_for(make, conv).items():
            truth = true_max(make, budget, conv)
            tools = {"gaccum": lambda: run_gaccum(make, budget),
                     "accelerate": lambda: run_accelerate(make, budget),
                     "lightning power": lambda: run_lightning(make, budget, "power"),
                     "lightning binsearch": lambda: run_lightning(make, budget, "binsearch")}
            for tool, fn in tools.items():
                t0 = time.perf_counter()
                try:
                    found, trials, steps = fn()
                except ImportError as exc:
                    print(f"{tool}: not installed ({exc.name}); pip install -e .[bench]")
                    continue
                secs = time.perf_counter() - t0
                found = int(found or 0)
                rows.append({"model": name, "budget": label, "budget_bytes": budget, "tool": tool, "found": found,
                             "true_max": truth, "trials": trials, "train_steps": steps, "seconds": round(secs, 3),
                             "holds_20_micro_steps": holds(make, budget, found)})
                r = rows[-1]
                print(f"{name:<14} {label:<12} {tool:<20} found {found:>4} true {truth:>4} trials {trials:>3} "
                      f"steps {steps:>4} {secs:>7.2f}s holds {r['holds_20_micro_steps']}", flush=True)
    sweep = oracle_sweep()
    print(f"simulated oracle across the knee: {sweep}")
    out = write("planner.json", {**environment(), "mode": "cpu, real models, one CPU budget as the OOM signal",
                                 "target_bs": TARGET, "rows": rows, "oracle_sweep": sweep})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
