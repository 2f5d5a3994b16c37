# tmgg: declarative Hydra sweeps of spectral graph denoising. `make help` lists targets.
PYTHON ?= python3
STAGE ?= stage1
LAUNCHER ?= local
GPU ?= T4
OVERRIDES ?=
BENCH_OUT ?= /tmp/tmgg-bench
TRAIN = $(PYTHON) -m tmgg.app
SWEEP = $(PYTHON) -m tmgg.orchestration.cli
ifeq ($(LAUNCHER),modal)
LAUNCH_ARGS = hydra/launcher=modal hydra.launcher.gpu=$(GPU)
else
LAUNCH_ARGS = hydra/launcher=$(LAUNCHER)
endif

.PHONY: help install test test-fast lint smoke plan status resume reconcile sync report stage1 stage2 bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install torch (CPU wheel), then tmgg and its dev tools, editable
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## run the whole test suite (unit tests, real sweeps on CPU)
	$(PYTHON) -m pytest -q

test-fast:  ## run the tests that train nothing for long (no slow marker)
	$(PYTHON) -m pytest -q -m "not slow"

lint:  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks

smoke:  ## the CPU smoke sweep: 3 models x 2 seeds, a few steps (W&B offline if no key)
	$(TRAIN) -m stage=smoke $(LAUNCH_ARGS) $(OVERRIDES)

plan:  ## dry run of STAGE: every job, run name, W&B destination, cost (STAGE=, OVERRIDES=)
	$(SWEEP) plan stage=$(STAGE) $(LAUNCH_ARGS) $(OVERRIDES)

status:  ## the ledger of STAGE as a table
	$(SWEEP) status stage=$(STAGE) $(OVERRIDES)

resume:  ## launch only the missing and failed jobs of STAGE
	$(SWEEP) resume stage=$(STAGE) $(LAUNCH_ARGS) $(OVERRIDES)

reconcile:  ## expected jobs of STAGE versus W&B and the outputs
	$(SWEEP) reconcile stage=$(STAGE) $(OVERRIDES)

sync:  ## upload STAGE's offline W&B runs to its pinned entity, project and host
	$(SWEEP) sync stage=$(STAGE) $(OVERRIDES)

report:  ## write experiments/STAGE/REPORT.md and plots
	$(SWEEP) report stage=$(STAGE) $(OVERRIDES)

stage1:  ## the 108-job stage 1 (LAUNCHER=local|modal|slurm, GPU= for modal)
	$(TRAIN) -m stage=stage1 $(LAUNCH_ARGS) $(OVERRIDES)

stage2:  ## the 216-job stage 2 (LAUNCHER=local|modal|slurm, GPU= for modal)
	$(TRAIN) -m stage=stage2 $(LAUNCH_ARGS) $(OVERRIDES)

bench:  ## training, sweep and planning benchmarks (ratios against baselines measured in the same run)
	mkdir -p $(BENCH_OUT)
	$(PYTHON) benchmarks/bench_training.py --json $(BENCH_OUT)/training.json
	$(PYTHON) benchmarks/bench_sweep.py --json $(BENCH_OUT)/sweep.json
	$(PYTHON) benchmarks/bench_planning.py --json $(BENCH_OUT)/planning.json
	$(PYTHON) benchmarks/bench_fused.py --json $(BENCH_OUT)/fused.json

clean:  ## remove outputs/ and caches (never experiments/)
	rm -rf outputs multirun .pytest_cache .ruff_cache
