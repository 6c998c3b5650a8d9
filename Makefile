# Two commands on a fresh machine with nothing but Python:  make demo  |  make test
# The virtualenv is created on first use. Where no CUDA torch is installed we pin the CPU build
# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd_installed
DEMO_STAMP := $(VENV)/.kd_demo_installed

.PHONY: demo test test-gpu bench-cpu clean-venv

# The package with one extra: dev (tests) or demo (the demo's plot).
define install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e '.[$(1)]'
	@touch $(2)
endef

$(STAMP): pyproject.toml
	$(call install,dev,$(STAMP))

$(DEMO_STAMP): pyproject.toml
	$(call install,demo,$(DEMO_STAMP))

demo: $(DEMO_STAMP)
	$(PY) -m kd_teacher.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The GPU correctness checks (tests marked gpu, deselected elsewhere); on a machine with a CUDA GPU.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu

bench-cpu: $(STAMP)
	$(PY) benchmarks/teacher_mode.py --preset cpu

clean-venv:
	rm -rf $(VENV)
