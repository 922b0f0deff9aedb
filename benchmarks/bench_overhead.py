"""Time per optimizer step: gaccum vs a hand-written loop vs Accelerate vs Lightning.

Same small transformer, same micro-batches, CPU, one run. Writes results/overhead.json.
Run: python benchmarks/bench_overhead.py [--steps 20 --accum 4]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

import gaccum  # noqa: E402
from gaccum.demo.model import TinyGPT, lm_loss  # noqa: E402

SEQ = 64


def data(n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (b, SEQ + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def fresh():
    torch.manual_seed(0)
    m = TinyGPT(d=128, layers=2, heads=4, seq_len=SEQ)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def per_step(stamps):
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(d)


def hand_written(batches, N):
    m, opt = fresh()
    stamps = [time.perf_counter()]
    for i, b in enumerate(batches):
        (lm_loss(m, b) / N).backward()
        if (i + 1) % N == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
    return per_step(stamps)


def _gaccum_runner(micro_step):
    """Time per optimizer step of an Accumulator driven one micro-batch at a time by ``micro_step``."""

    def run(batches, N):
        m, opt = fresh()
        acc = gaccum.Accumulator(m, opt, accum_steps=N)
        stamps = [time.perf_counter()]
        for b in batches:
            if micro_step(acc, m, b).stepped:
                stamps.append(time.perf_counter())
        return per_step(stamps)

    return run


def _accumulate_block(acc, m, b):
    with acc.accumulate():
        return acc.backward(lm_loss(m, b))


with_gaccum = _gaccum_runner(_accumulate_block)
# gaccum runs the forward (OOM splitting armed: a post-accumulate hook per parameter)
with_gaccum_micro_batch = _gaccum_runner(lambda acc, m, b: acc.micro_batch(b, lm_loss))


def with_accelerate(batches, N):
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=N, cpu=True)
    m, opt = fresh()
    m, opt = acc.prepare(m, opt)
    stamps = [time.perf_counter()]
    for b in batches:
        with acc.accumulate(m):
            acc.backward(lm_loss(m, b))
            opt.step()
            opt.zero_grad()
            if acc.sync_gradients:
                stamps.append(time.perf_counter())
    return per_step(stamps)


def with_lightning(batches, N):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.m, _ = fresh()

        def training_step(self, batch, _):
            return lm_loss(self.m, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.m.parameters(), lr=1e-3)

    stamps = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if (trainer.fit_loop.batch_idx + 1) % N == 0:
                stamps.append(time.perf_counter())

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=N, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Stamp()])
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return per_step(stamps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--micro", type=int, default=16)
    a = ap.parse_args()
    batches = data(a.steps * a.accum, a.micro)
    runners = {"hand-written loop": hand_written, "gaccum": with_gaccum, "gaccum micro_batch": with_gaccum_micro_batch,
               "accelerate": with_accelerate,
               "lightning": with_lightning}
    res = {}
    for name, fn in runners.items():
        try:
            res[name] = fn(batches, a.accum)
        except ImportError as exc:
            print(f"{name}: not installed ({exc.name}); pip install -e .[bench]")
    base = res["hand-written loop"]
    print(f"time per optimizer step ({a.accum} x {a.micro} x {SEQ} tokens, TinyGPT d=128, CPU {torch.get_num_threads()} threads)")
    for k, v in res.items():
        print(f"{k:<20} {v * 1e3:8.1f} ms  {v / base:6.3f}x hand-written")
    path = write("overhead.json", {**environment(), "accum_steps": a.accum, "micro_batch": a.micro, "steps": a.steps,
                                   "ms_per_optimizer_step": {k: v * 1e3 for k, v in res.items()},
                                   "ratio_vs_hand_written": {k: v / base for k, v in res.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
