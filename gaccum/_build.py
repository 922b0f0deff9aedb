"""Build the torch-independent CUDA module ``gaccum._C`` with nvcc and ninja.

This file uses the standard library only: ``setup.py`` loads it by path (before
gaccum is importable) and ``gaccum._ext`` uses it for the JIT build, so both
compile with exactly the same flags. The module needs pybind11's headers, the
Python headers and ``cuda_runtime.h``; never torch (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT_CANDIDATES = (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc")
SOURCES = ("unscale_check_accumulate.cu", "binding.cpp")
HEADERS = ("multi_tensor_apply.cuh",)
# sm_80 (A100) and sm_90 (H100/H200) as machine code, plus compute_90 PTX so newer
# GPUs JIT-compile it.
GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)


class BuildError(RuntimeError):
    """The CUDA module could not be built; the message says which step failed."""


def csrc_dir() -> Path:
    for cand in ROOT_CANDIDATES:
        if (cand / SOURCES[0]).is_file():
            return cand
    raise BuildError(f"gaccum: CUDA sources not found in {', '.join(map(str, ROOT_CANDIDATES))}")


def find_cuda_home() -> Path | None:
    """CUDA_HOME / CUDA_PATH, else the folder above the ``nvcc`` on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return Path(os.environ[var])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).resolve().parent.parent, Path(nvcc).parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:  # a wrapper nvcc on PATH may live outside the toolkit
        if (cand / "bin" / "nvcc").exists() and (cand / "include" / "cuda_runtime.h").exists():
            return cand
    return None


def find_ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:  # the pip package `ninja` ships the binary
        import ninja  # type: ignore

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def _pybind11_include() -> str:
    try:
        import pybind11  # type: ignore
    except ImportError as exc:  # pragma: no cover - pybind11 is a build requirement
        raise BuildError("gaccum: pybind11 is needed to build the CUDA module (pip install pybind11)") from exc
    return pybind11.get_include()


def module_filename() -> str:
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def source_hash() -> str:
    """Hash of sources and flags: the JIT cache folder is keyed on it."""
    h = hashlib.sha256()
    src = csrc_dir()
    for name in SOURCES + HEADERS:
        h.update((src / name).read_bytes())
    h.update(" ".join(GENCODE).encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _ninja_file(build_dir: Path, out_path: Path, cuda_home: Path) -> str:
    src = csrc_dir()
    py_inc = sysconfig.get_paths()["include"]
    pb_inc = _pybind11_include()
    cuda_inc = cuda_home / "include"
    lib_dirs = [cuda_home / "lib64", cuda_home / "lib", cuda_home / "targets" / "x86_64-linux" / "lib"]
    cudart = next((d / "libcudart_static.a" for d in lib_dirs if (d / "libcudart_static.a").exists()), None)
    if cudart is None:
        raise BuildError(f"gaccum: libcudart_static.a not found under {cuda_home}")
    cxx = os.environ.get("CXX", "c++")
    return f"""ninja_required_version = 1.3
nvcc = {cuda_home / 'bin' / 'nvcc'}
cxx = {cxx}
nvflags = -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC {' '.join(GENCODE)} -I{src}
cxxflags = -O3 -std=c++17 -fPIC -fvisibility=hidden -I{py_inc} -I{pb_inc} -I{cuda_inc} -I{src}
ldflags = -shared {cudart} -lpthread -ldl -lrt

rule nvcc
  command = $nvcc $nvflags -c $in -o $out
  description = nvcc $in
rule cxx
  command = $cxx $cxxflags -c $in -o $out
  description = c++ $in
rule link
  command = $cxx $in $ldflags -o $out
  description = link $out

build {build_dir / 'kernel.o'}: nvcc {src / SOURCES[0]} | {src / HEADERS[0]}
build {build_dir / 'binding.o'}: cxx {src / SOURCES[1]}
build {out_path}: link {build_dir / 'kernel.o'} {build_dir / 'binding.o'}
default {out_path}
"""


def build(out_dir: Path, build_dir: Path | None = None, verbose: bool = False) -> Path:
    """Compile and link ``_C`` into ``out_dir``; return the module's path."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("gaccum: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    ninja = find_ninja()
    if ninja is None:
        raise BuildError("gaccum: ninja not found (pip install ninja)")
    out_dir = Path(out_dir)
    build_dir = Path(build_dir or out_dir / "build")
    out_dir.mkdir(parents=True, exist_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / module_filename()
    (build_dir / "build.ninja").write_text(_ninja_file(build_dir, out_path, cuda_home))
    proc = subprocess.run([ninja, "-C", str(build_dir)], capture_output=True, text=True)
    if verbose or proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise BuildError(f"gaccum: building the CUDA module failed (ninja exit {proc.returncode}); see output above")
    return out_path


if __name__ == "__main__":  # python gaccum/_build.py OUT_DIR
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build"), verbose=True))
