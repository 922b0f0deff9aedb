"""Probes and seconds to find the micro-batch: gaccum vs Lightning's finder vs Accelerate.

CPU mode: every tool gets the same fits-or-not oracle, a simulated memory model
(flat until a knee, then linear) whose over-budget steps raise "CUDA out of
memory." exactly as a GPU would; gaccum's probes also read the modelled peak,
as its CPU probes do. Counted: trial sizes, the size found, the true max.
Writes results/planner.json. (On a GPU the GPU session runs the real models.)
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

from gaccum.search import search  # noqa: E402
from gaccum.probe import ProbeResult  # noqa: E402

# (name, flat peak, intercept, bytes per sample, budget, target): true max in the name
MODELS = [
    ("gpt-like (max 2488)", 10**8, 5 * 10**7, 10**5, 5 * 10**7 + 10**5 * 2488, 4096),
    ("high knee (max 1500)", 2 * 10**9, 10**9, 10**6, 10**9 + 10**6 * 1500, 4096),
    ("cnn-like (max 301)", 4 * 10**8, 10**8, 3 * 10**6, 10**8 + 3 * 10**6 * 301, 1024),
]


def peak(P0, A, s, b):
    return max(P0, A + s * b)


def run_gaccum(P0, A, s, budget, cap):
    calls = []

    def probe(b):
        calls.append(b)
        p = peak(P0, A, s, b)
        return ProbeResult(b, p, p <= budget)

    t0 = time.perf_counter()
    best, _ = search(probe, cap, budget)
    return best, len(calls), time.perf_counter() - t0


def run_accelerate(P0, A, s, budget, cap):
    from accelerate.utils import find_executable_batch_size

    calls = []

    @find_executable_batch_size(starting_batch_size=cap)
    def train(batch_size):
        calls.append(batch_size)
        if peak(P0, A, s, batch_size) > budget:
            raise RuntimeError("CUDA out of memory. Tried to allocate (simulated)")
        return batch_size

    t0 = time.perf_counter()
    best = train()
    return best, len(calls), time.perf_counter() - t0


def run_lightning(P0, A, s, budget, cap, mode):
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    calls = []

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.batch_size = 2
            self.w = torch.nn.Parameter(torch.zeros(1))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(cap * 4, 1), batch_size=self.batch_size)

        def training_step(self, batch, _):
            b = batch.shape[0]
            if not calls or calls[-1] != b:
                calls.append(b)
            if peak(P0, A, s, b) > budget:
                raise RuntimeError("CUDA out of memory. Tried to allocate (simulated)")
            return (self.w * batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    best = Tuner(trainer).scale_batch_size(M(), mode=mode, init_val=2, max_trials=25, steps_per_trial=1)
    return best, len(calls), time.perf_counter() - t0


def main():
    rows = []
    for name, P0, A, s, budget, cap in MODELS:
        truth = max(b for b in range(1, cap + 1) if peak(P0, A, s, b) <= budget)
        tools = {"gaccum": lambda: run_gaccum(P0, A, s, budget, cap),
                 "accelerate find_executable_batch_size": lambda: run_accelerate(P0, A, s, budget, cap),
                 "lightning binsearch": lambda: run_lightning(P0, A, s, budget, cap, "binsearch"),
                 "lightning power": lambda: run_lightning(P0, A, s, budget, cap, "power")}
        for tool, fn in tools.items():
            try:
                best, probes, secs = fn()
            except ImportError as exc:
                print(f"{tool}: not installed ({exc.name}); pip install -e .[bench]")
                continue
            rows.append({"model": name, "tool": tool, "found": int(best), "true_max": truth, "probes": probes,
                         "fraction_of_max": best / truth, "seconds": secs, "fits": peak(P0, A, s, best) <= budget})
    print(f"{'model':<22} {'tool':<40} {'found':>6} {'true':>6} {'%max':>6} {'probes':>6} {'fits':>5}")
    for r in rows:
        print(f"{r['model']:<22} {r['tool']:<40} {r['found']:>6} {r['true_max']:>6} {100 * r['fraction_of_max']:>5.0f}% "
              f"{r['probes']:>6} {str(r['fits']):>5}")
    print(f"wrote {write('planner.json', {**environment(), 'mode': 'cpu simulated-OOM oracle', 'rows': rows})}")


if __name__ == "__main__":
    main()
