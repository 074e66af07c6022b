# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# torch first and on its own: any other torch resolution pulls a multi-GB CUDA build.
$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(VENV)/bin/mm1 demo

# Two workers, whole files each: the suite is mostly process start-up, which overlaps well.
# The slowest tests are listed at the end, to keep CI's time in view.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) *.egg-info

# GPU check (docs/gpu.md). gpu-wheels: on a machine with pip and network, the wheels the bare
# CUDA image lacks, into .whl/ (git-ignored). gpu-check: on a GPU machine, with .whl/ carried;
# elsewhere it says so in one line and exits 2.
.PHONY: gpu-wheels gpu-check

gpu-wheels:
	@bash tools/gpu_wheels.sh

gpu-check:
	@bash tools/gpu_check.sh
