# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both set themselves up: a virtual environment in .venv with the pinned dependencies
# and the native module built in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A machine without torch gets the CPU wheel; one that already has torch keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-data test test-unit test-dist clean

# The first install takes several minutes (torch is the bulk): each step says what it does.
$(VENV)/.installed: setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(PY) || { echo "==> creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -c "import torch" 2>/dev/null || { echo "==> installing $(TORCH_SPEC) (CPU build; a few minutes, the largest download)"; $(PIP) install -q "$(TORCH_SPEC)"; }
	@echo "==> installing the pinned dependencies: $$(sed -e 's/#.*//' -e 's/[<>=!~].*//' requirements.txt | xargs)"
	@$(PIP) install -q -r requirements.txt
	@echo "==> building the native module megatron_ext._native (C++, about a minute)"
	@$(PIP) install -q --no-build-isolation --no-deps -e .
	@echo "==> environment ready in $(VENV)"
	@touch $@

install: $(VENV)/.installed

# The main job: the whole pipeline on the shipped sample, on a CPU, in minutes.
demo: install
	bash run_maskllm_native.sh examples/quickstart.sh 0

# The data pipeline alone, in seconds.
demo-data: install
	bash examples/demo_data.sh

test-unit: install
	$(PY) -m pytest -q tests

test-dist: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=6 -m pytest -q -p no:cacheprovider tests/dist

test: test-unit test-dist

clean:
	rm -rf build *.egg-info megatron_ext/_native*.so output
