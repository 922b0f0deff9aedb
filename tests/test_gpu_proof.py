"""`make gpu-proof`'s wiring, checked where CI runs (no GPU): the machine's own python as it is (here a venv
python holding torch), every step named with its limit, the CPU forms of the smoke, graph bench, planner
and end-to-end bench run, tests/cuda collects, a step past its limit is killed with its children, and the
summary is written with device, driver, torch, CUDA and date."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_proof_dry_run_with_a_venv_python_and_nothing_installed():
    r = subprocess.run(["make", "gpu-proof-dry-run", f"PY={sys.executable}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("build the module in place", "cuobjdump", "bitwise smoke", "tests/cuda", "compute-sanitizer memcheck",
                 "compute-sanitizer racecheck", "graph replay", "torch.compile", "planner with a soak", "end to end",
                 "CPU suite", "killed whole    rc 124  ok"):
        assert step in r.stdout, step
    assert "wiring ok" in r.stdout
    plan = subprocess.run(["make", "--no-print-directory", "-n", "gpu-proof", "PY=/opt/machine/python3"], cwd=ROOT,
                          capture_output=True, text=True)
    assert plan.stdout.strip() == "/opt/machine/python3 benchmarks/gpu_proof.py"  # no venv, no pip, no setup


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole proof")
def test_gpu_proof_without_a_gpu_says_so():
    r = subprocess.run([sys.executable, "benchmarks/gpu_proof.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
