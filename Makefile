# dynconv developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
TRITON_CPU_VERSION ?= 3.9.0
STAMP := $(VENV)/.dynconv-installed

.PHONY: help venv test demo bench gpu-check clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The venv reuses an importable torch (e.g. a GPU machine's own build, via
# --system-site-packages); otherwise it installs the local CPU build of torch, never CUDA wheels.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the importable torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==$(TRITON_CPU_VERSION)" || echo "triton unavailable: its tests will be skipped"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)  ## create/reuse the virtual environment and install dynconv in it

test: $(STAMP)  ## run the test suite (CPU; Triton kernels through its interpreter)
	$(PY) -m pytest -q

demo: $(STAMP)  ## the main job: staged training in miniature (plain -> switched/CondConv vs. a plain control); HTML report in runs/demo
	$(PY) -m dynconv demo --out runs/demo

bench: $(STAMP)  ## switched-conv benchmark on this machine (see docs/performance.md)
	$(PY) -m dynconv.bench switched

gpu-check:  ## on a GPU machine (torch + triton installed): compiled-kernel tests + all benchmarks into runs/gpu
	bash scripts/gpu_check.sh

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) runs build src/*.egg-info
