"""Unscale-check-accumulate: gaccum vs PyTorch eager vs torch.compile vs a copy.

GPU mode (a CUDA device present): effective GB/s = bytes that must move / time
(CUDA events, warm-up, median) for (a) one 256M-element tensor, (b) a GPT-2-small
parameter list, (c) 10,000 tensors of 1-4K elements; writes results/kernel.json.
CPU mode: the fused CPU pass (gaccum._cpu) and the PyTorch chain against a plain
copy of the same gradients, GPT-2 small's 148 shapes halved (31M bf16 elements),
the rows timed in turn; writes results/kernel_cpu.json.
Run: python benchmarks/bench_kernel.py [--cpu]
"""

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

import gaccum  # noqa: E402
from gaccum import ops  # noqa: E402


def gpt2_small_shapes(d=768, vocab=50257, ctx=1024, layers=12):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def cpu_lists():
    """GPT-2 small's 148 parameter shapes with every dimension halved (31M elements): bf16 gradients, FP32 masters."""
    torch.manual_seed(0)
    shapes = gpt2_small_shapes(d=384, vocab=50257 // 2, ctx=512)
    return [torch.randn(s).bfloat16() for s in shapes], [torch.zeros(s) for s in shapes]


@contextlib.contextmanager
def pytorch_chain():
    """The CPU fallback without the fused module: GACCUM_DISABLE_EXT switches every compiled path off."""
    old = os.environ.get("GACCUM_DISABLE_EXT")
    os.environ["GACCUM_DISABLE_EXT"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["GACCUM_DISABLE_EXT"]
        else:
            os.environ["GACCUM_DISABLE_EXT"] = old


def interleaved(rows: dict, rounds=18) -> dict:
    """Median seconds per row, every row once a round in a new (seeded) random order, so a drift in the
    machine's speed, and whatever a row leaves behind for the next, reach every row alike."""
    for fn in rows.values():
        fn(), fn()
    times = {k: [] for k in rows}
    order = random.Random(0)
    for _ in range(rounds):
        for k in order.sample(list(rows), len(rows)):
            fn = rows[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_cpu():
    grads, masters = cpu_lists()
    found = torch.zeros(1)
    n = sum(g.numel() for g in grads)

    def chain_call(s, overwrite=False):
        with pytorch_chain():
            gaccum.unscale_check_accumulate_(grads, masters, found, s, overwrite=overwrite)

    def upcast_loop():
        for g, m in zip(grads, masters):
            u = g.float() * 0.5
            if not torch.isfinite(u).all():
                found.fill_(1)
            m.add_(u)

    copy_row = {"copy (roof)": lambda: torch._foreach_copy_(masters, grads)}
    rows = interleaved({
        **copy_row,
        "gaccum CPU kernel (accumulate, checked)": lambda: gaccum.unscale_check_accumulate_(grads, masters, found, 0.5),
        "gaccum CPU kernel (accumulate, inv_scale=1)": lambda: gaccum.unscale_check_accumulate_(grads, masters, found, 1.0),
        "gaccum CPU kernel (overwrite)": lambda: gaccum.unscale_check_accumulate_(grads, masters, found, 0.5, overwrite=True),
    })
    # torch's mixed-dtype ops, the chain and the loop allocate and free scratch each call, which slowed
    # whichever row ran next (the kernel's rows by up to half a copy): each group is timed on its own, against
    # a copy timed in the same group, and every ratio is to its group's copy.
    chain = interleaved({
        **copy_row,
        "_foreach_add_ (no check)": lambda: torch._foreach_add_(masters, grads, alpha=0.5),
        "gaccum PyTorch chain (accumulate, checked)": lambda: chain_call(0.5),
        "gaccum PyTorch chain (accumulate, inv_scale=1)": lambda: chain_call(1.0),
        "gaccum PyTorch chain (overwrite)": lambda: chain_call(0.5, overwrite=True),
    })
    loop = interleaved({**copy_row, "upcast-unscale-check-add loop": upcast_loop}, rounds=5)
    copies = {k: rows["copy (roof)"] for k in rows}  # each row's copy, timed in its group
    for group in (chain, loop):
        copies.update({k: group["copy (roof)"] for k in group if k != "copy (roof)"})
        rows.update({k: v for k, v in group.items() if k != "copy (roof)"})
    ratios = {k: v / copies[k] for k, v in rows.items()}
    print(f"CPU, {torch.get_num_threads()} threads, {n / 1e6:.1f}M bf16 elements in {len(grads)} tensors, "
          f"backend {ops.backend_for('cpu')}")
    print(f"{'implementation':<48} {'ms':>8} {'x copy':>8}")
    for k, v in rows.items():
        print(f"{k:<48} {v * 1e3:>8.2f} {ratios[k]:>8.2f}")
    path = write("kernel_cpu.json", {**environment(), "elements": n, "tensors": len(grads),
                                     "shapes": "GPT-2 small, every dimension halved", "backend": ops.backend_for("cpu"),
                                     "cases": {k: {"ms": v * 1e3, "x_copy": ratios[k], "copy_ms": copies[k] * 1e3}
                                               for k, v in rows.items()}})
    print(f"wrote {path}")


def timeit_cuda(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def eager_chain(grads, masters, found, inv):
    # PyTorch has no bf16 CUDA unscale (pytorch/pytorch#127176): upcast, unscale+check, add.
    up = [torch.empty_like(m) for m in masters]
    torch._foreach_copy_(up, grads)
    torch._amp_foreach_non_finite_check_and_unscale_(up, found, inv)
    torch._foreach_add_(masters, up)


def run_gpu():
    cases = {
        "a_one_256M_tensor": [(256 * 2**20,)],
        "b_gpt2_small": gpt2_small_shapes(),
        "c_10000_small": [(int(n),) for n in torch.randint(1024, 4097, (10_000,), generator=torch.Generator().manual_seed(0))],
    }
    compiled = torch.compile(eager_chain)
    out = {**environment(), "cases": {}}
    print(f"{'case':<20} {'impl':<16} {'GB/s':>8} {'ms':>8}")
    for name, shapes in cases.items():
        grads = [torch.randn(s, device="cuda").bfloat16() for s in shapes]
        masters = [torch.zeros(s, device="cuda") for s in shapes]
        found, inv = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
        n = sum(g.numel() for g in grads)
        bytes_moved = n * (2 + 4 + 4)  # read grad, read master, write master
        res = {
            "copy": timeit_cuda(lambda: torch._foreach_copy_(masters, grads)),  # same bytes: 2 + 4 per element
            "eager": timeit_cuda(lambda: eager_chain(grads, masters, found, inv)),
            "compile": timeit_cuda(lambda: compiled(grads, masters, found, inv)),
            "gaccum": timeit_cuda(lambda: gaccum.unscale_check_accumulate_(grads, masters, found, inv)),
            "gaccum_overwrite": timeit_cuda(lambda: gaccum.unscale_check_accumulate_(grads, masters, found, inv, overwrite=True)),
        }
        copy_gbps = n * 6 / res["copy"] / 1e9
        gbps = bytes_moved / res["gaccum"] / 1e9
        for k, v in res.items():
            moved = n * 6 if k in ("copy", "gaccum_overwrite") else bytes_moved
            print(f"{name:<20} {k:<16} {moved / v / 1e9:>8.1f} {v * 1e3:>8.3f}")
        out["cases"][name] = {
            "elements": n, "tensors": len(grads), "gbps": gbps, "copy_gbps": copy_gbps,
            "fraction_of_copy": gbps / copy_gbps, "speedup_vs_eager": res["eager"] / res["gaccum"],
            "speedup_vs_compile": res["compile"] / res["gaccum"],
            "overwrite_gbps": n * 6 / res["gaccum_overwrite"] / 1e9, "ms": {k: v * 1e3 for k, v in res.items()},
        }
        del grads, masters
        torch.cuda.empty_cache()
    # host overhead of one call for ~150 tensors (pointer table cached)
    grads = [torch.randn(64, device="cuda").bfloat16() for _ in range(150)]
    masters = [torch.zeros(64, device="cuda") for _ in range(150)]
    found, inv = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
    for _ in range(10):
        gaccum.unscale_check_accumulate_(grads, masters, found, inv)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(1000):
        torch.ops.gaccum.unscale_check_accumulate_(grads, masters, found, inv, False, False, None)
    out["host_overhead_us_150_tensors"] = (time.perf_counter() - t0) / 1000 * 1e6
    torch.cuda.synchronize()
    print(f"host overhead per call, 150 tensors: {out['host_overhead_us_150_tensors']:.1f} us")
    out["backend"] = ops.backend_for("cuda")
    print(f"wrote {write('kernel.json', out)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    a = ap.parse_args()
    run_cpu() if a.cpu or not torch.cuda.is_available() else run_gpu()
