"""Shared fixtures: every test keeps its ledgers and outputs in its own tmp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The fake W&B server (tests/wandb_server/) and its fixtures, for online tests.
pytest_plugins = ["wandb_server.fixtures"]


# -- the order of the run: the longest files first ---------------------------------------
# `make test` hands whole files to its workers (pytest-xdist --dist loadfile: a module's
# shared sweep is made once) in the order collected. Files that take minutes start first,
# so the run ends on short files instead of one worker finishing a long one alone.
# Tiers from earlier runs' slowest tests and the number of sweeps each file starts;
# re-rank them from `pytest --durations=0` summed per file. Within a tier, and among all
# other files, pytest-randomly's seeded order stands. A stale entry costs time, never a
# test.
LONG_FILES_FIRST: tuple[frozenset[str], ...] = (
    frozenset({"test_modal_launcher.py", "test_wandb_online.py", "test_first_hour.py",
               "test_fused_launchers.py", "test_exactly_once.py", "test_local_launcher.py",
               "test_composer.py", "test_sync.py", "test_optuna_sweeper.py"}),
    frozenset({"test_fencing.py", "test_reconcile.py", "test_compare.py", "test_submitit.py",
               "test_strict_files.py", "test_fused.py", "test_config_schema.py",
               "test_planted_bugs.py", "test_fused_faults.py", "test_report.py",
               "test_files_are_data.py", "test_training_job.py", "test_lock.py",
               "test_fenced_outcomes.py", "test_verify.py", "test_fsck.py"}),
)


def file_tier(item: pytest.Item) -> int:
    """0 for the longest files, then 1, ...; every other file after them."""
    name = item.path.name
    return next((tier for tier, files in enumerate(LONG_FILES_FIRST) if name in files),
                len(LONG_FILES_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first; a stable sort keeps pytest-randomly's shuffle (it reorders
    in a hook wrapper, before this one) within each tier and each file."""
    items.sort(key=file_tier)


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach W&B or Modal servers."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # An in-process wandb run (an earlier test) leaves WANDB_SERVICE set: the jobs a test
    # starts must not share that wandb-core service (a killed job's run id stays in use).
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "WANDB_API_KEY", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _hydra_global_state_kept() -> Any:
    """Composing in a test's process sets Hydra's global version base (1.3: no chdir) and
    may leave GlobalHydra initialised; put both back after each module, so the in-process
    launcher conformance suites later in the run get Hydra as a fresh process has it."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase

    before = VersionBase.instance().getbase()
    yield
    VersionBase.instance().version_base = before
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


class SweepDirs:
    """experiments/ and outputs/ of one test, as Hydra overrides."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.experiments = root / "experiments"
        self.outputs = root / "outputs"

    @property
    def overrides(self) -> list[str]:
        return [f"experiments_dir={self.experiments}", f"outputs_dir={self.outputs}"]

    def job_records(self, stage: str) -> dict[str, dict[str, Any]]:
        records = {}
        for path in sorted((self.experiments / stage / "jobs").glob("*.json")):
            record = json.loads(path.read_text())
            records[record["job_id"]] = record
        return records


@pytest.fixture
def sweep_dirs(tmp_path: Path) -> SweepDirs:
    return SweepDirs(tmp_path)


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ...`` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, text=True,
                          capture_output=True, timeout=timeout, env=full_env)


def tmgg_train(*overrides: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(["-m", "tmgg.cli.app", *overrides], **kwargs)


def tmgg_sweep(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(["-m", "tmgg.cli.tmgg_sweep", *args], **kwargs)


# -- committed records are written by real sweeps only ---------------------------------
def _experiments_changes() -> set[str] | None:
    """``git status`` lines under experiments/ (None outside a git checkout)."""
    listed = subprocess.run(["git", "status", "--porcelain", "--", "experiments"], cwd=REPO,
                            capture_output=True, text=True)
    return set(listed.stdout.splitlines()) if listed.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a plain run)
        session.config._tmgg_experiments_before = _experiments_changes()  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that writes into the committed experiments/ fails the run, naming the files
    (a skip check once appended 108 events to experiments/stage1/ledger.jsonl)."""
    before = getattr(session.config, "_tmgg_experiments_before", None)
    if before is None:
        return
    new = sorted((_experiments_changes() or set()) - before)
    if new:
        print("\nthe tests changed committed records under experiments/:\n  "
              + "\n  ".join(new), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
