# Two commands on a fresh machine with nothing but Python:  make demo  |  make test
# The virtualenv is created on first use. Where no CUDA torch is installed we pin the CPU build
# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd_installed

.PHONY: demo test bench-cpu clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kd_teacher.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-cpu: $(STAMP)
	$(PY) benchmarks/teacher_mode.py --preset cpu

clean-venv:
	rm -rf $(VENV)
