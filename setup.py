"""Build hook: compile gaccum._C with nvcc when it is available.

Without nvcc the package installs as pure Python (the PyTorch fallback runs).
With nvcc a failed build warns and installs without the module, unless
GACCUM_REQUIRE_EXT=1, which makes it an error (CI sets it).
"""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _load_build_helper():
    spec = importlib.util.spec_from_file_location("gaccum_build", HERE / "gaccum" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class NvccBuildExt(build_ext):
    def build_extension(self, ext):
        helper = _load_build_helper()
        required = os.environ.get("GACCUM_REQUIRE_EXT", "") == "1"
        if os.environ.get("GACCUM_DISABLE_EXT", "") == "1" or helper.find_cuda_home() is None:
            if required:
                raise RuntimeError("gaccum: GACCUM_REQUIRE_EXT=1 but nvcc was not found (or GACCUM_DISABLE_EXT=1)")
            print("gaccum: nvcc not found; installing without the CUDA module (PyTorch fallback)", file=sys.stderr)
            return
        target = Path(self.get_ext_fullpath(ext.name))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                built = helper.build(Path(tmp), verbose=True)
            except helper.BuildError as exc:
                if required:
                    raise
                print(f"gaccum: CUDA module not built ({exc}); the PyTorch fallback will run", file=sys.stderr)
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, target)
        if self.inplace:
            return
        # Keep a copy next to the sources too, so tests run from the tree find it.
        local = HERE / "gaccum" / target.name
        if local != target:
            shutil.copyfile(target, local)

    def get_outputs(self):
        return [p for p in super().get_outputs() if Path(p).exists()]


setup(ext_modules=[Extension("gaccum._C", sources=[])], cmdclass={"build_ext": NvccBuildExt})
