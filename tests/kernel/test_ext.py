"""The compiled module: built and imported in every CI run (nvcc, no GPU)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gaccum
from gaccum import _build, _ext, ops

ROOT = Path(__file__).resolve().parents[2]
HAS_NVCC = _build.find_cuda_home() is not None
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          cwd=ROOT)


@needs_nvcc
def test_prebuilt_module_is_installed_and_imports():
    # `make test` built it with pip; CI must never silently lose the module.
    mod = _ext.load_from(_ext._find_prebuilt())
    assert mod.CHUNK_SIZE == 65536 and mod.MAX_TENSORS_PER_LAUNCH > 110


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_calling_the_kernel_without_a_gpu_is_a_clear_error_not_a_crash():
    mod = _ext.load_from(_ext._find_prebuilt())
    assert mod.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mod.unscale_check_accumulate([1], [2], [4], [0], 3, 4, 0, False, False, 0)


def test_disable_env_forces_fallback_and_says_why():
    r = _run("""
        import gaccum._ext as e, gaccum.ops as o
        print(e.load() is None, e.reason(), o.backend_for('cuda'))
    """, GACCUM_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:1] == ["True"] and "GACCUM_DISABLE_EXT" in r.stdout and "pytorch-fallback" in r.stdout


def test_fallback_warns_once_when_the_module_cannot_be_had(tmp_path):
    # No prebuilt module visible and no nvcc on PATH: one clear warning, then silence.
    r = _run("""
        import warnings, gaccum._ext as e
        e._find_prebuilt = lambda: None
        e._build.find_cuda_home = lambda: None
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert e.load() is None and e.load() is None
        msgs = [str(x.message) for x in w if "gaccum" in str(x.message)]
        print(len(msgs)); print(msgs[0])
    """, GACCUM_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1" and "nvcc not found" in lines[1] and "fallback" in lines[1]


@needs_nvcc
def test_jit_build_into_cache_folder_and_reuse(tmp_path):
    r = _run("""
        import gaccum._ext as e
        e._find_prebuilt = lambda: None
        m = e.load()
        print(m is not None, m.__file__)
    """, GACCUM_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    ok, path = r.stdout.split()
    assert ok == "True" and path.startswith(str(tmp_path))
    stamp = Path(path).stat().st_mtime_ns
    r2 = _run("""
        import gaccum._ext as e
        e._find_prebuilt = lambda: None
        print(e.load().__file__)
    """, GACCUM_CACHE_DIR=str(tmp_path))
    assert r2.stdout.strip() == path and Path(path).stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None or _build.find_ninja() is None, reason="cmake/ninja missing")
def test_cmake_builds_the_same_module(tmp_path):
    env = {**os.environ, "PATH": f"{Path(_build.find_ninja()).parent}:{os.environ['PATH']}"}
    cfg = subprocess.run(["cmake", "-G", "Ninja", "-S", str(ROOT), "-B", str(tmp_path),
                          f"-DPython3_EXECUTABLE={sys.executable}"], capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(tmp_path)], capture_output=True, text=True, env=env)
    assert b.returncode == 0, b.stdout + b.stderr
    built = list(tmp_path.glob("_C*.so"))
    assert built
    mod = _ext.load_from(built[0])
    assert mod.CHUNK_SIZE == 65536


def test_cpu_tensors_never_reach_the_cuda_module_even_with_it_loaded():
    g, m, f = [torch.ones(3, dtype=torch.bfloat16)], [torch.zeros(3)], torch.zeros(1)
    gaccum.unscale_check_accumulate_(g, m, f, 0.5)
    assert m[0].tolist() == [0.5, 0.5, 0.5]
    assert ops.backend_for("cpu") in ("cpu-kernel", "pytorch-fallback")


def _setup_build_ext_without_nvcc(tmp_path, then: str, **env):
    """Run setup.py's build_ext into tmp_path in a fresh process as if nvcc were absent, then ``then``."""
    return _run(textwrap.dedent(f"""
        import sys, pathlib
        sys.argv = ['setup.py', 'build_ext', '--build-lib', {str(tmp_path)!r}, '--build-temp', {str(tmp_path / 't')!r}]
        src = pathlib.Path('setup.py').read_text().replace('helper.find_cuda_home() is None', 'True')
        exec(compile(src, 'setup.py', 'exec'), {{'__file__': 'setup.py', '__name__': '__main__'}})
        out = pathlib.Path({str(tmp_path)!r})
    """) + textwrap.dedent(then), GACCUM_REQUIRE_EXT="0", **env)


def test_setup_installs_without_nvcc(tmp_path):
    """setup.py's build step skips the CUDA module cleanly when nvcc is absent, and builds the CPU one."""
    r = _setup_build_ext_without_nvcc(tmp_path, """
        print('INSTALLED', list(out.rglob('_C*')))
        from gaccum import _ext  # the CPU module is built all the same, with the C++ compiler
        mod = _ext.load_from(next(out.rglob('_cpu*.so')), 'gaccum._cpu')
        print('CPU', mod.accumulate([], [], [], [], 1.0, False, 1))
    """)
    assert r.returncode == 0, r.stderr
    assert "INSTALLED []" in r.stdout and "nvcc not found" in r.stderr and "CPU (0.0, False)" in r.stdout


def test_setup_without_a_cpp_compiler_installs_without_the_cpu_module(tmp_path):
    """No working C++ compiler: gaccum._cpu is left out with one line saying so, and the CPU runs the chain."""
    r = _setup_build_ext_without_nvcc(tmp_path, """
        print('INSTALLED', sorted(p.name for p in out.rglob('*.so')))
    """, CC="false", CXX="false", LDSHARED="false")
    assert r.returncode == 0, r.stderr
    assert "INSTALLED []" in r.stdout and "CPU module not built" in r.stderr


def test_ranks_building_at_once_wait_for_one_build(tmp_path, monkeypatch):
    """Under torchrun every rank may JIT-build at once: one builds, the others wait on the lock and reuse it."""
    import fcntl
    import threading

    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path))
    target = _ext.cache_dir() / "ext" / _build.source_hash()
    target.parent.mkdir(parents=True)
    lock = open(target.parent / f"{target.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another rank is building
    got = []
    t = threading.Thread(target=lambda: got.append(_ext.jit_build()))
    t.start()
    t.join(timeout=2)
    assert t.is_alive() and not got  # waits instead of building into the same folder
    target.mkdir()
    (target / _build.module_filename()).write_bytes(b"built by the other rank")
    fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(timeout=30)
    assert got == [target / _build.module_filename()]  # found it built: no second build
