"""A whole sweep in another pid namespace (issue 20: containers with host networking
share hostname and boot id, not pids). Its held job is judged by its lease from the
host's namespace: ``status`` does not call it LOST and the same sweep started on the
host does not train it again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from claim_helpers import can_unshare, events_of, plan_jobs
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs import claims
from tmgg.jobs.ledger import FINISHED, RUNNING, Ledger
from tmgg.jobs.records import host

ONE_JOB = ["stage=smoke", "seed=1", "model=linear_pe", "logger=csv", "trainer.max_steps=6",
           "trainer.val_check_interval=2", "data.val_samples=20", "data.test_samples=20",
           "trainer.num_threads=1", "hydra.launcher.n_workers=1"]
# Unprivileged where user namespaces are allowed; as root, a pid namespace alone.
NAMESPACES = (["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"],
              ["--pid", "--fork", "--mount-proc"])


def _namespace_flags() -> list[str]:
    reasons = []
    for flags in NAMESPACES:
        why_not = can_unshare(*flags)
        if why_not is None:
            return flags
        reasons.append(why_not)
    pytest.skip("; ".join(reasons))


@pytest.mark.slow
def test_a_sweep_in_another_pid_namespace_is_neither_lost_nor_trained_again(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    flags = _namespace_flags()
    overrides = [*ONE_JOB, *sweep_dirs.overrides]
    (job,) = plan_jobs(overrides)
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    release, log_path = tmp_path / "release", tmp_path / "namespaced.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMGG_TEST_HOLD_AT_STEP": "2",
           "TMGG_TEST_HOLD_FILE": str(release)}
    with log_path.open("w") as log:
        namespaced = subprocess.Popen(
            ["unshare", *flags, "--kill-child", sys.executable, "-m", "tmgg.cli.app", "-m",
             *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a bound for a broken run, not a race
        while not list(tmp_path.glob("release.held.*")):
            assert namespaced.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        claim = claims.current(ledger.root, job["job_id"])
        assert claim is not None and not claim.released
        assert claim.owner["host"] == host() and claim.owner["pid_ns"] != claims.pid_namespace()

        status = tmgg_sweep("status", "--json", "--no-poll", *overrides)
        assert status.returncode == 0, status.stderr[-3000:]
        (row,) = json.loads(status.stdout)["jobs"]
        assert row["status"] == RUNNING, row  # not LOST: its pid means nothing here

        again = tmgg_train("-m", *overrides)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"{job['run_name']}: not dispatched, claimed by {host()}:" in again.stderr
        assert "SKIPPED (claimed)" in again.stderr
        assert len(events_of(ledger, "dispatched", job["job_id"])) == 1  # the namespace's

        release.touch()
        assert namespaced.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if namespaced.poll() is None:
            os.killpg(namespaced.pid, signal.SIGKILL)
            namespaced.wait()
    record = ledger.job_record(job["job_id"])
    assert record["status"] == FINISHED and record["metrics"]["global_step"] == 6
    assert [e["status"] for e in events_of(ledger, "outcome", job["job_id"])] == [FINISHED]
    assert len(list(sweep_dirs.outputs.glob(f"smoke/{job['run_name']}-*/metrics.json"))) == 1
