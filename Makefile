# zsq developer entry points. `make demo` and `make test` each do all set-up on a fresh machine
# (virtual environment + install) and then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
# torch/torchvision pinned to the builds this project is tested with (installable offline here).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo-efficientnet_lite0-w8a8
# Allocator / OpenMP settings that make PyTorch faster on small shared CPUs (see BENCHMARKS.md).
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test clean

$(VENV)/.zsq-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(VENV)/.zsq-installed

demo: $(VENV)/.zsq-installed
	@if [ -d "$(SHARED)/data/imagenet-sample-500" ]; then \
	  $(VENV)/bin/zsq quantize efficientnet_lite0 --wbits 8 --abits 8 --eval $(SHARED)/data/imagenet-sample-500 --out $(DEMO_OUT); \
	else \
	  echo "($(SHARED)/data/imagenet-sample-500 not found: quantizing without evaluation)"; \
	  $(VENV)/bin/zsq quantize efficientnet_lite0 --wbits 8 --abits 8 --out $(DEMO_OUT); \
	fi

test: $(VENV)/.zsq-installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
