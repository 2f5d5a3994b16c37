"""Fencing: a claim's generation is its token, a holder that lost it stops and writes
nothing, a skip is never a result, and neither a writer's clock nor a pid namespace
can make a live holder look dead (or a dead one alive)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from claim_helpers import age_claims as _age_claims
from claim_helpers import can_unshare as _can_unshare
from claim_helpers import events_of as _events
from claim_helpers import hold_job as _hold
from claim_helpers import plan_jobs as _plan
from claim_helpers import pretend_other_host as _pretend_other_host
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs import claims
from tmgg.jobs.ledger import FINISHED, LOST, RUNNING, SKIPPED, Ledger
from tmgg.jobs.records import host

JOB = "smoke-0123456789ab"
CHEAP = ["stage=smoke", "logger=csv", "trainer.max_steps=20", "trainer.val_check_interval=10",
         "trainer.num_threads=1"]
TWO_JOBS = [*CHEAP, "model=linear_pe"]
MODAL_LOCAL = ["hydra/launcher=modal", "hydra.launcher.transport=local",
               "hydra.launcher.local_containers=1"]
SUBMITIT_LOCAL = ["hydra/launcher=submitit_local_tmgg"]

# -- the fencing token ---------------------------------------------------------------


def test_a_newer_generation_fences_off_the_older_holder(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "smoke")
    taken, mine = claims.take(ledger.root, JOB, ticket="a", transport={})
    assert taken
    claims.verify(mine)
    ledger.write_job_record(JOB, {"job_id": JOB, "status": RUNNING}, fence=mine)
    _age_claims(ledger, claims.lease_seconds() + 1)  # as if paused past the lease
    # Another host's sweep takes it over (this host's live pid would keep it alive).
    _pretend_other_host(ledger, JOB)
    taken, theirs = claims.take(ledger.root, JOB, ticket="b", transport={})
    assert taken and theirs.generation == mine.generation + 1
    with pytest.raises(claims.ClaimLost) as lost:
        ledger.write_job_record(JOB, {"job_id": JOB, "status": FINISHED}, fence=mine)
    message = str(lost.value)
    assert f"job {JOB}: this process lost its claim (generation {mine.generation}" in message
    assert f"claimed by {host()}:{os.getpid()}" in message  # the new holder, named
    assert ledger.job_record(JOB)["status"] == RUNNING  # the stale write was refused
    assert claims.renew(mine) is None and not claims.release(mine, FINISHED)


def test_the_heartbeat_stops_a_holder_that_lost_its_claim(tmp_path: Path) -> None:
    taken, mine = claims.take(tmp_path, JOB, ticket="a", transport={})
    assert taken
    beat = claims.Heartbeat(mine, interval_s=0.2)
    try:
        beat.check(JOB)  # held: training goes on
        _pretend_other_host(Ledger(tmp_path.parent, tmp_path.name), JOB)
        _age_claims(Ledger(tmp_path.parent, tmp_path.name), claims.lease_seconds() + 1)
        # The heartbeat may renew before the take-over: then the lease is fresh again.
        deadline = time.monotonic() + 10
        while not claims.take(tmp_path, JOB, ticket="b", transport={})[0]:
            _age_claims(Ledger(tmp_path.parent, tmp_path.name), claims.lease_seconds() + 1)
            assert time.monotonic() < deadline
        stopped_by = time.monotonic() + 1.0  # within one renewal interval (and slack)
        while time.monotonic() < stopped_by and JOB not in beat.lost:
            time.sleep(0.05)
        with pytest.raises(claims.ClaimLost, match="lost its claim"):
            beat.check(JOB)
    finally:
        beat.stop()


def test_a_writer_whose_clock_is_off_by_more_than_the_lease_is_judged_by_the_fs_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lease expiry reads the claim file's mtime against the file system's now: a
    writer whose clock is an hour behind neither loses a live claim at once, nor does
    one an hour ahead keep a dead claim alive for an hour."""
    lease = claims.lease_seconds()
    real = time.time
    for skew in (-3600.0, +3600.0):
        monkeypatch.setattr(claims.time, "time", lambda skew=skew: real() + skew)
        monkeypatch.setattr(claims, "this_process", lambda: {
            "host": "skewed-node", "boot_id": "b", "pid": 7, "start": "1", "pid_ns": "x"})
        job = f"{JOB}{int(skew > 0)}"
        taken, claim = claims.take(tmp_path, job, ticket="skewed", transport={})
        assert taken
        renewed = claims.renew(claim)
        assert renewed is not None
        monkeypatch.undo()  # the reader's clock is right
        alive, reason = claims.assess(claims.current(tmp_path, job))
        assert alive and reason == "lease", (skew, reason)
        path = claims.current(tmp_path, job).path
        then = path.stat().st_mtime - lease - 1
        os.utime(path, (then, then))
        alive, reason = claims.assess(claims.current(tmp_path, job))
        assert not alive and "no heartbeat from skewed-node" in reason, (skew, reason)


# -- pid namespaces -------------------------------------------------------------------


def test_a_holder_in_another_pid_namespace_is_judged_by_its_lease(tmp_path: Path) -> None:
    why_not = _can_unshare("--pid", "--fork", "--mount-proc")
    if why_not:
        pytest.skip(why_not)
    ledger = Ledger(tmp_path, "smoke")
    job = {"job_id": JOB, "run_name": "smoke_linear_pe"}
    holder = _hold(tmp_path, job, prefix=["unshare", "--pid", "--fork", "--mount-proc",
                                          "--kill-child"])
    try:
        claim = claims.current(ledger.root, JOB)
        assert claim is not None and claim.owner["pid_ns"] != claims.pid_namespace()
        assert claim.owner["host"] == host()  # same host and boot: only the pid ns differs
        assert ledger.states()[JOB].status == RUNNING
        taken, _ = claims.take(ledger.root, JOB, ticket="host-sweep", transport={})
        assert not taken  # the host's sweep does not train it again
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone, but from here that cannot be seen: the lease decides.
    alive, reason = claims.assess(claims.current(ledger.root, JOB))
    assert alive and reason == "lease"
    _age_claims(ledger, claims.lease_seconds() + 1)
    state = ledger.states()[JOB]
    assert state.status == LOST and "no heartbeat" in (state.claim or "")


# -- a pause past the lease ----------------------------------------------------------


def test_a_holder_paused_past_its_lease_stops_and_writes_nothing(sweep_dirs: SweepDirs) -> None:
    """Sweep A runs on "another host" (its own UTS namespace) and is SIGSTOPped past its
    lease; another sweep takes the job over; on SIGCONT, A stops within one renewal
    interval with an error naming the job and the new holder, and records nothing."""
    why_not = _can_unshare("--uts")
    if why_not:
        pytest.skip(why_not)
    overrides = [*CHEAP, "model=linear_pe", "seed=1", "trainer.max_steps=200000",
                 "trainer.val_check_interval=100000", "trainer.checkpoint=false",
                 *sweep_dirs.overrides]
    (job,) = _plan(overrides)
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    command = " ".join([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides,
                        "hydra/launcher=basic"])
    sweep_a = subprocess.Popen(["unshare", "--uts", "sh", "-c",
                                f"hostname paused-node && exec {command}"],
                               cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, "TMGG_CLAIM_LEASE_S": "4"})
    try:
        deadline = time.monotonic() + 180
        while not (Path(_log_of(sweep_dirs, job)).exists()
                   and "Training" in Path(_log_of(sweep_dirs, job)).read_text()):
            assert sweep_a.poll() is None, sweep_a.stdout.read() if sweep_a.stdout else ""
            assert time.monotonic() < deadline, "sweep A never started training"
            time.sleep(0.5)
        record_a = ledger.job_record(job["job_id"])
        assert record_a["status"] == RUNNING and record_a["host"] == "paused-node"
        os.kill(sweep_a.pid, signal.SIGSTOP)
        time.sleep(4 + 2)  # past A's lease, by the file system's clock
        taken, claim_b = claims.take(ledger.root, job["job_id"], ticket="sweep-b",
                                     transport={"kind": "local"})
        assert taken, claim_b.describe()
        os.kill(sweep_a.pid, signal.SIGCONT)
        resumed = time.monotonic()
        output, _ = sweep_a.communicate(timeout=120)
        # It stopped (the job would have run for minutes) and said why, naming B.
        assert f"job {job['job_id']}: this process lost its claim" in output, output[-3000:]
        assert claim_b.describe() in output
        assert time.monotonic() - resumed < 60
        assert sweep_a.returncode != 0
    finally:
        if sweep_a.poll() is None:
            os.kill(sweep_a.pid, signal.SIGCONT)
            sweep_a.kill()
            sweep_a.wait()
    # A wrote nothing after losing: its record is the RUNNING one it wrote before the
    # pause, no outcome, B's generation is still the newest and untouched by A.
    assert ledger.job_record(job["job_id"]) == record_a
    assert not _events(ledger, "outcome", job["job_id"])
    newest = claims.current(ledger.root, job["job_id"])
    assert newest is not None and newest.generation == claim_b.generation
    assert newest.ticket == "sweep-b" and not newest.released


def _log_of(sweep_dirs: SweepDirs, job: dict[str, Any]) -> Path:
    matches = list(sweep_dirs.outputs.glob(f"smoke/{job['run_name']}-*/*.log"))
    return matches[0] if matches else sweep_dirs.outputs / "none"


# -- a skip is never a result ---------------------------------------------------------


def test_a_claimed_job_is_skipped_never_finished_under_modal_and_submitit(
        sweep_dirs: SweepDirs) -> None:
    """Under Modal's local transport and submitit (fuse=off), a job another sweep holds
    is recorded skipped (its own event; status SKIPPED or the holder's RUNNING), never
    FINISHED; once its holder dies it is LOST, and resume trains it."""
    overrides = [*TWO_JOBS, *sweep_dirs.overrides]
    held, free = _plan(overrides)
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    holder = _hold(sweep_dirs.experiments, held)
    try:
        modal = tmgg_train("-m", *overrides, *MODAL_LOCAL, env=_no_modal_tokens())
        assert modal.returncode == 0, modal.stderr[-3000:]
        submitit = tmgg_train("-m", *overrides, *SUBMITIT_LOCAL, "hydra.launcher.fuse=off",
                              timeout=300)
        assert submitit.returncode == 0, submitit.stderr[-3000:]
        assert "SKIPPED (claimed)" in modal.stderr  # its outcome table (submitit has none)
        assert ledger.job_record(held["job_id"])["status"] == RUNNING  # the holder's
        outcomes = _events(ledger, "outcome", held["job_id"])
        assert outcomes == [], outcomes  # a skip is never an outcome
        assert len(_events(ledger, "skipped", held["job_id"])) >= 2
        assert ledger.job_record(free["job_id"])["status"] == FINISHED
        assert ledger.states()[held["job_id"]].status in (RUNNING, SKIPPED)
        assert not list(sweep_dirs.outputs.glob(f"smoke/{held['run_name']}-*/metrics.json"))
    finally:
        holder.kill()
        holder.wait()
    status = json.loads(tmgg_sweep("status", "--json", "--no-poll", *overrides).stdout)
    row = {r["job_id"]: r for r in status["jobs"]}[held["job_id"]]
    assert row["status"] == LOST, row
    resumed = tmgg_sweep("resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 to run (0 failed, 1 lost" in resumed.stdout
    record = ledger.job_record(held["job_id"])
    assert record["status"] == FINISHED and record["metrics"]["global_step"] == 20


def test_a_fused_submitit_member_claimed_elsewhere_is_skipped_not_trained(
        sweep_dirs: SweepDirs) -> None:
    overrides = [*CHEAP, "seed=1", *sweep_dirs.overrides]
    jobs = _plan(overrides)
    assert len(jobs) == 3  # three models of one batch stream: one fused group
    held = next(job for job in jobs if "filter_bank" in job["run_name"])
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    holder = _hold(sweep_dirs.experiments, held)
    try:
        result = tmgg_train("-m", *overrides, *SUBMITIT_LOCAL, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ledger.job_record(held["job_id"])["status"] == RUNNING  # the holder's
        assert _events(ledger, "outcome", held["job_id"]) == []
        assert _events(ledger, "skipped", held["job_id"])
        assert not list(sweep_dirs.outputs.glob(f"smoke/{held['run_name']}-*/metrics.json"))
        for job in jobs:
            if job is not held:
                assert ledger.job_record(job["job_id"])["status"] == FINISHED
    finally:
        holder.kill()
        holder.wait()


def _no_modal_tokens() -> dict[str, str]:
    return {k: "" for k in os.environ if k.startswith("MODAL_TOKEN")}


def test_a_fused_member_that_loses_its_claim_stops_alone(tmp_path: Path) -> None:
    """Mid-training, another host takes one member's job over: that member stops with
    ClaimLost before its next step and leaves no result; the other member finishes."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tmgg.jobs.compose import compose_sweep
    from tmgg.task.fused import FusedMember, run_fused_training

    sweep = compose_sweep([*CHEAP, "seed=1", "model=linear_pe,filter_bank",
                           f"outputs_dir={tmp_path}/out", f"experiments_dir={tmp_path}/exp"])
    HydraConfig.instance().cfg = None  # the jobs below run outside a Hydra job
    configs = [OmegaConf.create(job.task_config) for job in sweep.jobs]
    ledger = Ledger(tmp_path / "exp", "smoke")
    job_id = str(configs[1].job.id)
    taken, claim = claims.take(ledger.root, job_id, ticket="group", transport={})
    assert taken
    steps = {"seen": 0}

    def fence() -> None:
        steps["seen"] += 1
        if steps["seen"] == 5:  # another host takes the job over meanwhile
            _pretend_other_host(ledger, job_id)
            _age_claims(ledger, claims.lease_seconds() + 1)
            assert claims.take(ledger.root, job_id, ticket="other", transport={})[0]
        claims.verify(claim)

    members = [FusedMember(cfg=cfg, output_dir=tmp_path / "group" / str(cfg.job.run_name))
               for cfg in configs]
    members[1].extra["fence"] = fence
    run_fused_training(members)
    assert isinstance(members[1].error, claims.ClaimLost), members[1].error
    assert members[1].result is None
    assert not (members[1].output_dir / "metrics.json").exists()
    assert members[0].error is None and members[0].result["global_step"] == 20


def test_a_holder_that_cannot_renew_its_lease_stops(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared file system refuses every renewal: once a whole lease has passed
    without one, the holder must assume another process took the job, and stop."""
    monkeypatch.setenv("TMGG_CLAIM_LEASE_S", "1")
    taken, mine = claims.take(tmp_path, JOB, ticket="a", transport={})
    assert taken and mine.lease_s == 1.0
    beat = claims.Heartbeat(mine, interval_s=0.2)

    def unreachable(claim: claims.Claim, **changes: Any) -> None:
        raise OSError("Stale file handle")

    monkeypatch.setattr(claims, "renew", unreachable)
    try:
        beat.check(JOB)  # just renewed at start: fine
        time.sleep(1.3)
        with pytest.raises(claims.ClaimLost, match=r"its lease could not be renewed for \d+ s"):
            beat.check(JOB)
    finally:
        beat.stop()
