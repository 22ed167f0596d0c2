# `make demo` and `make test` create .venv (Python 3.11) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo parity aot clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# Two pytest workers: XLA compiles (most of the suite's time) run mostly on one core.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 tests

demo: $(STAMP)
	$(PY) -m tools.demo

# Parity with timm's SwinV2 in PyTorch, both ways (tools.parity), and of the Llama-layout language
# model with Hugging Face transformers (tools.parity_lm). PyTorch lives in its own environment,
# never in requirements.txt; `make test` stays free of it.
PARITY_VENV := .venv-torch
PARITY_STAMP := $(PARITY_VENV)/.installed

$(PARITY_STAMP): requirements-parity.txt
	test -x $(PARITY_VENV)/bin/python || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-parity.txt
	touch $(PARITY_STAMP)

parity: $(STAMP) $(PARITY_STAMP)
	$(PY) -m tools.parity --torch-python $(PARITY_VENV)/bin/python --workdir parity_out
	$(PY) -m tools.parity_lm --torch-python $(PARITY_VENV)/bin/python --workdir parity_out/lm

# The 14.7B ahead-of-time compile for every pod target (README "Running on a pod"):
# 20-31 min and up to ~24 GB of host memory (plus swap for v5e-256) per target on 2 cores.
# libtpu gives the TPU targets compile-only devices of their topology.
AOT_TARGETS := h100-64 v5p-128 v5e-256
aot: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-tpu.txt
	for t in $(AOT_TARGETS); do \
	  $(PY) -m tools.aot --config configs/ringmoe_14b.py:$$t --topology $$t || exit 1; done

clean:
	rm -rf demo_out parity_out .pytest_cache
