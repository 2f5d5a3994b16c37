"""Outcomes through the fenced job API (issue 20): a fused member's outcome is in the
ledger the moment its own test ends, and a launcher whose claim of a job was taken
over by a newer generation records no outcome for it, under Modal's local transport
and under submitit as under the local launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claim_helpers import events_of, plan_jobs, take_over
from conftest import REPO, SweepDirs

from tmgg.jobs import claims
from tmgg.jobs.ledger import FAILED, FINISHED, RUNNING, Ledger

SHORT = ["stage=smoke", "seed=1", "model=linear_pe", "trainer.max_steps=6",
         "trainer.val_check_interval=2", "data.val_samples=20", "data.test_samples=20",
         "logger=csv", "trainer.num_threads=1"]
MODAL_LOCAL = ["hydra/launcher=modal", "hydra.launcher.transport=local",
               "hydra.launcher.local_containers=1"]


def _start(args: list[str], log_path: Path, hold_at: int, release: Path) -> subprocess.Popen:
    """A ``tmgg-train -m`` sweep whose jobs hold at step ``hold_at`` until ``release``
    exists (``tmgg.task.hold``), in its own process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMGG_TEST_HOLD_AT_STEP": str(hold_at),
           "TMGG_TEST_HOLD_FILE": str(release)}
    for name in list(env):
        if name.startswith("MODAL_TOKEN"):
            del env[name]
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait(condition: Callable[[], Any], sweep: subprocess.Popen, log_path: Path) -> Any:
    """Until ``condition()`` is true; fails if the sweep ends first (a bound of 10
    minutes for a broken run, not a race)."""
    deadline = time.monotonic() + 600
    while not (value := condition()):
        assert sweep.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    return value


def _held(release: Path) -> list[Path]:
    return sorted(release.parent.glob(f"{release.name}.held.*"))


def _stop(sweep: subprocess.Popen) -> None:
    if sweep.poll() is None:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()


@pytest.mark.slow
def test_a_fused_members_outcome_is_recorded_when_its_own_test_ends(tmp_path: Path) -> None:
    """Two members of one group that resume from different steps train as two
    sub-groups, one after the other: while the second is held at a step, the first
    has ended, and its FINISHED outcome is in the ledger already (not when the group
    returns). Each job gets exactly one outcome event of that sweep."""
    dirs = SweepDirs(tmp_path)
    args = [*SHORT, "optimizer.lr=1e-3,5e-3", "hydra.launcher.n_workers=1",
            "hydra.launcher.worker_crash_retries=0", *dirs.overrides]
    ledger = Ledger(dirs.experiments, "smoke")
    # 1. The group is killed at step 4: both members keep their step-4 checkpoints.
    first_release, first_log = tmp_path / "release1", tmp_path / "sweep1.log"
    sweep = _start(args, first_log, 4, first_release)
    try:
        (held,) = _wait(lambda: _held(first_release), sweep, first_log)
        os.kill(int(held.read_text()), signal.SIGKILL)
        assert sweep.wait(timeout=300) != 0
    finally:
        _stop(sweep)
    records = {float(r["config"]["optimizer"]["lr"]): r for r in dirs.job_records("smoke").values()}
    assert {r["status"] for r in records.values()} == {FAILED}
    fresh, resumed = records[1e-3], records[5e-3]
    # 2. The first member starts over (its checkpoints gone), the second resumes at 4.
    shutil.rmtree(Path(fresh["output_dir"]) / "checkpoints")
    before = len(list(ledger.events()))
    release, log_path = tmp_path / "release2", tmp_path / "sweep2.log"
    sweep = _start(args, log_path, 5, release)
    try:
        _wait(lambda: _held(release), sweep, log_path)  # the fresh member, at step 5
        release.touch()
        _wait(lambda: len(_held(release)) == 2, sweep, log_path)  # the resumed one
        new_events = list(ledger.events())[before:]
        outcomes = {e["job_id"]: e["status"] for e in new_events if e["event"] == "outcome"}
        assert outcomes == {fresh["job_id"]: FINISHED}, new_events
        assert ledger.job_record(fresh["job_id"])["status"] == FINISHED
        assert ledger.job_record(resumed["job_id"])["status"] == RUNNING
        release.touch()
        assert sweep.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        _stop(sweep)
    new_events = list(ledger.events())[before:]
    for job_id in (fresh["job_id"], resumed["job_id"]):
        assert [e["status"] for e in new_events
                if e["event"] == "outcome" and e["job_id"] == job_id] == [FINISHED]
        assert ledger.job_record(job_id)["status"] == FINISHED


def _taken_over_while_held(tmp_path: Path, args: list[str]) -> tuple[Ledger, str, str,
                                                                      claims.Claim]:
    """Run a one-job sweep held at step 2; meanwhile another host's sweep takes its claim
    over (a newer generation); then let the stale sweep go on to its end. Returns the
    ledger, the job id, the stale sweep's output and the new holder's claim."""
    dirs = SweepDirs(tmp_path)
    args = [*args, *dirs.overrides]
    (job,) = plan_jobs(args)
    ledger = Ledger(dirs.experiments, "smoke")
    release, log_path = tmp_path / "release", tmp_path / "sweep.log"
    sweep = _start(args, log_path, 2, release)
    try:
        _wait(lambda: _held(release), sweep, log_path)
        newer = take_over(ledger, job["job_id"], ticket="sweep-b")
        release.touch()
        sweep.wait(timeout=600)
    finally:
        _stop(sweep)
    return ledger, job["job_id"], log_path.read_text(), newer


def _assert_stale_launcher_recorded_nothing(ledger: Ledger, job_id: str, output: str,
                                            newer: claims.Claim) -> None:
    assert events_of(ledger, "outcome", job_id) == [], output[-3000:]
    record = ledger.job_record(job_id)
    assert record is None or record["status"] != FINISHED, record
    newest = claims.current(ledger.root, job_id)
    assert newest is not None and newest.generation == newer.generation
    assert newest.ticket == "sweep-b" and not newest.released
    assert "its outcome is not recorded by this sweep: the job is now claimed by" in output


@pytest.mark.slow
def test_a_modal_launcher_whose_claim_was_taken_over_records_no_outcome(
        tmp_path: Path) -> None:
    """Modal's local transport with a stand-in volume: the launcher holds the job's claim
    while the container trains. Once another dispatch holds a newer generation, the
    container's result is not recorded: no outcome, no FINISHED record."""
    ledger, job_id, output, newer = _taken_over_while_held(
        tmp_path, [*SHORT, *MODAL_LOCAL, f"hydra.launcher.local_volume_dir={tmp_path}/volume"])
    _assert_stale_launcher_recorded_nothing(ledger, job_id, output, newer)


@pytest.mark.slow
def test_a_submitit_launcher_whose_jobs_claim_was_taken_over_records_no_outcome(
        tmp_path: Path) -> None:
    """submitit (fuse=off): the job's process holds the claim and reports its ticket on
    its JobReturn; the launcher's outcome is fenced with it."""
    ledger, job_id, output, newer = _taken_over_while_held(
        tmp_path, [*SHORT, "hydra/launcher=submitit_local_tmgg", "hydra.launcher.fuse=off"])
    _assert_stale_launcher_recorded_nothing(ledger, job_id, output, newer)
