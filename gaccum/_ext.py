"""Find the compiled CUDA module, or build it on first use, or say once why not.

Order: ``GACCUM_DISABLE_EXT=1`` forces the fallback; a module installed next to
this file (built by ``pip install .``) is used; otherwise, when ``nvcc`` and
ninja are present, the module is JIT-built into a cache folder keyed by a hash
of the sources (so an edit rebuilds, and a second process reuses it); otherwise
the PyTorch fallback runs and one warning says so.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.machinery
import importlib.util
import os
import threading
from pathlib import Path
from types import ModuleType

from . import _build
from ._checks import warn_user

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "module": None, "reason": None}


def disabled() -> bool:
    return os.environ.get("GACCUM_DISABLE_EXT", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    base = os.environ.get("GACCUM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gaccum"
    )
    return Path(base)


def load_from(path: Path, name: str = "gaccum._C") -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _find_prebuilt() -> Path | None:
    here = Path(__file__).resolve().parent
    cand = here / _build.module_filename()
    return cand if cand.exists() else None


def jit_build(verbose: bool = False) -> Path:
    """Build the module into the cache folder (a no-op when it is already there).

    Under torchrun every rank may get here at once: an exclusive file lock beside the folder makes one
    build and the others wait, then find it built.
    """
    target = cache_dir() / "ext" / _build.source_hash()
    out = target / _build.module_filename()
    if out.exists():
        return out
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.exists():
                _build.build(target, verbose=verbose)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def usable_on_device(module: ModuleType) -> bool:
    """Whether the compiled module can launch here: it counts the devices its own CUDA runtime sees (a
    driver or architecture it cannot use shows as 0). Asked once per module."""
    key = id(module)
    if key not in _usable:
        count = getattr(module, "device_count", None)
        _usable[key] = count is None or count() > 0
        if not _usable[key]:
            warn_user("gaccum: the compiled CUDA module sees no device it can use (a driver or GPU architecture it "
                      "was not built for); using the PyTorch fallback", RuntimeWarning)
    return _usable[key]


_usable: dict[int, bool] = {}


def load(jit: bool = True, quiet: bool = False) -> ModuleType | None:
    """The compiled module, or None (with the reason in :func:`reason`)."""
    with _lock:
        if _state["tried"]:
            return _state["module"]  # type: ignore[return-value]
        _state["tried"] = True
        module, reason = None, None
        if disabled():
            reason = "GACCUM_DISABLE_EXT is set"
        else:
            path = _find_prebuilt()
            try:
                if path is None and jit:
                    path = jit_build()
                if path is None:
                    reason = "no prebuilt module and JIT build not requested"
                else:
                    module = load_from(path)
            except (_build.BuildError, ImportError, OSError) as exc:
                reason = str(exc)
        _state["module"], _state["reason"] = module, reason
        if module is None and not quiet and not disabled():
            warn_user(
                f"gaccum: the fused CUDA kernel is unavailable ({reason}); using the PyTorch "
                "fallback (correct, but several passes over memory)",
                RuntimeWarning,
            )
        return module


_cpu_state: dict[str, object] = {"tried": False, "module": None}


def load_cpu() -> ModuleType | None:
    """The fused CPU pass (``gaccum._cpu``, built at install by the C++ compiler), or None: not built
    (no compiler then; the PyTorch fallback runs, ``ops.backend_for("cpu")`` says so) or
    ``GACCUM_DISABLE_EXT`` set -- read on every call, so one variable switches every compiled path off."""
    if disabled():
        return None
    with _lock:
        if not _cpu_state["tried"]:
            try:
                module: ModuleType | None = importlib.import_module("gaccum._cpu")
            except ImportError:
                module = None
            _cpu_state.update(tried=True, module=module)
        return _cpu_state["module"]  # type: ignore[return-value]


def reason() -> str | None:
    """Why :func:`load` returned None, if it did."""
    return _state["reason"]  # type: ignore[return-value]


def reset() -> None:
    """Forget the cached load result (tests use it to exercise every path)."""
    with _lock:
        _state.update(tried=False, module=None, reason=None)
