"""`make kernel-check` would catch a broken kernel: each planted bug below must make it fail.

The kernel's exact source (csrc/unscale_check_accumulate.cu) is built for the host through csrc/emu/
with one bug planted, and the same matrix `make kernel-check` runs must reject it. The unplanted source
must pass the same run, or a failing mutant would prove nothing.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gaccum import _build, _hostemu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the host emulation")

SOURCE = (_build.csrc_dir() / _hostemu.KERNEL).read_text()

# (name, text in the kernel, what replaces it, flavour, kernel_check arguments)
PLANTED = [
    ("scalar path bound off by one", "for (int64_t j = threadIdx.x; j < scalar; j += blockDim.x)",
     "for (int64_t j = threadIdx.x; j <= scalar; j += blockDim.x)", "asan", ["--quick"]),
    ("the scalar tail starts one element early (overlaps the vector body)", "const int64_t i = j < head ? j : j + body;",
     "const int64_t i = j < head ? j : j + body - 1;", "asan", ["--quick"]),
    ("the vector body one vector too long (reads past the chunk)", "const int64_t body = vec_ok ? ((len - head) / ILP) * ILP : 0;",
     "const int64_t body = vec_ok ? ((len - head) / ILP + 1) * ILP : 0;", "asan", ["--quick"]),
    ("a tensor's table entry not carried into the next launch", "if (!last_chunk) {", "if (false) {", "fma",
     ["--subset", "--big"]),
    ("inf check dropped in the vector path", "bad |= !isfinite(out[k]);", "(void)0;", "asan", ["--quick"]),
    ("inf check dropped in the scalar path", "bad |= !isfinite(o);", "(void)0;", "asan", ["--quick"]),
    ("overwrite ignored in the vector path", "float4 mv = overwrite ?", "float4 mv = false ?", "asan", ["--quick"]),
    ("overwrite ignored in the scalar path", "unfused(overwrite ? 0.f : m[i],", "unfused(m[i],", "asan", ["--quick"]),
    ("zero_grad ignored in the vector path", "if (zero_grad) {", "if (false) {", "asan", ["--quick"]),
    ("the block's OR replaced by thread 0's own flag", "if (__syncthreads_or(bad) && threadIdx.x == 0)",
     "if ((__syncthreads_or(bad), bad) && threadIdx.x == 0)", "asan", ["--quick"]),
    ("the master's alignment not checked before float4 access", "is_aligned(m + head, 16)", "true", "asan",
     ["--quick"]),
    ("the 448-tensor table never flushed", "if (nt == kMaxTensors) flush();", "", "asan", ["--quick"]),
    ("the warp reduction skips half the lanes",
     "for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);\n    const int lane",
     "for (int off = 8; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);\n    const int lane",
     "asan", ["--quick"]),
    ("the norm's second stage skips the last partial sum",
     "for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];",
     "for (int64_t i = threadIdx.x; i < count - 1; i += blockDim.x) acc += partials[i];", "asan", ["--quick"]),
    ("the norm's partials written where the next launch writes its own", "partials != nullptr ? partials + written : nullptr",
     "partials", "asan", ["--quick"]),
    ("the product and the sum contracted into an FMA", "return __fadd_rn(m, __fmul_rn(g, s));",
     "return m + g * s;", "fma", ["--quick"]),
]


def _check(flavour: str, args: list[str], text: str | None = None):
    exe = _hostemu.build_check(flavour, kernel_text=text)
    return _hostemu.run_check(exe, *args, timeout=600)


def test_the_unplanted_kernel_passes_the_runs_the_mutants_fail():
    for flavour, args in {("asan", ("--quick",)), ("fma", ("--quick",)), ("fma", ("--subset", "--big"))}:
        proc = _check(flavour, list(args))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "all equal to the float64 reference" in proc.stdout


def test_every_planted_bug_is_caught():
    for name, old, _, _, _ in PLANTED:
        assert SOURCE.count(old) == 1, f"planted bug '{name}': its text is no longer in the kernel exactly once"

    def one(bug):
        name, old, new, flavour, args = bug
        proc = _check(flavour, args, SOURCE.replace(old, new))
        return name, proc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, PLANTED))
    missed = [name for name, proc in results if proc.returncode == 0]
    assert not missed, f"kernel-check passed a kernel with a planted bug: {missed}"
    for name, proc in results:  # each was rejected by a check or a sanitizer, not by a crash of the harness
        out = proc.stdout + proc.stderr
        assert "kernel-check FAILED" in out or "Sanitizer" in out or "runtime error" in out, (name, out[-2000:])


def test_thread_sanitizer_sees_two_blocks_update_one_master():
    """Why ops refuses overlapping masters: on a GPU two blocks would race and lose updates."""
    proc = _check("tsan", ["--race-demo", "--workers", "2"])
    assert "ThreadSanitizer: data race" in proc.stderr
    assert "unscale_check_accumulate.cu:" in proc.stderr  # #line kept: the report names the kernel's line


def test_launch_rewrite_keeps_lines_and_passes_the_table_once():
    text = _hostemu.rewrite_launches(SOURCE, "k.cu")
    assert text.startswith('#line 1 "k.cu"\n') and text.count("\n") == SOURCE.count("\n") + 1
    assert "<<<" not in text and "::gaccum_emu::Launch(nb, kBlockThreads, 0, stream)(unscale_check_accumulate_kernel," in text
    assert "const TensorTable& table" in text and "float* __restrict__ found_inf" in text
    with pytest.raises(_hostemu.EmuError, match="no <<<"):
        _hostemu.rewrite_launches("int main() {}", "x.cu")
