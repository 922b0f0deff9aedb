"""``make gpu-proof``: everything a GPU session owes, most valuable first, in under 8 minutes of wall time.

Runs with the machine's own python and torch (``PY=`` chooses; no venv, nothing installed, no network
needed). Each step has its own limit and runs in its own process group, killed whole when the limit
passes (the python under compute-sanitizer too); the whole run has a deadline, and a step that no
longer fits is recorded as skipped. After every step the summary JSON (device, driver, torch, CUDA,
date, each step's exit status, seconds and output tail) is rewritten: into ``$OUT`` when it is set,
``benchmarks/results/`` otherwise, so a run killed from outside still leaves what it measured.

Steps: build the module in place with gaccum/_build.py -> cuobjdump shows sm_90 code -> bitwise smoke
(benchmarks/gpu_smoke.py) -> tests/cuda (no -x; per-test timeouts) -> compute-sanitizer memcheck and
racecheck on the smoke, filtered to gaccum's kernel, with torch's caching allocator off -> the
kernel's GPU time by CUDA-graph replay against the copy roof and the eager chain, then torch.compile
-> the planner on a GPT-2-small-shaped model and a ResNet-shaped CNN with a soak -> end to end ->
the CPU suite, only if time is left.

``--dry-run`` (CI) checks the same wiring without a GPU: every step's tool is looked up, every script
exists and compiles, the smoke, graph bench and planner run their CPU forms, tests/cuda collects, a
step that outlives its limit is killed with its children, and the summary is written and read back.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import py_compile
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 470  # under 8 minutes of wall time, start-up included
PY = sys.executable
KERNEL = "unscale_check_accumulate_kernel"
SANITIZER_EXIT = 86  # compute-sanitizer's own exit code for a finding: never pytest's or python's


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: int
    env: dict[str, str] = field(default_factory=dict)
    tool: str = ""  # an executable the GPU machine must have


def out_dir() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"


def steps(out: Path) -> list[Step]:
    """In the order that proves the most first: the deadline cuts the tail, and says so."""
    smoke = ["benchmarks/gpu_smoke.py", "--device", "cuda"]
    per_test = ["--timeout=60"] if _has("pytest_timeout") else ["-o", "faulthandler_timeout=60"]
    sanitize = ["compute-sanitizer", *_kernel_filter(), "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "25"]
    nocache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # the caching allocator hides out-of-bounds accesses
    return [
        Step("build the module in place", [PY, "gaccum/_build.py", "gaccum"], 150, tool="nvcc"),
        Step("cuobjdump: sm_90 code", [PY, "benchmarks/gpu_proof.py", "--sass"], 20, tool="cuobjdump"),
        Step("bitwise smoke", [PY, *smoke, "--out", str(out / "gpu_smoke.json")], 90),
        Step("tests/cuda", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *per_test, "tests/cuda"], 150),
        Step("compute-sanitizer memcheck", [*sanitize, "--tool", "memcheck", PY, *smoke, "--quick"], 100, nocache,
             tool="compute-sanitizer"),
        Step("compute-sanitizer racecheck", [*sanitize, "--tool", "racecheck", PY, *smoke, "--quick"], 100,
             nocache, tool="compute-sanitizer"),
        Step("kernel time by graph replay", [PY, "benchmarks/bench_kernel_graph.py", "--out",
                                             str(out / "kernel_graph.json")], 60),
        Step("torch.compile of the chain", [PY, "benchmarks/bench_kernel_graph.py", "--compile", "--out",
                                            str(out / "kernel_graph_compile.json")], 120),
        Step("planner with a soak", [PY, "benchmarks/gpu_planner.py", "--out", str(out / "gpu_planner.json")], 150),
        Step("end to end", [PY, "benchmarks/bench_end_to_end.py", "--device", "cuda"], 120),
        Step("CPU suite", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *per_test, "tests",
                           "--ignore=tests/cuda"], 400),
    ]


def _kernel_filter() -> list[str]:
    """compute-sanitizer's option that limits checking to gaccum's kernel, as this version spells it
    (none when it has neither: every kernel is then checked, torch's too)."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return ["--kernel-name", f"kns={KERNEL}"]  # what the dry run shows
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    for option in ("--kernel-name", "--kernel-regex"):
        if option + " " in help_text or option + "\n" in help_text:
            return [option, f"kns={KERNEL}"]
    return []


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def environment_record() -> dict:
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": PY, "platform": platform.platform()}
    try:
        import torch

        rec.update(torch=torch.__version__, cuda=torch.version.cuda,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
    except ImportError as exc:
        rec["torch"] = f"not importable: {exc}"
    smi = shutil.which("nvidia-smi")
    rec["driver"] = (subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip() if smi else None)
    nvcc = shutil.which("nvcc")
    rec["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:] \
        if nvcc else None
    return rec


def run(step: Step, limit: float) -> dict:
    """One step in its own process group; past ``limit`` the whole group is killed (rc 124)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", **step.env}
    try:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    except FileNotFoundError as exc:
        return {"step": step.name, "rc": 127, "seconds": 0.0, "tail": f"not found: {exc.filename}"}
    try:
        output, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc, output = 124, f"killed with its process group after {limit:.0f} s\n{output}"
    return {"step": step.name, "cmd": " ".join(step.cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": output[-4000:]}


def write_summary(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file


def proof(out: Path, deadline: float = DEADLINE_S) -> int:
    start = time.perf_counter()
    summary = out / "gpu_proof.json"
    record = {**environment_record(), "deadline_s": deadline, "steps": [], "passed": False}
    for step in steps(out):
        left = deadline - (time.perf_counter() - start)
        if left < 15:
            record["steps"].append({"step": step.name, "rc": None, "skipped": "the deadline was reached"})
        else:
            r = run(step, min(step.timeout, left))
            print(f"{r['step']:<32} rc {r['rc']!s:>4}  {r['seconds']:>6.1f} s", flush=True)
            record["steps"].append(r)
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["passed"] = all(r.get("rc") == 0 for r in record["steps"])
        write_summary(summary, record)
    print(f"wrote {summary}")
    return 0 if record["passed"] else 1


def sass() -> int:
    """cuobjdump lists sm_90 machine code in the module that was just built."""
    so = next((ROOT / "gaccum").glob("_C*.so"), None)
    if so is None:
        print("no gaccum/_C*.so: the build step did not produce it")
        return 1
    elf = subprocess.run(["cuobjdump", "--list-elf", str(so)], capture_output=True, text=True).stdout
    res = subprocess.run(["cuobjdump", "--dump-resource-usage", str(so)], capture_output=True, text=True).stdout
    print(elf, *[line for line in res.splitlines() if "REG" in line][:6], sep="\n")
    return 0 if "sm_90" in elf else 1


def dry_run() -> int:
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for step in steps(out):
            found = shutil.which(step.tool) if step.tool else True
            print(f"[plan] {step.name:<32} limit {step.timeout:>4} s  {'' if found else '(' + step.tool + ' missing here)'}")
            problems += [f"{step.name}: {a} does not exist" for a in step.cmd if a.endswith(".py") and not (ROOT / a).is_file()]
        for script in sorted((ROOT / "benchmarks").glob("*.py")):
            py_compile.compile(str(script), doraise=True)
        checks = [
            Step("smoke on the fallback", [PY, "benchmarks/gpu_smoke.py", "--device", "cpu", "--quick"], 300),
            Step("graph bench, CPU form", [PY, "benchmarks/bench_kernel_graph.py", "--dry-run", "--out",
                                           str(out / "kg.json")], 120),
            Step("planner, CPU form", [PY, "benchmarks/gpu_planner.py", "--dry-run", "--out", str(out / "gp.json")],
                 300),
            Step("end to end, CPU form", [PY, "benchmarks/bench_end_to_end.py", "--dry-run"], 300),
            Step("tests/cuda collects", [PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                         "tests/cuda"], 120),
            Step("a step past its limit is killed whole",  # as the python under compute-sanitizer would be
                 [PY, "-c", "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
                            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(c.pid)); "
                            "time.sleep(60)", str(out / "child.pid")], 3),
        ]
        for step in checks:
            r = run(step, step.timeout)
            ok = r["rc"] == (124 if "killed" in step.name else 0)
            if "killed" in step.name:
                ok = ok and not _alive(int((out / "child.pid").read_text()))
            print(f"[dry-run] {step.name:<40} rc {r['rc']}  {'ok' if ok else 'PROBLEM'}")
            if not ok:
                problems.append(f"{step.name}:\n{r['tail'][-1500:]}")
        summary = out / "gpu_proof.json"
        write_summary(summary, {**environment_record(), "steps": [], "dry_run": True})
        back = json.loads(summary.read_text())
        problems += [f"summary lacks {k}" for k in ("device", "driver", "torch", "cuda", "date") if k not in back]
    for p in problems:
        print(f"[dry-run] PROBLEM {p}")
    print(f"[dry-run] ran with {PY} as it is: no venv made, nothing installed")
    print("[dry-run] wiring ok" if not problems else f"[dry-run] {len(problems)} problem(s)")
    return 1 if problems else 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs after 2 s. A killed process whose parent died too waits as a zombie until
    init reaps it, which some containers' init does late: a zombie runs nothing and counts as dead."""
    for _ in range(20):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        if _zombie(pid):
            return False
        time.sleep(0.1)
    return True


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): only kill(pid, 0) tells
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--sass", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sass:
        return sass()
    if args.dry_run:
        return dry_run()
    try:
        import torch
    except ImportError:
        print(f"gpu-proof: {PY} has no torch; pass PY=/path/to/a/python with torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-proof: no CUDA device here; use --dry-run to check the wiring", file=sys.stderr)
        return 2
    return proof(out_dir())


if __name__ == "__main__":
    sys.exit(main())
