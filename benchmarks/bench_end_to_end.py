"""End to end: samples/s and peak memory of one training setup, four ways, on one device.

gaccum with the fused kernel, gaccum with the PyTorch fallback (GACCUM_DISABLE_EXT=1, run in a
child process so the module is never loaded), a hand-written accumulation loop, and Accelerate.
The model is TinyGPT in bf16 (so gaccum keeps FP32 master gradients, where the kernel runs);
the hand-written loop and Accelerate accumulate in bf16 ``.grad`` as users write them.
Writes results/end_to_end_<device>.json. ``--dry-run`` runs a tiny configuration on CPU to check
the wiring (CI), and writes nothing.

Run: python benchmarks/bench_end_to_end.py [--device cuda] [--steps 30 --accum 4 --micro 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

from gaccum.demo.model import TinyGPT, lm_loss  # noqa: E402


def setup(args):
    torch.manual_seed(0)
    model = TinyGPT(d=args.d, layers=args.layers, heads=4, seq_len=args.seq).to(args.device, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 256, (args.micro * args.accum * (args.steps + 2), args.seq + 1), generator=g)
    batches = [(b[:, :-1].to(args.device), b[:, 1:].to(args.device)) for b in xs.split(args.micro)]
    return model, opt, batches


def timed(args, step_fn):
    """Run every batch through ``step_fn``; samples/s over the steps after two warm-up windows."""
    model, opt, batches = setup(args)
    state = step_fn(model, opt, None)
    warm = 2 * args.accum
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i, b in enumerate(batches):
        if i == warm:
            sync()
            t0 = time.perf_counter()
        state = step_fn(model, opt, b, state)
    sync()
    seconds = time.perf_counter() - t0
    samples = (len(batches) - warm) * args.micro
    peak = int(torch.cuda.max_memory_allocated()) if args.device.startswith("cuda") else None
    return {"samples_per_s": samples / seconds, "peak_bytes": peak, "seconds": seconds}


def gaccum_step(args):
    import gaccum

    def step(model, opt, batch, state=None):
        if batch is None:
            return gaccum.Accumulator(model, opt, accum_steps=args.accum)
        with state.accumulate():
            state.backward(lm_loss(model, batch))
        return state

    return step


def hand_written_step(args):
    def step(model, opt, batch, state=None):
        if batch is None:
            return 0
        (lm_loss(model, batch) / args.accum).backward()
        state += 1
        if state % args.accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return state

    return step


def accelerate_step(args):
    def step(model, opt, batch, state=None):
        if batch is None:
            from accelerate import Accelerator

            acc = Accelerator(gradient_accumulation_steps=args.accum, cpu=not args.device.startswith("cuda"))
            m, o = acc.prepare(model, opt)
            return (acc, m, o)
        acc, m, o = state
        with acc.accumulate(m):
            acc.backward(lm_loss(m, batch))
            o.step()
            o.zero_grad()
        return state

    return step


RUNS = {"gaccum (kernel)": gaccum_step, "hand-written": hand_written_step, "accelerate": accelerate_step}


def child(args) -> dict:
    """gaccum with the fallback, in a process where the compiled module is never loaded."""
    cmd = [sys.executable, __file__, "--only", "gaccum (kernel)", "--json"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("device", "steps", "accum", "micro", "d", "layers", "seq")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GACCUM_DISABLE_EXT": "1"},
                         timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="a tiny CPU run that checks the wiring; writes nothing")
    args = ap.parse_args()
    if args.dry_run:
        args.device, args.steps, args.accum, args.micro, args.d, args.layers, args.seq = "cpu", 1, 2, 2, 32, 1, 16
    if args.only:
        res = timed(args, RUNS[args.only](args))
        print(json.dumps(res))
        return
    from gaccum.ops import backend_for

    rows = {}
    for name, make in RUNS.items():
        try:
            rows[name] = timed(args, make(args))
        except ImportError as exc:
            rows[name] = {"error": f"not installed: {exc.name}"}
    rows["gaccum (fallback)"] = child(args)
    rows["gaccum (kernel)"]["backend"] = backend_for(args.device)
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<20} error: {r['error'][:200]}")
        else:
            peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] else "-"
            print(f"{name:<20} {r['samples_per_s']:>10.1f} samples/s  peak {peak}")
    if args.dry_run:
        return
    cfg = {k: getattr(args, k) for k in ("device", "steps", "accum", "micro", "d", "layers", "seq")}
    name = "end_to_end_" + args.device.split(":")[0] + ".json"
    print(f"wrote {write(name, {**environment(), 'config': cfg, 'rows': rows})}")


if __name__ == "__main__":
    main()
