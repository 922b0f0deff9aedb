"""``make gpu-proof``: everything a GPU session owes, in one command, well inside 25 minutes.

Builds the CUDA module from a clean tree (it must load: GACCUM_REQUIRE_EXT=1), runs the whole suite
and tests/cuda, runs compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over the kernel
tests, then the benchmarks against their peers: the kernel against the copy roof and the eager chain
(bench_kernel.py), the host overhead and end to end (kernel, fallback, hand-written loop, Accelerate:
bench_end_to_end.py). Each step has a time limit and the whole run a deadline; what was skipped for
time is recorded, never silently dropped. Writes results/gpu_proof.json: device, driver, torch, CUDA,
date, and every step's exit status, seconds and output tail.

``--dry-run`` (run by CI) checks the wiring without a GPU: every tool and script the run needs is
named and found (or said to be missing here), the benchmark scripts compile, tests/cuda collects, and
the end-to-end bench runs its tiny CPU configuration. It writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import py_compile
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

DEADLINE_S = 24 * 60
PY = sys.executable


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: int
    env: dict[str, str] = field(default_factory=dict)
    tool: str = ""  # an executable that must exist on the GPU machine


def steps() -> list[Step]:
    """In the order that proves the most first: what the deadline cuts is the tail, and is recorded."""
    cuda_tests = [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/cuda"]
    out = [
        Step("clean build (the module must load)",
             [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 300,
             {"GACCUM_REQUIRE_EXT": "1"}, tool="nvcc"),
        Step("the kernel is the backend on cuda",
             [PY, "-c", "from gaccum.ops import backend_for; b = backend_for('cuda'); print(b); "
                        "raise SystemExit(b != 'cuda-kernel')"], 60),
        Step("tests/cuda", cuda_tests, 240),
        Step("bench_kernel (GPU)", [PY, "benchmarks/bench_kernel.py"], 180),
        Step("bench_host_overhead (GPU)", [PY, "benchmarks/bench_host_overhead.py", "--device", "cuda"], 120),
        Step("bench_end_to_end (GPU)", [PY, "benchmarks/bench_end_to_end.py", "--device", "cuda"], 240),
        Step("whole suite", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], 420),
    ]
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        # the kernel tests without the >2^31-element and planner ones, which are slow under the sanitizer
        out.append(Step(f"compute-sanitizer {tool}",
                        ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", *cuda_tests, "-k",
                         "not 2_pow_31 and not planner"], 150, tool="compute-sanitizer"))
    return out


def environment_record() -> dict:
    from common import environment

    return environment()


def run(step: Step, left: float) -> dict:
    limit = int(min(step.timeout, max(left, 0)))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(step.cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, **step.env})
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = 124, f"timed out after {limit} s\n" + str(exc.stdout or "")[-2000:]
    except FileNotFoundError as exc:
        rc, tail = 127, f"not found: {exc.filename}"
    return {"step": step.name, "cmd": " ".join(step.cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": tail}


def dry_run() -> int:
    problems = []
    for step in steps():
        found = shutil.which(step.tool) if step.tool else True
        print(f"[plan] {step.name:<40} limit {step.timeout:>4} s  {'' if found else '(' + step.tool + ' missing here)'}")
        for arg in step.cmd:
            if arg.endswith(".py") and not (ROOT / arg).is_file():
                problems.append(f"{step.name}: {arg} does not exist")
    print(f"[plan] total of the limits {sum(s.timeout for s in steps())} s against a deadline of {DEADLINE_S} s")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        py_compile.compile(str(script), doraise=True)
    collect = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/cuda"],
                             cwd=ROOT, capture_output=True, text=True)
    if collect.returncode != 0:
        problems.append("tests/cuda does not collect:\n" + collect.stdout[-1500:] + collect.stderr[-1500:])
    e2e = subprocess.run([PY, "benchmarks/bench_end_to_end.py", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    if e2e.returncode != 0:
        problems.append("bench_end_to_end --dry-run failed:\n" + e2e.stderr[-1500:])
    json.dumps(environment_record())  # the record the real run writes can be made
    for p in problems:
        print(f"[dry-run] PROBLEM {p}")
    print("[dry-run] wiring ok" if not problems else f"[dry-run] {len(problems)} problem(s)")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        return dry_run()
    import torch

    if not torch.cuda.is_available():
        print("gpu-proof: no CUDA device here; use --dry-run to check the wiring", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = []
    for step in steps():
        left = DEADLINE_S - (time.perf_counter() - start)
        if left < 30:
            results.append({"step": step.name, "rc": None, "skipped": "deadline reached"})
            continue
        r = run(step, left)
        print(f"{r['step']:<40} rc {r['rc']:>4}  {r['seconds']:>7.1f} s", flush=True)
        results.append(r)
    record = {**environment_record(), "seconds": round(time.perf_counter() - start, 1), "steps": results,
              "passed": all(r.get("rc") == 0 for r in results)}
    from common import write

    print(f"wrote {write('gpu_proof.json', record)}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
