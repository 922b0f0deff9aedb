"""The kernel's GPU time, free of the host: each candidate captured once in a CUDA graph and replayed.

For GPT-2 small's 148 gradients (bf16 into FP32 masters): the fused op, the eager chain (upcast, scale,
add, isfinite: what a hand-written loop runs), ``torch.compile`` of that chain, and the copy roof (one
large device-to-device copy of the same bytes). Time per call is the median of CUDA-event-timed
batches of graph replays; the host time of one direct call (validation, pointer tables, launch) is
reported apart. ``--dry-run`` builds a tiny case on CPU and runs every candidate once (no graphs).
Writes JSON to ``--out`` (default results/kernel_graph.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_kernel import gpt2_small_shapes  # noqa: E402
from common import RESULTS, environment  # noqa: E402

from gaccum import ops  # noqa: E402


def lists(device, tiny):
    shapes = [(64,), (33, 7), (1000,)] if tiny else gpt2_small_shapes()
    torch.manual_seed(0)
    grads = [torch.randn(s, device=device).bfloat16() for s in shapes]
    masters = [torch.zeros(s, device=device) for s in shapes]
    return grads, masters


def candidates(grads, masters, device, with_compile):
    found = torch.zeros(1, device=device)
    inv = torch.full((1,), 0.5, device=device)

    def fused():
        ops.unscale_check_accumulate_(grads, masters, found, inv)

    def eager():
        ups = [g.float() for g in grads]
        torch._foreach_mul_(ups, inv.reshape(()))
        torch._foreach_add_(masters, ups)
        found.add_(torch.stack([m.isfinite().all().logical_not() for m in masters]).any().float())

    out = {"fused kernel": fused, "eager chain": eager}
    if with_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(eager, dynamic=False)
        compiled()
        out["torch.compile chain"] = compiled
        out["_compile_seconds"] = time.perf_counter() - t0  # type: ignore[assignment]
    moved = sum(g.numel() * g.element_size() + 2 * m.numel() * 4 for g, m in zip(grads, masters))
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out["copy roof (same bytes)"] = lambda: dst.copy_(src)  # reads + writes `moved` bytes
    return out, moved


def graph_time(fn, reps=20, batches=7):
    """Median GPU seconds per call from replays of one captured call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm outside the capture (allocations, lazy init)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times)


def host_time(fn, device, reps=50):
    """Median wall seconds of one direct call (the host's share: validation, tables, launch)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the eager chain (slow to compile)")
    ap.add_argument("--out", default=str(RESULTS / "kernel_graph.json"))
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    grads, masters = lists(device, args.dry_run)
    cands, moved = candidates(grads, masters, device, args.compile and not args.dry_run)
    compile_s = cands.pop("_compile_seconds", None)
    rows = {}
    for name, fn in cands.items():
        if args.dry_run:
            fn()
            rows[name] = {"ran": True}
            continue
        gpu = graph_time(fn)
        rows[name] = {"gpu_us": round(gpu * 1e6, 2), "GBps": round(moved / gpu / 1e9, 1),
                      "host_us": round(host_time(fn, device) * 1e6, 1)}
    if not args.dry_run:
        roof = rows["copy roof (same bytes)"]["gpu_us"]
        for r in rows.values():
            r["x_copy_roof"] = round(r["gpu_us"] / roof, 3)
    record = {"environment": environment(), "case": f"{len(grads)} tensors (GPT-2 small)" if not args.dry_run
              else "dry run", "bytes_moved": moved, "compile_seconds": compile_s, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    for name, r in rows.items():
        print(f"{name:<26} {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
