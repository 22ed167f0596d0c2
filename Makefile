# `make demo` and `make test` create .venv (Python 3.11) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo aot clean

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

# The 14.7B ahead-of-time compile for every pod target (README "Running on a pod"):
# 20-31 min and up to ~24 GB of host memory (plus swap for v5e-256) per target on 2 cores.
# libtpu gives the TPU targets compile-only devices of their topology.
AOT_TARGETS := h100-64 v5p-128 v5e-256
aot: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-tpu.txt
	for t in $(AOT_TARGETS); do \
	  $(PY) -m tools.aot --config configs/ringmoe_14b.py:$$t --topology $$t || exit 1; done

clean:
	rm -rf demo_out .pytest_cache
