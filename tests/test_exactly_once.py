"""One job, one execution: a second sweep or resume never dispatches a claimed job,
a job whose process died is LOST and resumed, and a chaos run proves it end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train

from tmgg.orchestration import claims
from tmgg.orchestration.ledger import FINISHED, LOST, RUNNING, Ledger
from tmgg.orchestration.records import host

LOCAL = ["hydra/launcher=local", "hydra.launcher.n_workers=2"]
TWO_JOBS = ["stage=smoke", "logger=csv", "model=linear_pe"]

# Stands in for another sweep's worker running a job: it claims the job, records it
# dispatched and RUNNING as a worker does, and stays alive until killed.
_HOLDER = """
import sys, time
from pathlib import Path
from tmgg.orchestration import claims
from tmgg.orchestration.ledger import Ledger
from tmgg.orchestration.records import utc_now

ledger = Ledger(sys.argv[1], "smoke")
job_id, run_name = sys.argv[2], sys.argv[3]
taken, claim = claims.take(ledger.root, job_id, ticket="other-sweep",
                           transport={"kind": "local"})
assert taken, claim.describe()
ledger.append({"event": "dispatched", "time": utc_now(), "job_id": job_id,
               "run_name": run_name, "launcher": "local"})
ledger.write_job_record(job_id, {"job_id": job_id, "run_name": run_name,
                                 "status": "RUNNING", "started_at": utc_now()})
claims.Heartbeat(claim, interval_s=1.0)
print("holding", flush=True)
time.sleep(600)
"""


def _plan(overrides: list[str]) -> list[dict[str, Any]]:
    result = tmgg_sweep("plan", "--json", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["jobs"]


def _events(ledger: Ledger, kind: str, job_id: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events() if e["event"] == kind and e["job_id"] == job_id]


def test_a_job_running_elsewhere_is_neither_dispatched_nor_resumed_until_lost(
        sweep_dirs: SweepDirs) -> None:
    overrides = [*TWO_JOBS, *sweep_dirs.overrides]
    held, free = _plan(overrides)
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(sweep_dirs.experiments),
                               held["job_id"], held["run_name"]], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        sweep = tmgg_train("-m", *overrides, *LOCAL)
        # Not a failure: the job is another sweep's, so the exit code is 0.
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        assert f"{held['run_name']}: not dispatched, claimed by {host()}:{holder.pid} since" \
            in sweep.stderr
        assert "SKIPPED (claimed)" in sweep.stderr
        assert len(_events(ledger, "dispatched", held["job_id"])) == 1  # the holder's
        assert ledger.job_record(held["job_id"])["status"] == RUNNING  # untouched
        assert ledger.job_record(free["job_id"])["status"] == FINISHED

        dry = tmgg_sweep("resume", "--dry-run", *overrides)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "1 in flight elsewhere, 0 to run" in dry.stdout
        assert f"not run: {held['run_name']}" in dry.stdout
    finally:
        holder.kill()
        holder.wait()

    status = json.loads(tmgg_sweep("status", "--json", *overrides).stdout)
    lost = {row["job_id"]: row for row in status["jobs"]}[held["job_id"]]
    assert lost["status"] == LOST and f"{holder.pid} is gone" in lost["claim"]
    finished_at = ledger.job_record(free["job_id"])["finished_at"]
    resumed = tmgg_sweep("resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 to run (0 failed, 1 lost" in resumed.stdout
    assert ledger.job_record(held["job_id"])["status"] == FINISHED
    assert ledger.job_record(free["job_id"])["finished_at"] == finished_at  # not re-run
    released = claims.current(ledger.root, held["job_id"])
    assert released is not None and released.released


def test_a_detached_call_in_flight_is_polled_not_sent_again(sweep_dirs: SweepDirs) -> None:
    modal = ["hydra/launcher=modal", "hydra.launcher.transport=local",
             "hydra.launcher.detach=true", "hydra.launcher.local_containers=1"]
    args = ("-m", *TWO_JOBS, "trainer.max_steps=200", *modal, *sweep_dirs.overrides)
    first = tmgg_train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    calls = {e["job_id"]: e["call_id"] for e in ledger.events() if e["event"] == "dispatched"}
    assert len(calls) == 2
    second = tmgg_train(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    dispatched = [e for e in ledger.events() if e["event"] == "dispatched"]
    assert len(dispatched) == 2  # nothing sent again
    # Each job was either still running (claimed by its call) or had finished and was
    # folded from its call's result when the second sweep polled it.
    for job_id, call_id in calls.items():
        state = ledger.states()[job_id]
        assert (f"call {call_id}" in second.stderr) or state.status == FINISHED, \
            second.stderr[-3000:]
    deadline = time.time() + 300
    while time.time() < deadline:
        from tmgg.launch.modal_calls import poll_detached

        poll_detached(ledger)
        if {s.status for s in ledger.states().values()} == {FINISHED}:
            break
        time.sleep(0.5)
    assert {s.status for s in ledger.states().values()} == {FINISHED}
    assert len([e for e in ledger.events() if e["event"] == "outcome"]) == 2
