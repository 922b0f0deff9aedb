"""tests/kernel/test_cpu_kernel.py is a test: each bug planted in csrc/cpu/accumulate.cpp makes it fail.

Each mutant is built from the source with one change, loaded in place of gaccum._cpu in a fresh
interpreter, and the reference tests run against it; the unchanged source passes the same way."""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "cpu" / "accumulate.cpp"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

MUTANTS = {
    "none": None,
    "fused multiply-add in the tail": ("const float p = From::one(g[i]) * s;\n    const float v = Overwrite ? p : m[i] + p;",
                                      "const float p = From::one(g[i]) * s;\n    const float v = Overwrite ? p : "
                                      "std::fma(From::one(g[i]), s, m[i]);"),
    "bfloat16 shifted one bit short": ("widen(p) << 16); }", "widen(p) << 15); }"),
    "half's inf/NaN test off by one": ("bitcast<u4>(em >= 0x7c00u);", "bitcast<u4>(em > 0x7c00u);"),
    "tail's flag lost": ("tail_bad = tail_bad || (v - v) != 0.0f;", ""),
    "overwrite ignored in the tail": ("const float v = Overwrite ? p : m[i] + p;", "const float v = m[i] + p;"),
}


def build(name, change, folder: Path) -> Path:
    src = SOURCE.read_text()
    if change is not None:
        assert src.count(change[0]) == 1, f"mutant {name!r} no longer matches the source once"
        src = src.replace(change[0], change[1]).replace("#include <cstring>", "#include <cstring>\n#include <cmath>")
    folder.mkdir()
    (folder / "accumulate.cpp").write_text(src)
    import pybind11

    out = folder / f"_cpu{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [CXX, "-O1", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-pthread",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(folder / "accumulate.cpp"),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


RUN = textwrap.dedent("""
    import sys
    from gaccum import _ext
    sys.modules["gaccum._cpu"] = _ext.load_from(sys.argv[1], "gaccum._cpu")
    import pytest
    sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "tests/kernel/test_cpu_kernel.py"]))
""")


@pytest.mark.skipif(CXX is None or sys.platform == "win32", reason="needs a C++ compiler")
def test_each_planted_bug_fails_the_reference_tests(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = pool.map(lambda k_item: build(*k_item[1], tmp_path / str(k_item[0])), enumerate(MUTANTS.items()))
        built = dict(zip(MUTANTS, paths))
    outcome = {}
    for name, path in built.items():
        r = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, cwd=ROOT)
        outcome[name] = r.returncode
    assert outcome.pop("none") == 0, "the unchanged source must pass"
    assert all(code == 1 for code in outcome.values()), outcome  # 1: tests failed (not an error)
