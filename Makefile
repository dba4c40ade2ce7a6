# The two-command quickstart: `make demo` and `make test`. Both begin with `make setup`, which
# creates .venv/ at the repository root if missing and installs the pinned stack (idempotent:
# a stamp keyed on the pins makes a second run instant).
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PINS := requirements/constraints.txt
TORCH_PIN := $(shell grep -E '^torch==' $(PINS))
STAMP := $(VENV)/.installed-$(shell cat $(PINS) setup.py | sha1sum | cut -c1-12)
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1
# pip's notices on a fresh .venv are harmless: its bin/ is not on PATH by design (README: activate
# it or call .venv/bin/python), and pip upgrades itself first
PIP_QUIET := -q --no-warn-script-location --disable-pip-version-check

.PHONY: setup demo test bench bench-learning bench-order bench-puzzles bench-scale clean-demo

setup: $(STAMP)

$(STAMP): $(PINS) setup.py
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "need $(PYTHON_BOOT) (Python 3.11) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip setuptools wheel
	# torch first and alone: this takes the CPU wheel on the build machines (the Dockerfile swaps in CUDA)
	$(PY) -m pip install $(PIP_QUIET) "$(TORCH_PIN)"
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_QUIET) -c $(PINS) -e ".[test]"
	$(PY) -c "import torch, megatron.core, deepspeed, webdataset, wids, mlflow, submitit, transformers; print('stack OK: torch', torch.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(PY) tools/demo.py

# three workers on the 2-core box, one test file per worker at a time (module fixtures stay shared):
# part of the suite waits (Slurm scheduling, MLflow and Chromium start-up, torchrun rendezvous), and a
# third worker fills those waits: ~1,010 CPU-s in 589 s wall, 86% of both cores (2026-12-04, README
# Development; four workers: 595 s, no faster); PYTEST_WORKERS=0 runs serially
PYTEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest tests $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

bench: setup
	$(PY) bench/run_all.py

# not in CI: MDLM vs polynomial vs LoMDM learning curves on the demo corpus (<= 60 min on 2 cores)
bench-learning: setup
	$(PY) bench/learning.py

# not in CI: does the learned order learn the easy order of a synthetic task? (<= 15 min on 2 cores;
# `python bench/order_task.py --variants ...` runs the other variants)
bench-order: setup
	$(PY) bench/order_task.py

# not in CI: Sudoku solved by MDLM and LoMDM with vanilla, oracle, learned-order and remasking
# decoders at several T (bench/puzzles.py, docs/puzzles.md); 500 steps: measured 19.4 min wall / 17.7 CPU-min
# from a fresh clone on the shared 2-core box (load average 46 falling to 6), within the 30-min budget
bench-puzzles: setup
	$(PY) bench/puzzles.py

# not in CI: the 1.3B owt_1b model end to end on CPU (DeepSpeed ZeRO-3, optimizer state on NVMe under
# bench/_work: ~40 GB of disk while it runs; needs libaio-dev): train 2 steps, save, resume 2 steps,
# evaluate, HF export + logits check, peak RSS per rank vs tools/plan.py (bench/RESULTS.md).
# `$(PY) bench/scale_1b.py --small` runs the same path at 2 x 256 in minutes.
bench-scale: setup
	$(PY) bench/scale_1b.py

clean-demo:
	rm -rf runs/demo_cpu demo_data
