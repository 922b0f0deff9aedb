import json
import subprocess
import sys

import gaccum
from gaccum.metrics import MetricsLogger


def test_demo_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "rep"
    # on CPU everywhere: a 24 MiB limit is below a GPU's CUDA context, so on a GPU machine nothing would fit
    r = subprocess.run([sys.executable, "-m", "gaccum.cli", "demo", "--steps", "3", "--target-bs", "64",
                        "--memory-limit", "24MiB", "--out", str(out), "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gaccum plan" in r.stdout and "verify (first window): PASS" in r.stdout and "summary" in r.stdout
    for name in ("plan.json", "metrics.jsonl", "loss.png", "memory.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["effective_batch_size"] == 64 and plan["accum_steps"] > 1  # accumulation really needed
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [x for x in recs if x["run"] == "accumulated"]
    # one memory story: training keeps FP32 masters exactly when the plan was measured with them
    assert len(acc) == 3 and all(x["samples"] == 64 and (x["master_grad_bytes"] > 0) == plan["master_grads"]
                                 for x in acc)
    assert {"loss", "samples_per_s", "tokens_per_s", "peak_memory", "skipped_steps", "loss_scale"} <= set(acc[0])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"accum_steps", "micro_batch_limit", "oom_splits"} <= set(acc[0]) and acc[0]["oom_splits"] == 0
    summary = json.loads((out / "summary.json").read_text())
    # the one-large-batch reference (CPU: the budget is simulated, so it can run) follows the accumulated run
    assert summary["one_large_batch"]["max_loss_gap_to_accumulated"] < 1e-4
    assert abs(acc[-1]["loss"] - summary["one_large_batch"]["final_loss"]) < 1e-4


def test_metrics_logger_writes_one_line_per_optimizer_step(tmp_path):
    import torch

    model = torch.nn.Linear(3, 1)
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    log = MetricsLogger(tmp_path / "m.jsonl")
    acc.add_callback(log)
    for _ in range(4):
        with acc.accumulate():
            loss = model(torch.randn(5, 3)).pow(2).mean()
            log.micro(loss, 5, 0)
            acc.backward(loss)
    log.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["step"] == 2 and json.loads(lines[1])["samples"] == 10


def test_the_metrics_go_to_tensorboard_and_read_back():
    import tempfile

    import pytest
    import torch

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        model = torch.nn.Linear(3, 1).bfloat16()
        acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2,
                                 memory_limit="1MiB")
        writer = SummaryWriter(tmp)
        log = MetricsLogger(f"{tmp}/m.jsonl", writer=writer, budget=1 << 20)
        acc.add_callback(log)
        for _ in range(6):
            x = torch.randn(5, 3).bfloat16()
            acc.micro_batch((x,), lambda m, b: m(b[0]).float().pow(2).mean())
            log.micro(None, 5, 15)
        writer.flush()
        events = EventAccumulator(tmp)
        events.Reload()
        tags = set(events.Tags()["scalars"])
        for k in ("peak_memory", "peak_of_budget", "master_grad_bytes", "skipped_steps", "discarded_windows",
                  "oom_splits", "samples_per_s", "tokens_per_s", "loss"):
            assert f"gaccum/{k}" in tags, k
        steps = [e.step for e in events.Scalars("gaccum/samples_per_s")]
        assert steps == [1, 2, 3]  # one point per optimizer step
        assert all(0 < e.value <= 1 for e in events.Scalars("gaccum/peak_of_budget"))  # held under the budget
        assert events.Scalars("gaccum/master_grad_bytes")[0].value == acc.master_grad_bytes > 0
        log.close()
        acc.close()
