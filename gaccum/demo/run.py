"""``gaccum demo``: plan, verify, train with accumulation vs a small-batch baseline, report.

Everything it needs ships with the package: a small GPT and a generated corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..accumulation import Accumulator
from ..lr import scale_lr
from ..memory import format_bytes
from ..metrics import MetricsLogger
from ..planner import plan as make_plan
from ..windows import Window
from ..verify import verify
from .model import Sampler, TinyGPT, lm_loss, load_corpus

SEQ_LEN = 64
CPU_MEMORY_LIMIT = "48MiB"  # the tiny GPT at 256 samples needs ~4x this: accumulation is really needed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--target-bs", type=int, default=256, help="effective batch size (samples)")
    p.add_argument("--memory-limit", default=None, help=f"memory budget (default: {CPU_MEMORY_LIMIT} on CPU, the GPU's free memory)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of the accumulated run")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate at the effective batch")
    p.add_argument("--out", default="gaccum-report", help="report folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")


def _bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True, leave=True, mininterval=1.0)


def _train(model, opt, sampler, micro_sizes: list[int], steps: int, accumulator_kw: dict, logger: MetricsLogger,
           device: torch.device, desc: str, quiet: bool) -> dict[str, Any]:
    """Train through Accumulator.micro_batch: gaccum runs the forward, so an OOM splits instead of ending the run.

    On CPU the Accumulator runs each micro-step under the planner's budget
    (``memory_limit``) and reports its peak; on CUDA the allocator's peak is read.
    """
    acc = Accumulator(model, opt, **accumulator_kw)
    acc.add_callback(logger)
    micro_peaks: list[int] = []
    bar = _bar(steps, desc, quiet)
    t0 = time.perf_counter()
    i = 0
    samples = 0
    while acc.optimizer_steps + acc.skipped_steps < steps:
        b = micro_sizes[i % len(micro_sizes)]
        x, y = sampler(b)
        logger.micro(None, b, b * SEQ_LEN)  # before the call: a boundary inside it logs this window
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = acc.micro_batch((x, y), lm_loss)
        micro_peaks.append(int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda"
                           else int(acc.peak_memory or 0))
        samples += b
        i += 1
        if res.boundary:
            rec = logger.records[-1]
            rec["peak_memory"] = max(micro_peaks[-len(micro_sizes):])
            bar.set_postfix(loss=f"{rec['loss']:.3f}", samples_s=f"{rec['samples_per_s']:.0f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", peak=format_bytes(rec["peak_memory"]),
                            skipped=acc.skipped_steps, oom_splits=acc.oom_splits, refresh=False)
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "samples": samples, "micro_peaks": micro_peaks, "records": list(logger.records),
           "master_grad_bytes": acc.master_grad_bytes, "optimizer_steps": acc.optimizer_steps,
           "skipped_steps": acc.skipped_steps, "oom_splits": acc.oom_splits,
           "micro_batch_limit": acc.micro_batch_limit}
    acc.close()
    return out


def window_text(window: Any) -> str:
    """A window written the one way windows are written: "5 x 52", "1 x 52 + 4 x 51"."""
    return str(Window.of(window))


def _one_large_batch(model, sampler, window: list[int], steps: int, lr: float,
                     device: torch.device) -> tuple[Optional[list[float]], Optional[int]]:
    """The run accumulation stands in for: the same micro-batches, concatenated, one step each.

    Returns its losses and its peak memory (the reason to accumulate). On CPU
    the budget is the planner's, so this can run over it; on a GPU that really
    cannot hold the batch it runs out of memory and the demo says so.
    """
    from ..accounting import LiveBytes

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses: list[float] = []
    peak = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(steps):
            parts = [sampler(b) for b in window]
            batch = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
            del parts
            opt.zero_grad(set_to_none=True)
            meter = LiveBytes().track(model, opt, batch) if device.type == "cpu" else contextlib.nullcontext()
            with meter:
                loss = lm_loss(model, batch)
                loss.backward()
                opt.step()
            if device.type == "cpu":
                peak = max(peak, meter.peak)
            losses.append(float(loss.detach()))
    except torch.OutOfMemoryError:
        return None, None
    finally:
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(device))
            torch.cuda.empty_cache()
    return losses, peak


def _plots(out: Path, big: dict, small: dict, plan_obj, budget: int, reference: Optional[list[float]],
           reference_peak: Optional[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = sorted(set(plan_obj.window))
    small_label = f"batch {sizes[0]}" if len(sizes) == 1 else f"batches of {sizes[0]}-{sizes[-1]}"
    for run, label, style in ((big, f"accumulated: effective batch {plan_obj.effective_batch_size} "
                               f"({window_text(plan_obj.window)})", "-o"),
                              (small, f"baseline: {small_label}, no accumulation", "-")):
        xs = [sum(r["samples"] for r in run["records"][: i + 1]) for i in range(len(run["records"]))]
        ax.plot(xs, [r["loss"] for r in run["records"]], style, label=label, markersize=3, linewidth=1.4)
    if reference is not None:
        xs = [plan_obj.effective_batch_size * (i + 1) for i in range(len(reference))]
        ax.plot(xs, reference, "--", color="black", linewidth=1.0,
                label=f"one batch of {plan_obj.effective_batch_size}, no accumulation (over the budget; reference)")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("training loss (cross-entropy, nats/byte)")
    ax.set_title("gaccum demo: loss by samples seen")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    # the two runs feed the same micro-batches, so their peaks coincide: one panel each, one y scale
    mib = 1 / 2**20
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(10, 4.4))
    runs = ((left, big, "tab:blue", "accumulated run: peak per micro-step"),
            (right, small, "tab:orange", f"baseline ({small_label}): peak per step"))
    levels = [budget] + big["micro_peaks"] + small["micro_peaks"] + [reference_peak or 0, plan_obj.peak_memory or 0]
    for ax, run, color, label in runs:
        ax.plot(range(1, len(run["micro_peaks"]) + 1), [p * mib for p in run["micro_peaks"]], color=color,
                linewidth=1.6, label=label, zorder=3)  # drawn over the planned-peak line it meets
        ax.axhline(budget * mib, color="tab:red", linestyle="--", label=f"planner budget ({format_bytes(budget)})")
        if reference_peak:
            ax.axhline(reference_peak * mib, color="black", linestyle="-", linewidth=1.6,
                       label=f"one batch of {plan_obj.effective_batch_size}, no accumulation "
                             f"({format_bytes(reference_peak)})")
        if run is big and big["master_grad_bytes"]:  # only a half-precision model keeps FP32 masters
            ax.axhline(big["master_grad_bytes"] * mib, color="tab:green", linestyle=":",
                       label=f"FP32 master-gradient buffer ({format_bytes(big['master_grad_bytes'])})")
        if plan_obj.peak_memory:
            ax.axhline(plan_obj.peak_memory * mib, color="tab:gray", linestyle="-.",
                       label=f"planned peak at b={plan_obj.micro_batch_size}")
        ax.set_xlabel("micro-step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center", bbox_to_anchor=(0.5, 0.55))  # the room between the runs and the batch
    left.set_ylabel("memory (MiB)")
    left.set_ylim(0, max(levels) * mib * 1.15)  # every line inside the frame, none on it
    fig.suptitle("gaccum demo: memory per micro-step (the same micro-batches, with and without accumulation)")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.target_bs < 1 or args.steps < 1:
        raise ValueError("gaccum: --target-bs and --steps must be >= 1")
    memory_limit = args.memory_limit or (CPU_MEMORY_LIMIT if device.type == "cpu" else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokens = load_corpus()
    print(f"gaccum demo: TinyGPT on {len(tokens) / 1e3:.0f} KB of bundled text, device {device}, "
          f"target effective batch {args.target_bs}")
    model = TinyGPT(seq_len=SEQ_LEN).to(device)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    # 1. plan
    plan_obj = make_plan(model, target_bs=args.target_bs, sample=Sampler(tokens, SEQ_LEN, device, seed=1),
                         loss_fn=lm_loss, optimizer=opt, memory_limit=memory_limit, cache=False)
    print()
    print(plan_obj)
    (out / "plan.json").write_text(json.dumps(plan_obj.to_dict(), indent=2))

    # 2. verify on the first window
    first_window = Sampler(tokens, SEQ_LEN, device, seed=2)(args.target_bs)
    report = verify(model, lm_loss, first_window, plan_obj.micro_batch_size)
    print(f"\nverify (first window): {report.verdict}\n")

    # 3. accumulated training, 4. small-batch baseline with the same samples
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    big_logger = MetricsLogger(metrics_path, extra={"run": "accumulated"})
    big = _train(model, opt, Sampler(tokens, SEQ_LEN, device, seed=args.seed + 10), plan_obj.window, args.steps,
                 {"plan": plan_obj,  # trains as it was planned (the plan says whether FP32 masters are kept)
                  "memory_limit": plan_obj.budget if device.type == "cpu" else None},
                 big_logger, device, "accumulated", args.no_progress)
    big_logger.close()

    model.load_state_dict(init_state)
    reference, reference_peak = _one_large_batch(model, Sampler(tokens, SEQ_LEN, device, seed=args.seed + 10),
                                                 plan_obj.window, big["optimizer_steps"], args.lr, device)
    model.load_state_dict(init_state)
    # The baseline's LR: the sqrt rule (Adam) taken from the effective batch down to its own batch.
    base_lr = scale_lr(args.lr, plan_obj.effective_batch_size, plan_obj.micro_batch_size, rule="sqrt")
    opt_small = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.01)
    small_logger = MetricsLogger(metrics_path, extra={"run": "baseline"})
    small_steps = len(big["micro_peaks"])  # one step per micro-batch of the same sizes: the same samples
    small = _train(model, opt_small, Sampler(tokens, SEQ_LEN, device, seed=args.seed + 10), plan_obj.window,
                   small_steps, {"accum_steps": 1, "memory_limit": plan_obj.budget if device.type == "cpu" else None},
                   small_logger, device, "baseline   ", args.no_progress)
    small_logger.close()

    # 5. report
    _plots(out, big, small, plan_obj, plan_obj.budget, reference, reference_peak)
    ref_gap = (max(abs(r["loss"] - v) for r, v in zip(big["records"], reference)) if reference is not None else None)
    summary = {
        "device": str(device), "torch": torch.__version__, "plan": plan_obj.to_dict(), "verify": report.to_dict(),
        "accumulated": {k: big[k] for k in ("seconds", "samples", "optimizer_steps", "skipped_steps", "master_grad_bytes",
                                            "oom_splits", "micro_batch_limit")}
        | {"final_loss": big["records"][-1]["loss"], "max_micro_peak": max(big["micro_peaks"])},
        "baseline": {k: small[k] for k in ("seconds", "samples", "optimizer_steps")}
        | {"final_loss": small["records"][-1]["loss"], "lr": base_lr, "max_micro_peak": max(small["micro_peaks"])},
        "one_large_batch": None if reference is None else {"final_loss": reference[-1], "peak": reference_peak,
                                                           "max_loss_gap_to_accumulated": ref_gap},
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nsummary")
    print(f"  accumulated: {big['optimizer_steps']} steps of {plan_obj.effective_batch_size} samples "
          f"({window_text(plan_obj.window)}), final loss {summary['accumulated']['final_loss']:.3f}, "
          f"{big['samples'] / big['seconds']:.0f} samples/s, max peak {format_bytes(max(big['micro_peaks']))} "
          f"(budget {format_bytes(plan_obj.budget)})")
    if big["oom_splits"]:
        print(f"  out of memory: {big['oom_splits']} micro-batch split(s); micro-batches now run in pieces of "
              f"{big['micro_batch_limit']}, the effective batch unchanged")
    else:
        print("  out of memory: none (micro_batch() would have split a micro-batch and carried on)")
    if reference is not None:
        print(f"  one batch:   {len(reference)} steps of {plan_obj.effective_batch_size} without accumulation (over the "
              f"budget, for reference): final loss {reference[-1]:.3f}, peak {format_bytes(reference_peak)}; largest "
              f"loss gap to the accumulated run {ref_gap:.1e}")
    else:
        print(f"  one batch:   {plan_obj.effective_batch_size} samples in one step ran out of memory here, as planned")
    sizes = sorted(set(plan_obj.window))
    per_step = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    print(f"  baseline:    {small['optimizer_steps']} steps of {per_step} samples (the same {small['samples']}), final loss "
          f"{summary['baseline']['final_loss']:.3f}, {small['samples'] / small['seconds']:.0f} samples/s, max peak "
          f"{format_bytes(max(small['micro_peaks']))}")
    if device.type == "cpu":
        print("  (CPU: both runs take every micro-step under gaccum's live-tensor accounting, which enforces the budget; "
              "their samples/s compare with each other, not with untracked training)")
    print(f"  note:        with equal samples the baseline takes {small['optimizer_steps'] / max(big['optimizer_steps'], 1):.0f}x "
          "the optimizer steps; accumulation gives the large batch's training (the reference line) within the "
          "memory budget, not a lower loss per sample")
    print(f"  verify:      {'PASS' if report.passed else 'FAIL'} (max rel diff {report.max_rel_diff:.1e})")
    print(f"  report:      {out.resolve()}/ (plan.json, metrics.jsonl, loss.png, memory.png, summary.json)")
    print(f"  total time:  {summary['seconds_total']:.1f} s")
    return 0
