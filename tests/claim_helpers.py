"""Claim-holder helpers shared by the exactly-once and fencing tests: another sweep's
worker holding a job, a claim aged past its lease or moved to "another host", the
plan of a sweep and its ledger events."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO, tmgg_sweep

from tmgg.jobs import claims
from tmgg.jobs.ledger import Ledger

# Stands in for another sweep's worker running a job: it claims the job, records it
# dispatched and RUNNING as a worker does, renews its claim, and stays alive until
# killed.
HOLDER = """
import sys, time
from tmgg.jobs import claims
from tmgg.jobs.ledger import Ledger
from tmgg.jobs.records import utc_now

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


def plan_jobs(overrides: list[str]) -> list[dict[str, Any]]:
    """The jobs ``tmgg-sweep plan`` lists for these overrides."""
    result = tmgg_sweep("plan", "--json", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["jobs"]


def events_of(ledger: Ledger, kind: str, job_id: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events() if e["event"] == kind and e["job_id"] == job_id]


def hold_job(experiments: Path, job: dict[str, Any], prefix: list[str] | None = None,
             env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``HOLDER`` for ``job`` (under ``prefix``, e.g. ``unshare``); returns once
    it holds the claim."""
    holder = subprocess.Popen([*(prefix or []), sys.executable, "-c", HOLDER, str(experiments),
                               job["job_id"], job["run_name"]], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def age_claims(ledger: Ledger, seconds: float) -> None:
    """Move every claim file's mtime (its lease, by the file system's clock) back."""
    for path in claims.claims_dir(ledger.root).glob("*.json"):
        then = path.stat().st_mtime - seconds
        os.utime(path, (then, then))


def pretend_other_host(ledger: Ledger, job_id: str) -> None:
    """Rewrite the newest claim as if its owner ran on another machine (mtime kept)."""
    claim = claims.current(ledger.root, job_id)
    assert claim is not None
    stat = claim.path.stat()
    data = {**claim.data, "owner": {**claim.owner, "host": "gpu-node-7"}}
    claim.path.write_text(json.dumps(data))
    os.utime(claim.path, (stat.st_atime, stat.st_mtime))


def take_over(ledger: Ledger, job_id: str, ticket: str, deadline_s: float = 120
              ) -> claims.Claim:
    """Take a live holder's claim over as another host's sweep would once the holder's
    lease ran out: its claim is moved to another host and aged past the lease (again
    when its heartbeat renewed it meanwhile) until ``take`` succeeds."""
    import time

    deadline = time.monotonic() + deadline_s
    while True:
        pretend_other_host(ledger, job_id)
        age_claims(ledger, claims.lease_seconds() + 1)
        taken, claim = claims.take(ledger.root, job_id, ticket=ticket,
                                   transport={"kind": "local"})
        if taken:
            return claim
        assert time.monotonic() < deadline, claim.describe()


def can_unshare(*flags: str) -> str | None:
    """None when ``unshare`` with these flags works here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare {' '.join(flags)} is not permitted: " \
        f"{probe.stderr.strip()}"
