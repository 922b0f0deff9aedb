"""`make gpu-proof`'s wiring, checked where CI runs (no GPU): every step named, scripts compile,
tests/cuda collects, the end-to-end bench runs its tiny CPU configuration."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_proof_dry_run_wiring():
    r = subprocess.run([sys.executable, "benchmarks/gpu_proof.py", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("clean build", "tests/cuda", "compute-sanitizer racecheck", "bench_kernel", "bench_end_to_end"):
        assert step in r.stdout
    assert "wiring ok" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole proof")
def test_gpu_proof_without_a_gpu_says_so():
    r = subprocess.run([sys.executable, "benchmarks/gpu_proof.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
