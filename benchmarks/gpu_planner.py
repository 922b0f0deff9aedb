"""The planner on the device: a GPT-2-small-shaped model and a ResNet-shaped CNN, with a soak, then the
plan's window trained through the Accumulator and its peak read from the caching allocator.

Each model is planned for ``--target`` samples under ``--limit`` (bf16 autocast for the GPT), the plan
soaked, and one window trained under the plan; the record has the plan, its probes and seconds, and
the window's allocator peak against the plan's budget. ``--dry-run`` plans small versions on CPU.
Writes JSON to ``--out`` (default results/gpu_planner.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, environment  # noqa: E402

import gaccum  # noqa: E402
from gaccum.demo.model import TinyGPT  # noqa: E402


def gpt(device, tiny):
    d, layers, heads, seq, vocab = (64, 2, 4, 64, 256) if tiny else (768, 12, 12, 1024, 50257)
    torch.manual_seed(0)
    model = TinyGPT(d=d, layers=layers, heads=heads, seq_len=seq, vocab=vocab).to(device)

    def sample(b):
        x = torch.randint(0, vocab, (b, seq + 1), device=device)
        return x[:, :-1], x[:, 1:]

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]).float().reshape(-1, vocab), batch[1].reshape(-1))

    return model, sample, loss, "bf16"


class Bottleneck(nn.Module):
    def __init__(self, c, mid, stride=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, 4 * mid, 1, bias=False), nn.BatchNorm2d(4 * mid))
        self.skip = (nn.Sequential(nn.Conv2d(c, 4 * mid, 1, stride, bias=False), nn.BatchNorm2d(4 * mid))
                     if stride != 1 or c != 4 * mid else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


def resnet(device, tiny):
    widths, blocks, size = ((16, 32), (1, 1), 32) if tiny else ((64, 128, 256, 512), (3, 4, 6, 3), 224)
    layers, c = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(Bottleneck(c, w, 2 if j == 0 and i > 0 else 1))
            c = 4 * w
    torch.manual_seed(0)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000)).to(device)
    model = model.to(memory_format=torch.channels_last)

    def sample(b):
        return (torch.randn(b, 3, size, size, device=device).to(memory_format=torch.channels_last),
                torch.randint(0, 1000, (b,), device=device))

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    return model, sample, loss, None


def run(name, make, device, tiny, target, limit, soak):
    model, sample, loss, amp = make(device, tiny)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    p = gaccum.plan(model, target, sample, loss, optimizer=opt, amp=amp, memory_limit=limit, soak=soak, cache=False)
    seconds = time.perf_counter() - t0
    acc = gaccum.Accumulator(model, opt, plan=p, warn_batchnorm=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = {"bf16": torch.bfloat16}.get(amp)
    for b in p.window:
        with acc.accumulate(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            acc.backward(loss(model, sample(b)))
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    acc.close()
    return {"model": name, "micro_batch": p.micro_batch_size, "window": str(p.window), "max_fits": p.max_micro_batch,
            "probes": [r.to_dict() for r in p.probes], "plan_seconds": round(seconds, 2), "budget": p.budget,
            "window_peak_reserved": peak, "held": None if peak is None else peak <= p.memory_limit - p.allowance,
            "notes": p.notes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--target", type=int, default=512)
    ap.add_argument("--limit", default="40GiB", help="a limit below the H200's memory, so accumulation is needed")
    ap.add_argument("--soak", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "gpu_planner.json"))
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    limit = "256MiB" if args.dry_run else args.limit
    rows = []
    for name, make in (("GPT-2 small shape", gpt), ("ResNet-50 shape", resnet)):
        try:
            rows.append(run(name, make, device, args.dry_run, 16 if args.dry_run else args.target, limit, args.soak))
        except Exception as exc:  # noqa: BLE001 - one model's failure is recorded, the other still runs
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
        print({k: v for k, v in rows[-1].items() if k != "probes"}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": environment(), "limit": limit, "rows": rows}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
