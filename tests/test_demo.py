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
