"""Host time per call of the master-gradient hot path, up to the launch.

The launch itself is the emulated module's (csrc/ built against csrc/emu/) with GACCUM_EMU_NO_EXEC=1:
launches are packed, checked and counted but no block runs, so what is timed is everything the host
does before a GPU would start -- Python, the pybind11 conversion, the launcher's table packing.

Two shapes: GPT-2 small's 148 parameters (bf16) and 10,000 tiny tensors. Three entries:
  * "hot path"  -- FusedMasters.launch(index, grad pointers): MasterGrads' flush, the goal's figure;
  * "hooks"     -- MasterGrads' post-accumulate hook, which now also collects each gradient's index and
                   pointer for that call, timed whole and reported per tensor, so nothing is hidden;
  * "custom op" -- torch.ops.gaccum.unscale_check_accumulate_ with full validation (the public entry).
Writes results/host_overhead.json. Run: python benchmarks/bench_host_overhead.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["GACCUM_EMU_NO_EXEC"] = "1"  # before the emulated module's first launch

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

from gaccum import _hostemu, ops  # noqa: E402
from gaccum.accumulation import MasterGrads  # noqa: E402


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, f = 768, 3072
    shapes = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, f), (f,), (f, d), (d,)]
    return shapes + [(d,), (d,)]


def timed(fn, repeat: int, sync=lambda: None) -> float:
    """Median seconds per call over `repeat` calls (after 5 warm-up calls); `sync` runs untimed between
    calls (on a GPU: the launches of one call never queue behind the previous call's)."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(shapes: list[tuple[int, ...]], repeat: int, device: str = "cpu") -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    masters = MasterGrads(params)
    fused = masters._fused
    assert fused is not None, "the fused kernel does not serve this device"
    index = list(range(len(params)))
    ptrs = [p.grad.data_ptr() for p in params]
    hot = timed(lambda: fused.launch(index, ptrs, True), repeat, sync)

    masters.bucket_bytes = 1 << 62  # one flush per backward: the hooks only collect

    def hooks():  # MasterGrads' own post-accumulate hooks for every gradient, the flush left out
        _as_if_in_backward(masters)
        for p in params:
            masters._hook(p)
        masters._ready = {True: ([], [], []), False: ([], [], [])}
        masters._pending_bytes = 0

    hook = timed(hooks, max(20, repeat // 4))
    grads = [p.grad for p in params]
    found, inv = torch.zeros(1, device=device), torch.ones(1, device=device)
    op = timed(lambda: torch.ops.gaccum.unscale_check_accumulate_(grads, masters.views, found, inv, True, False,
                                                                    None), max(20, repeat // 4), sync)
    # A whole backward's worth, as MasterGrads runs it: every hook, then the flush (which frees .grad),
    # with the hot path and with the custom op it replaced.
    def cycle():
        for p, g in zip(params, grads):
            p.grad = g
        _as_if_in_backward(masters)
        for p in params:
            masters._hook(p)
        masters.flush_pending()

    both = {"hot path": timed(cycle, max(20, repeat // 4), sync)}
    masters._fused = None
    both["custom op"] = timed(cycle, max(20, repeat // 4), sync)
    masters.remove()
    return {"tensors": len(params), "hot_path_us": hot * 1e6, "hooks_ns_per_tensor": hook * 1e9 / len(params),
            "custom_op_us": op * 1e6, "hooks_and_flush_us": {k: v * 1e6 for k, v in both.items()}}


def _as_if_in_backward(masters: MasterGrads) -> None:
    """Outside a real backward no end-of-backward callback can be queued: mark the watch as already inside
    this (the non-)backward, as its first hook would, so the hooks run their steady-state path."""
    masters.watch._task, masters.watch._open = torch._C._current_graph_task_id(), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the real module and real (asynchronous) launches on the GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        ops.set_host_backend(_hostemu.load_module())
        launch = "emulated module, GACCUM_EMU_NO_EXEC=1 (no block runs)"
    else:
        launch = "the compiled CUDA module: real asynchronous launches, host time up to their return"
    small = measure(gpt2_small_shapes(), args.repeat, args.device)
    tiny = measure([(16,)] * 10_000, max(20, args.repeat // 10), args.device)
    out = {**environment(), "launch": launch,
           "tensors_148_us": small["hot_path_us"], "tensors_10000_us": tiny["hot_path_us"],
           "goal_us": {"tensors_148": 25, "tensors_10000": 1000},
           "gpt2_small_148": small, "tiny_10000": tiny}
    for name, r in (("148 tensors (GPT-2 small)", small), ("10,000 tensors", tiny)):
        hf = r["hooks_and_flush_us"]
        print(f"{name}: hot path {r['hot_path_us']:.1f} us/call (hooks {r['hooks_ns_per_tensor']:.0f} ns/tensor "
              f"before it); custom op {r['custom_op_us']:.1f} us/call; a backward's hooks + flush "
              f"{hf['hot path']:.0f} us vs {hf['custom op']:.0f} us through the op")
    name = args.out or ("host_overhead.json" if args.device == "cpu" else "host_overhead_cuda.json")
    print(f"wrote {write(name, out)}")


if __name__ == "__main__":
    main()
