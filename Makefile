# The two commands of the README: `make demo` and `make test`. Both create
# .venv, install gaccum into it (building the CUDA module when nvcc is found)
# and keep any torch the base Python already has.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip

.PHONY: setup demo test kernel-check bench gpu-proof gpu-proof-dry-run clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml setup.py
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "gaccum: using the torch of $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else $(PY) -m venv $(VENV); fi
	@$(VPY) -c "import torch" >/dev/null 2>&1 || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q setuptools wheel pybind11 ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@touch $@

demo: setup
	$(VENV)/bin/gaccum demo

test: setup kernel-check
	$(VPY) -m pytest -q tests

# The CUDA kernel's exact source built for the host (csrc/emu/) against a float64 reference: the whole
# matrix under ASan + UBSan in natural and permuted thread/block orders; an FMA-contracting UBSan build
# with the tensor that spans three launches and 65,540 tensors; ThreadSanitizer with blocks on two OS
# threads on a subset. tests/kernel/test_kernel_check.py shows each planted bug makes it fail.
kernel-check: setup
	$(VPY) -m gaccum._hostemu asan --orders 2
	$(VPY) -m gaccum._hostemu fma --big --many
	$(VPY) -m gaccum._hostemu tsan --subset --workers 2

bench: setup
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	$(VPY) benchmarks/bench_kernel.py
	$(VPY) benchmarks/bench_overhead.py
	$(VPY) benchmarks/bench_planner.py

# On a machine with a GPU, with that machine's own python and torch (PY=...; no venv, nothing installed):
# build in place, smoke, tests/cuda, compute-sanitizer, graph-replay timings, planner, end to end, in under
# 8 minutes; the summary JSON goes to $$OUT when set, else benchmarks/results/. The dry run (CI, and any PY
# that holds torch) checks the same wiring without a GPU.
gpu-proof:
	$(PY) benchmarks/gpu_proof.py

gpu-proof-dry-run:
	$(PY) benchmarks/gpu_proof.py --dry-run

clean:
	rm -rf $(VENV) build gaccum/_C*.so gaccum/_cpu*.so *.egg-info
