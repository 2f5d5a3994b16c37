"""Files under experiments/ are data (DESIGN.md contract 7).

``experiments/<stage>/`` is committed and shared: reading it must not run code
(results are JSON, never pickles), a pid in it must not get a foreign process
signalled, and names that become paths cannot leave experiments_dir or outputs_dir.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.ledger import FAILED, Ledger
from tmgg.jobs.process_identity import ProcessIdentity
from tmgg.jobs.sweep import record_dispatched, record_plan
from tmgg.launch.modal.calls import CancelRefused, cancel_call, local_calls_dir, write_call_record
from tmgg.launch.modal.settings import ModalSettings

CALL_ID = "local-fc-0123456789abcdef0123"


class _CreatesFile:
    """Unpickling this creates a file: what a crafted result would do to its reader."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.fixture
def detached_job(sweep_dirs: SweepDirs) -> Ledger:
    """One planned job of stage adhoc, dispatched as a detached local call (no process)."""
    sweep = compose_sweep(["model=linear_pe", "logger=csv", *sweep_dirs.overrides])
    (job,) = sweep.jobs
    record_plan([job], sweep.master_config, sweep.arguments)
    record_dispatched(job, "modal", call_id=CALL_ID)
    write_call_record(job, CALL_ID, ModalSettings(transport="local"), None)
    local_calls_dir(sweep.ledger.root).mkdir(parents=True)
    return sweep.ledger


def test_crafted_result_file_runs_nothing_when_status_reads_it(
        sweep_dirs: SweepDirs, detached_job: Ledger, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    out = local_calls_dir(detached_job.root) / f"{CALL_ID}.out"
    out.write_bytes(pickle.dumps(("ok", _CreatesFile(marker))))

    status = tmgg_sweep("status", "--json", "stage=adhoc", *sweep_dirs.overrides)
    assert status.returncode == 0, status.stderr[-2000:]
    assert not marker.exists()
    (row,) = json.loads(status.stdout)["jobs"]
    assert row["status"] == FAILED
    (state,) = detached_job.states().values()
    assert "is not a tmgg call result (JSON)" in state.error


def test_result_file_is_json_data_that_status_folds(sweep_dirs: SweepDirs,
                                                    detached_job: Ledger) -> None:
    out = local_calls_dir(detached_job.root) / f"{CALL_ID}.out"
    out.write_text(json.dumps({"format": "tmgg-call-result/1", "status": "COMPLETED",
                               "metrics": {"test/mse": 0.25}, "error": None,
                               "duration_s": 1.5, "output_dir": None}))
    status = tmgg_sweep("status", "--json", "stage=adhoc", *sweep_dirs.overrides)
    (row,) = json.loads(status.stdout)["jobs"]
    assert row["status"] == "FINISHED" and row["test_mse"] == 0.25


def _sleep() -> subprocess.Popen:
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    deadline = time.time() + 5
    while ProcessIdentity.of(process.pid) is None or \
            ProcessIdentity.of(process.pid).argv[:1] != ("sleep",):  # type: ignore[union-attr]
        assert time.time() < deadline
        time.sleep(0.01)
    return process


def test_cancel_never_signals_a_process_named_by_a_crafted_file(
        sweep_dirs: SweepDirs, detached_job: Ledger) -> None:
    bystander = _sleep()
    try:
        calls = local_calls_dir(detached_job.root)
        # The bystander's true identity, and an old-style bare pid: neither is the call.
        identity = ProcessIdentity.of(bystander.pid)
        assert identity is not None
        (calls / f"{CALL_ID}.proc.json").write_text(json.dumps(identity.to_json()))
        (calls / f"{CALL_ID}.pid").write_text(str(bystander.pid))
        with pytest.raises(CancelRefused, match="not signalled"):
            cancel_call(CALL_ID, detached_job.root)
        # Claiming the call's command line does not help: the live process is not it.
        forged = dataclasses.replace(identity, argv=(
            "python", "-m", "tmgg.launch.modal.transport", "local-call", str(calls), CALL_ID))
        (calls / f"{CALL_ID}.proc.json").write_text(json.dumps(forged.to_json()))
        with pytest.raises(CancelRefused, match="no longer the one that was started"):
            cancel_call(CALL_ID, detached_job.root)
        # Through the command: no process proves to be the call, so it counts as ended
        # without a result (FAILED, to be resumed), and nothing is signalled.
        cancel = tmgg_sweep("cancel", "stage=adhoc", *sweep_dirs.overrides)
        assert cancel.returncode == 0, cancel.stderr[-2000:]
        assert "0 call(s) cancelled" in cancel.stdout
        (state,) = detached_job.states().values()
        assert state.status == FAILED and "ended without a result" in state.error
        time.sleep(0.2)
        assert bystander.poll() is None  # still sleeping
        assert not [e for e in detached_job.events() if e["event"] == "cancelled"]
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("override, field", [
    ("stage.name=../../x", "stage.name"),
    ("stage.name=a/b", "stage.name"),
    ("stage.run_name=../escape", "stage.run_name"),
    (f"stage.run_name={'n' * 129}", "stage.run_name"),
    ("hydra.sweep.dir={elsewhere}", "hydra.sweep.dir"),
])
def test_names_that_would_leave_the_directories_are_refused(
        sweep_dirs: SweepDirs, override: str, field: str) -> None:
    # The ledger callback refuses for every launcher; basic starts no fork server first.
    launcher = "hydra/launcher=local" if override == "stage.name=../../x" else \
        "hydra/launcher=basic"
    # Outside the test's directories, and this test's own (not a path other runs share).
    elsewhere = sweep_dirs.root.parent / f"{sweep_dirs.root.name}-elsewhere"
    override = override.format(elsewhere=elsewhere)
    result = tmgg_train("-m", "model=linear_pe", "logger=csv", launcher, override,
                        *sweep_dirs.overrides, cwd=sweep_dirs.root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f": {field}: " in result.stderr and "sweep refused, nothing dispatched" in result.stderr
    # Nothing was written anywhere: not in the test's directories, not beside them.
    assert sorted(p.name for p in sweep_dirs.root.iterdir()) == []
    assert not elsewhere.exists()
    for base in (sweep_dirs.experiments, sweep_dirs.outputs):
        assert not (base / "../../x").resolve().exists()


def test_a_single_run_with_an_escaping_name_is_refused_before_its_directory_exists(
        sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("model=linear_pe", "logger=csv", "stage.name=../../x",
                        *sweep_dirs.overrides, cwd=sweep_dirs.root)
    assert result.returncode == 2
    assert "run refused, nothing ran" in result.stderr and ": stage.name: " in result.stderr
    assert sorted(p.name for p in sweep_dirs.root.iterdir()) == []


def test_ledger_directory_through_a_symlink_outside_is_refused(sweep_dirs: SweepDirs,
                                                               tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sweep_dirs.experiments.mkdir()
    (sweep_dirs.experiments / "adhoc").symlink_to(outside)
    with pytest.raises(Exception, match=r"stage\.name: its ledger directory .* is not inside"):
        compose_sweep(["model=linear_pe", *sweep_dirs.overrides])
