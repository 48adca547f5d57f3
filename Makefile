# Every target installs what it needs into .venv first.
# On a GPU cluster, pick the torch build that matches your CUDA, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
WORKDIR ?= work/demo

.PHONY: install test test-fast demo bench clean wheelhouse

install: $(STAMP)

$(STAMP): setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

test: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-fast: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

demo: install
	WORKDIR=$(WORKDIR) PATH=$(abspath $(BIN)):$$PATH bash launch/demo.sh

# The wheel folder for a GPU node without internet (docs/GPU.md); needs only python3 with pip.
# e.g. make wheelhouse WHEELHOUSE_ARGS="--python-version 3.12 --out work/gpu_wheels"
WHEELHOUSE_ARGS ?=
wheelhouse:
	bash bench/gpu_wheels.sh $(WHEELHOUSE_ARGS)

clean:
	rm -rf $(VENV) work build *.egg-info
