"""Build csrc/'s CUDA kernel for the host, through the emulation in csrc/emu/, so CI can run it.

Two products, one build rule:

* ``kernel_check`` executables (``make kernel-check``): the kernel's exact source and its real host
  launcher against a float64 reference (csrc/emu/kernel_check.cpp), under ASan + UBSan, ThreadSanitizer
  (blocks on two OS threads) or an FMA-contracting build;
* ``_C`` built against the emulation (:func:`build_module`): the same pybind11 binding the GPU build has,
  loadable by ``gaccum.ops`` as a host backend, so the Python between the op and the launch (splitting
  tensors, pointer tables, the launch call) runs in CI on CPU tensors.

The only change made to the source is mechanical: each ``kernel<<<grid, block, smem, stream>>>(args)``
becomes ``::gaccum_emu::Launch(grid, block, smem, stream)(kernel, args)``, with ``#line`` kept so that
sanitizer reports name the .cu line. Standard library only, like _build.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from . import _build

KERNEL = "unscale_check_accumulate.cu"
EMU_FILES = ("gaccum_emu.h", "gaccum_emu.cpp", "kernel_check.cpp", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")
FLAVOURS = {
    # name: compile flags (each also gets -std=c++20 -pthread and the include paths)
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=undefined"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
    # -mfma with GCC's default -ffp-contract=fast: any `m + g * s` left in the kernel becomes an FMA here
    "fma": ["-O2", "-mfma", "-ffp-contract=fast", "-fsanitize=undefined", "-fno-sanitize-recover=undefined"],
    "module": ["-O2", "-fPIC"],
}
_LAUNCH = re.compile(r"\b([A-Za-z_]\w*)\s*<<<(.*?)>>>\s*\(", re.S)


class EmuError(RuntimeError):
    """The host build failed; the message carries the compiler's output."""


def rewrite_launches(source: str, filename: str) -> str:
    """The .cu text with every triple-chevron launch turned into a call of the emulator's executor."""

    def one(m: re.Match) -> str:
        kernel, config = m.group(1), " ".join(m.group(2).split())
        rest = source[m.end():].lstrip()
        sep = "" if rest.startswith(")") else ", "
        return f"::gaccum_emu::Launch({config})({kernel}{sep}" + "\n" * m.group(0).count("\n")

    body, n = _LAUNCH.subn(one, source)
    if n == 0:
        raise EmuError(f"gaccum: no <<<...>>> launch found in {filename}; nothing to emulate")
    return f'#line 1 "{filename}"\n{_const_params_by_reference(body)}'


_KERNEL_SIG = re.compile(r"(__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?[A-Za-z_]\w*\s*)\(([^)]*)\)")
_CONST_STRUCT = re.compile(r"^(\s*const\s+(?!(?:float|double|int|unsigned|bool|char|short|long|u?int\d+_t)\b)"
                           r"[A-Za-z_][\w:]*)(\s+[A-Za-z_]\w*\s*)$")


def _const_params_by_reference(source: str) -> str:
    """A kernel's `const Struct name` parameters become `const Struct& name`.

    A GPU reads such a parameter from its constant bank; a host call by value would copy it for every
    emulated thread (the 26 KB tensor table x 512 threads a block). The launch keeps one copy for the
    whole grid, so by reference is the same semantics: the parameter is const and nothing else writes it.
    """

    def sig(m: re.Match) -> str:
        params = [_CONST_STRUCT.sub(r"\1&\2", p) for p in m.group(2).split(",")]
        return f"{m.group(1)}({','.join(params)})"

    return _KERNEL_SIG.sub(sig, source)


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise EmuError("gaccum: a C++20 compiler (g++) is needed for the host emulation")
    return cxx


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise EmuError(f"gaccum: host emulation build failed:\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _flags(flavour: str, csrc: Path) -> list[str]:
    return ["-std=c++20", "-pthread", f"-I{csrc / 'emu'}", f"-I{csrc}", *FLAVOURS[flavour]]


def _object(src: Path, flavour: str, csrc: Path, out_dir: Path, text: str | None = None) -> Path:
    """Compile one source (or `text` standing for it) into out_dir, reusing an object of the same hash."""
    content = text if text is not None else src.read_text()
    deps = "".join((csrc / "emu" / f).read_text() for f in EMU_FILES if f.endswith(".h"))
    deps += (csrc / "multi_tensor_apply.cuh").read_text()
    key = hashlib.sha256("\0".join([content, deps, flavour, compiler(), *_flags(flavour, csrc)]).encode()).hexdigest()
    obj = out_dir / f"{src.stem}-{flavour}-{key[:16]}.o"
    if not obj.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        if text is not None:
            unit = out_dir / f"{src.stem}-{key[:16]}.cpp"
            unit.write_text(text)
            src = unit
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        _run([compiler(), *_flags(flavour, csrc), "-c", str(src), "-o", str(tmp)])
        os.replace(tmp, obj)
    return obj


def kernel_object(flavour: str, out_dir: Path, csrc: Path | None = None, kernel_text: str | None = None) -> Path:
    """The kernel source (or a given variant of it: the planted-bug test) compiled for the host."""
    csrc = csrc or _build.csrc_dir()
    path = csrc / KERNEL
    text = rewrite_launches(kernel_text if kernel_text is not None else path.read_text(), str(path))
    return _object(path, flavour, csrc, out_dir, text)


def build_check(flavour: str = "asan", out_dir: Path | None = None, kernel_text: str | None = None) -> Path:
    """The kernel_check executable for one flavour ('asan', 'tsan', 'fma')."""
    csrc = _build.csrc_dir()
    out_dir = out_dir or default_dir()
    objs = [kernel_object(flavour, out_dir, csrc, kernel_text),
            _object(csrc / "emu" / "gaccum_emu.cpp", flavour, csrc, out_dir),
            _object(csrc / "emu" / "kernel_check.cpp", flavour, csrc, out_dir)]
    exe = out_dir / f"kernel_check-{flavour}-{hashlib.sha256(''.join(map(str, objs)).encode()).hexdigest()[:12]}"
    if not exe.exists():
        _run([compiler(), *_flags(flavour, csrc), *map(str, objs), "-o", str(exe)])
    return exe


def build_module(out_dir: Path | None = None) -> Path:
    """The pybind11 module ``_C`` of csrc/binding.cpp over the emulated kernel (a host backend for ops)."""
    csrc = _build.csrc_dir()
    out_dir = out_dir or default_dir()
    py = ["-I" + sysconfig.get_paths()["include"], "-I" + _build._pybind11_include(), "-fvisibility=hidden"]
    objs = [kernel_object("module", out_dir, csrc), _object(csrc / "emu" / "gaccum_emu.cpp", "module", csrc, out_dir)]
    binding = csrc / "binding.cpp"
    key = hashlib.sha256((binding.read_text() + "".join(map(str, objs))).encode()).hexdigest()[:16]
    so = out_dir / f"emu-{key}" / _build.module_filename()
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        _run([compiler(), *_flags("module", csrc), *py, "-shared", str(binding), *map(str, objs), "-o", str(tmp)])
        os.replace(tmp, so)
    return so


def load_module(out_dir: Path | None = None) -> ModuleType:
    """The emulated ``_C``, built if needed and imported under its own name.

    Its init function is the real module's (``PyInit__C``), so only the last part of the name must be
    ``_C``; a name of its own keeps it from being taken for an already imported ``gaccum._C``.
    """
    from ._ext import load_from

    return load_from(build_module(out_dir), "gaccum_hostemu._C")


def default_dir() -> Path:
    from ._ext import cache_dir

    return cache_dir() / "hostemu"


SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}


def run_check(exe: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SANITIZER_ENV})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaccum._hostemu", description=__doc__.split("\n\n")[0])
    ap.add_argument("flavour", choices=["asan", "tsan", "fma"], nargs="?", default="asan")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed to kernel_check (--quick, --big, --many, "
                                                           "--workers N, --orders K)")
    ns = ap.parse_args(argv)
    try:
        exe = build_check(ns.flavour)
    except EmuError as exc:
        print(exc, file=sys.stderr)
        return 2
    proc = run_check(exe, *ns.args)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
