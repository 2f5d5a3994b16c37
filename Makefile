# tmgg: declarative Hydra sweeps of spectral graph denoising. `make help` lists targets.
# Every target runs in the project's own environment, .venv, made by `make install`.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON = $(VENV)/bin/python
# --compile-bytecode: .pyc files written once at install. Without them every process
# compiles torch's and lightning's sources again where PYTHONDONTWRITEBYTECODE is set
# (about 5 s of CPU per process that imports lightning; the tests start hundreds).
UV_INSTALL = $(VENV)/bin/uv pip install --python $(PYTHON) --compile-bytecode
# The lock (`make lock` writes it from pyproject.toml; tools/envlock.py says how).
LOCK_DIR = src/tmgg/lock
EDITABLE_STAMP = $(VENV)/.tmgg-editable
# torch's wheel: from the folders pip is configured with (find-links), where there are
# any (a CPU build on a machine that keeps one on disk), else from the index (on Linux
# x86_64 a CUDA build). `make install TORCH_FIND_LINKS=` ignores pip's folders.
TORCH_FIND_LINKS ?= $(shell $(BOOTSTRAP_PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tr ' ' '\n' | sort -u)
PYTEST_ARGS ?=
# The suite runs in parallel (pytest-xdist; most of a test's time is a subprocess starting
# torch and Lightning) and in random order (pytest-randomly). The order's seed is printed
# first: `make test TEST_SEED=N` repeats an order, `TEST_ORDER=-p no:randomly` keeps file order.
# Workers take whole files (--dist loadfile: a module's shared sweep is made once), the
# longest files first (tests/conftest.py, LONG_FILES_FIRST), so no long file ends the run.
TEST_WORKERS ?= auto
ifndef TEST_SEED
TEST_SEED := $(shell od -An -N2 -tu2 /dev/urandom | tr -d ' ')
endif
TEST_ORDER ?= -p randomly --randomly-seed=$(TEST_SEED)
# The 15 slowest tests are printed at the end: the first place to look when the suite slows.
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile --durations=15 $(TEST_ORDER)
# Recipes (and the tests' subprocesses) find .venv's tools first, as if it were active.
export PATH := $(abspath $(VENV))/bin:$(PATH)
STAGE ?= stage1
LAUNCHER ?= local
GPU ?= T4
OVERRIDES ?=
BENCH_OUT ?= /tmp/tmgg-bench
TRAIN = $(PYTHON) -m tmgg.cli.app
SWEEP = $(PYTHON) -m tmgg.cli.tmgg_sweep
ifeq ($(LAUNCHER),modal)
LAUNCH_ARGS = hydra/launcher=modal hydra.launcher.gpu=$(GPU)
else
LAUNCH_ARGS = hydra/launcher=$(LAUNCHER)
endif

.PHONY: help install lock lock-check test test-fast lint docs mutate mutate-score layers fsck smoke plan status resume reconcile sync report stage1 stage2 bench bench-install clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The environment, made from the lock. Every target that runs tmgg depends on $(READY),
# so `make smoke` or `make test` on a fresh clone builds .venv first, and a change to
# the lock or pyproject.toml brings it up to date at the next target; when nothing
# changed, the stamp keeps it a no-op.
READY = $(VENV)/.tmgg-ready
LOCK_FILES = $(LOCK_DIR)/uv.txt $(LOCK_DIR)/requirements.lock $(LOCK_DIR)/torch.txt
define install_venv
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --require-hashes --no-deps -r $(LOCK_DIR)/uv.txt
	$(UV_INSTALL) --quiet --require-hashes --no-deps -r $(LOCK_DIR)/requirements.lock
	$(UV_INSTALL) --quiet $(addprefix --find-links ,$(TORCH_FIND_LINKS)) -r $(LOCK_DIR)/torch.txt
	$(MAKE) --no-print-directory $(EDITABLE_STAMP)
	$(VENV)/bin/uv pip check --quiet --python $(PYTHON)
	touch $(READY)
endef

install:  ## make .venv: the locked versions of src/tmgg/lock/, torch, tmgg editable
	$(install_venv)

$(READY): pyproject.toml $(LOCK_FILES)
	$(install_venv)

# tmgg itself, editable: rebuilt only when pyproject.toml changes (uv would rebuild a
# named source tree on every call, and `make install` twice must change nothing).
$(EDITABLE_STAMP): pyproject.toml
	$(UV_INSTALL) --quiet --no-deps --no-build-isolation -e .
	touch $@

lock: $(READY)  ## re-resolve src/tmgg/lock/ from pyproject.toml (uv; needs the package index)
	$(PYTHON) tools/envlock.py lock

lock-check: $(READY)  ## fail unless src/tmgg/lock/ was written from this pyproject.toml
	$(PYTHON) tools/envlock.py check

test: $(READY)  ## run the whole test suite (unit tests, real sweeps on CPU), in parallel
	@echo "test order: $(TEST_ORDER)"
	$(PYTHON) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: $(READY)  ## run the tests that train nothing for long (no slow marker)
	@echo "test order: $(TEST_ORDER)"
	$(PYTHON) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" $(PYTEST_ARGS)

docs: $(READY)  ## the documentation site from docs/ into site/ (mkdocs build --strict: a dead link fails)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml lists them and
# the fast tests that score them); slow, so never part of `make test`. MUTANTS= limits
# the run to mutant-name globs, e.g. MUTANTS='tmgg.jobs.ledger*'.
MUTANTS ?=
mutate: $(READY)  ## mutation score of the core (mutmut; MUTANTS='tmgg.jobs.ledger*' for one module)
	nice -n 10 $(VENV)/bin/mutmut run --max-children 1 $(MUTANTS)
	$(PYTHON) tools/mutation_score.py

mutate-score: $(READY)  ## per-module and total mutation score from mutants/ and docs/mutation-survivors.md
	$(PYTHON) tools/mutation_score.py

lint: $(READY)  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks tools

layers: $(READY)  ## the import-layer contract (import-linter)
	$(VENV)/bin/lint-imports

fsck: $(READY)  ## check every committed stage's ledger, records, claims and plan (issue 24)
	$(SWEEP) fsck --all

smoke: $(READY)  ## the CPU smoke sweep: 3 models x 2 seeds, a few steps (W&B offline if no key)
	$(TRAIN) -m stage=smoke $(LAUNCH_ARGS) $(OVERRIDES)

plan: $(READY)  ## dry run of STAGE: every job, run name, W&B destination, cost (STAGE=, OVERRIDES=)
	$(SWEEP) plan stage=$(STAGE) $(LAUNCH_ARGS) $(OVERRIDES)

status: $(READY)  ## the ledger of STAGE as a table
	$(SWEEP) status stage=$(STAGE) $(OVERRIDES)

resume: $(READY)  ## launch only the missing and failed jobs of STAGE
	$(SWEEP) resume stage=$(STAGE) $(LAUNCH_ARGS) $(OVERRIDES)

reconcile: $(READY)  ## expected jobs of STAGE versus W&B and the outputs
	$(SWEEP) reconcile stage=$(STAGE) $(OVERRIDES)

sync: $(READY)  ## upload STAGE's offline W&B runs to its pinned entity, project and host
	$(SWEEP) sync stage=$(STAGE) $(OVERRIDES)

report: $(READY)  ## write experiments/STAGE/REPORT.md and plots
	$(SWEEP) report stage=$(STAGE) $(OVERRIDES)

stage1: $(READY)  ## the 108-job stage 1 (LAUNCHER=local|modal|slurm, GPU= for modal)
	$(TRAIN) -m stage=stage1 $(LAUNCH_ARGS) $(OVERRIDES)

stage2: $(READY)  ## the 216-job stage 2 (LAUNCHER=local|modal|slurm, GPU= for modal)
	$(TRAIN) -m stage=stage2 $(LAUNCH_ARGS) $(OVERRIDES)

bench: $(READY)  ## training, sweep and planning benchmarks (ratios against baselines measured in the same run)
	mkdir -p $(BENCH_OUT)
	$(PYTHON) benchmarks/bench_training.py --json $(BENCH_OUT)/training.json
	$(PYTHON) benchmarks/bench_sweep.py --json $(BENCH_OUT)/sweep.json
	$(PYTHON) benchmarks/bench_planning.py --json $(BENCH_OUT)/planning.json
	$(PYTHON) benchmarks/bench_fused.py --json $(BENCH_OUT)/fused.json
	$(PYTHON) benchmarks/bench_search_fused.py --pruner median --json $(BENCH_OUT)/search_fused.json

bench-install: $(READY)  ## make install (uv, lock) against the old pip path, fresh clones, same run
	mkdir -p $(BENCH_OUT)
	$(PYTHON) benchmarks/bench_install.py --warmup --json $(BENCH_OUT)/install.json

clean:  ## remove outputs/ and caches (never experiments/)
	rm -rf outputs multirun site .pytest_cache .ruff_cache
