"""Claims (tmgg.jobs.claims) pinned down where mutation testing found them unexamined
(issue 25): the dispatch ticket's sources, zombie processes, liveness reasons, what a
new generation records, the heartbeat's renewals and the fencing error's message; and
the identity's run-name numbers and legacy override identity (tmgg.config.identity).

Fast and in-process: part of ``make mutate``'s test selection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tmgg.config.identity import canonical_overrides, legacy_job_id, short_float
from tmgg.jobs import claims
from tmgg.jobs.records import host

JOB = "smoke-feedc0ffee01"


@pytest.fixture(autouse=True)
def _no_dispatch_ticket(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID",
                 "SUBMITIT_LOCAL_JOB_ID", "TMGG_CLAIM_LEASE_S"):
        monkeypatch.delenv(name, raising=False)
    claims.set_dispatch_ticket(None)
    yield
    claims.set_dispatch_ticket(None)


def test_the_dispatch_ticket_comes_from_the_launcher_then_slurm_then_submitit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert claims.dispatch_ticket() is None
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")
    assert claims.dispatch_ticket() == f"submitit-local-{host()}-77"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert claims.dispatch_ticket() == "slurm-123"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert claims.dispatch_ticket() == "slurm-123-4"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")  # an array job's id wins
    assert claims.dispatch_ticket() == "slurm-900-4"
    claims.set_dispatch_ticket("from-the-launcher")
    assert claims.dispatch_ticket() == "from-the-launcher"


def test_the_lease_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert claims.lease_seconds() == claims.DEFAULT_LEASE_S
    monkeypatch.setenv("TMGG_CLAIM_LEASE_S", "7.5")
    assert claims.lease_seconds() == 7.5
    assert len({claims.new_ticket() for _ in range(3)}) == 3


def test_an_unreaped_child_is_a_zombie_and_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60  # a bound for a broken child, not a race
    while not claims.is_zombie(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert claims.process_start(child.pid) is None  # exited: not that process any more
    assert not claims.process_matches(child.pid, None)
    assert not claims.pid_alive(child.pid)  # reaps it, too
    child.wait()
    me = os.getpid()
    assert not claims.is_zombie(me) and claims.pid_alive(me)
    assert claims.process_matches(me, claims.process_start(me))
    assert not claims.process_matches(me, "0")  # another process under a reused pid
    assert not claims.is_zombie(2**22 + 1)  # no such process: not a zombie either
    owner = claims.this_process()
    assert owner == {"host": host(), "boot_id": claims._boot_id(), "pid": me,
                     "start": claims.process_start(me), "pid_ns": claims.pid_namespace()}
    assert owner["boot_id"] and owner["start"]


def _claim(root: Path, generation: int = 1, mtime: float | None = None, **data: object
           ) -> claims.Claim:
    return claims.Claim(claims.claims_dir(root) / f"{JOB}.g{generation}.json", generation,
                        {"job_id": JOB, **data}, mtime=mtime)


def test_liveness_reasons(tmp_path: Path) -> None:
    now = 1000.0
    released = _claim(tmp_path, released=True, released_at="t1")
    assert claims.assess(released, now=now) == (False, "released t1")
    damaged = claims.Claim(tmp_path / f"{JOB}.g3.json", 3, {}, mtime=now - 10,
                           damaged="not JSON")
    assert claims.assess(damaged, now=now) == (True, "lease (unreadable claim file)")
    alive, why = claims.assess(damaged, now=now + claims.DEFAULT_LEASE_S)
    assert not alive and why == (f"its claim file {JOB}.g3.json is unreadable (not JSON) "
                                 "and its lease has run out")
    assert damaged.describe() == (f"claimed by an unreadable claim file {JOB}.g3.json (held "
                                  "until its lease has run out): not JSON")
    mine = _claim(tmp_path, owner=claims.this_process(), heartbeat_at="t2")
    assert claims.assess(mine, now=now) == (True, "owner running")
    elsewhere = {"host": "other-host", "pid": 12, "boot_id": "b", "pid_ns": "p"}
    remote = _claim(tmp_path, owner=elsewhere, heartbeat_at="t3", lease_s=60, mtime=now - 30)
    assert claims.assess(remote, now=now) == (True, "lease")
    assert claims.assess(remote, now=now + 31) == (
        False, "no heartbeat from other-host since t3")
    call = _claim(tmp_path, owner=elsewhere, lease_s=60, mtime=now - 30,
                  transport={"kind": "modal", "call_id": "fc-1"})
    assert claims.assess(call, now=now) == (True, "lease")
    assert claims.assess(call, now=now + 31) == (True, "call fc-1 running")
    assert claims.assess(call, call_alive=lambda c: c == "fc-1", now=now + 31) == (
        True, "call fc-1 running")
    assert claims.assess(call, call_alive=lambda c: False, now=now + 31) == (
        False, "call fc-1 ended")
    assert call.describe() == "claimed by other-host:12 since None (modal call fc-1)"
    gone = {**claims.this_process(), "pid": 2**22 + 1, "start": "1"}
    dead = _claim(tmp_path, owner=gone, heartbeat_at="t4")
    assert claims.assess(dead, now=now) == (
        False, f"its process {host()}:{2**22 + 1} is gone (last heartbeat t4)")


def test_a_new_generation_records_who_it_took_over_from(tmp_path: Path) -> None:
    taken, first = claims.take(tmp_path, JOB, ticket="a", transport={"kind": "modal"},
                               extra={"dispatcher": {"pid": 1}})
    assert taken and first.data["took_over"] is None and first.data["released"] is False
    assert first.data["lease_s"] == claims.lease_seconds()
    assert first.data["taken_at"] == first.data["heartbeat_at"]
    assert first.lease_s == claims.lease_seconds()
    # The job's own process (same ticket) takes over: the dispatcher stays named and the
    # transport keeps what the launcher said, with the job's own additions.
    taken, second = claims.take(tmp_path, JOB, ticket="a", transport={"call_id": "fc-9"})
    assert taken and second.generation == 2
    assert second.data["dispatcher"] == {"pid": 1}
    assert second.data["transport"] == {"kind": "modal", "call_id": "fc-9"}
    assert second.data["took_over"] == {"generation": 1, "owner": first.owner,
                                        "ticket": "a", "damaged": None}
    assert not (claims.claims_dir(tmp_path) / f"{JOB}.g1.json").exists()  # forgotten
    # Another ticket's generation names no dispatcher it was not given.
    assert claims.release(second, "FINISHED")
    taken, third = claims.take(tmp_path, JOB, ticket="b", transport={"kind": "local"})
    assert taken and third.generation == 4 and "dispatcher" not in third.data
    assert third.data["took_over"] is None  # the claim before it was released
    released = claims.current(tmp_path, JOB)
    assert released is not None and released.generation == 4


def test_release_by_ticket_only_releases_that_tickets_claim(tmp_path: Path) -> None:
    assert not claims.release_ticket(tmp_path, JOB, "a", None)  # never claimed
    _, claim = claims.take(tmp_path, JOB, ticket="a", transport={})
    assert not claims.release_ticket(tmp_path, JOB, "b", "FINISHED")
    assert claims.release_ticket(tmp_path, JOB, "a", "FINISHED")
    newest = claims.current(tmp_path, JOB)
    assert newest is not None and newest.released and newest.generation == 2
    assert newest.data["outcome"] == "FINISHED"
    assert newest.data["released_by"]["pid"] == os.getpid()
    assert not claims.release_ticket(tmp_path, JOB, "a", "FINISHED")  # already released
    assert not claims.release(claim)  # an old generation can no longer release
    assert claims.fence_ticket(tmp_path, JOB, None) is None
    assert claims.fence_ticket(tmp_path, "never-claimed", "a") is None
    assert claims.fence_ticket(tmp_path, JOB, "a") is None  # its own ticket
    fenced = claims.fence_ticket(tmp_path, JOB, "z")
    assert fenced is not None and fenced.generation == 2


def test_claim_lost_says_which_generation_and_who_holds_the_job(tmp_path: Path) -> None:
    _, mine = claims.take(tmp_path, JOB, ticket="a", transport={"kind": "local"})
    claims.verify(mine)
    (claims.claims_dir(tmp_path) / f"{JOB}.g2.json").write_text(
        (claims.claims_dir(tmp_path) / f"{JOB}.g1.json").read_text())
    with pytest.raises(claims.ClaimLost) as lost:
        claims.verify(mine)
    error = lost.value
    assert (error.job_id, error.generation) == (JOB, 1)
    assert error.holder == claims.current(tmp_path, JOB).describe()
    assert str(error) == (f"job {JOB}: this process lost its claim (generation 1; "
                          f"generation 2 is newer than ours); the job is now "
                          f"{error.holder}. Training stopped and nothing more is recorded "
                          f"for it by this process.")
    gone = claims.ClaimLost(mine, None)
    assert gone.holder == "nobody" and "its claim files are gone" in str(gone)
    assert "(generation 1; why)" in str(claims.ClaimLost(mine, None, "why"))


def test_the_heartbeat_renews_and_reports_a_lost_claim(tmp_path: Path) -> None:
    _, claim = claims.take(tmp_path, JOB, ticket="a", transport={})
    beat = claims.Heartbeat(claim, interval_s=0.05)
    try:
        assert beat.lease_s == claims.lease_seconds() and beat.interval_s == 0.05
        first = claim.data["heartbeat_at"]
        deadline = time.monotonic() + 60  # a bound for a broken thread, not a race
        while claims.current(tmp_path, JOB).data["heartbeat_at"] == first:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        beat.check(JOB)  # still held
        beat.check("another-job")  # not renewed here: nothing to say
        # Taken over by another dispatch: the next renewal finds it lost.
        (claims.claims_dir(tmp_path) / f"{JOB}.g2.json").write_text(
            (claims.claims_dir(tmp_path) / f"{JOB}.g1.json").read_text())
        while JOB not in beat.lost:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(claims.ClaimLost, match="generation 2 is newer than ours"):
            beat.check(JOB)
        assert beat.discard(JOB) is None and beat.stop() == []
    finally:
        beat.stop()
    default = claims.Heartbeat(claim)
    assert default.interval_s == max(1.0, claims.lease_seconds() / 4)
    assert default.discard(JOB) == claim and default.stop() == []
    other = claims.Heartbeat(claim)
    assert other.stop() == [claim]


def test_after_a_pause_the_heartbeat_renews_at_once_or_says_the_lease_ran_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``check`` after longer than 1.5 renewal intervals without one (SIGSTOP, a
    suspended laptop): it renews on the spot; a claim taken over meanwhile, or one that
    could not be renewed for a whole lease, stops the job."""
    _, claim = claims.take(tmp_path, JOB, ticket="a", transport={})
    beat = claims.Heartbeat(claim, interval_s=3600)  # its thread never renews here
    try:
        beat._renewed_at[JOB] = time.monotonic() - 2 * 3600  # paused for two intervals
        beat.check(JOB)  # renewed at once
        assert time.monotonic() - beat._renewed_at[JOB] < 3600
        assert claim.mtime is None and beat.claims[JOB].mtime is not None  # renew's claim
        # A shared file system that refuses the renewal for longer than the lease.
        monkeypatch.setattr(claims, "renew", lambda claim: (_ for _ in ()).throw(
            OSError("stale file handle")))
        beat._renewed_at[JOB] = time.monotonic() - 2 * 3600
        with pytest.raises(claims.ClaimLost, match=r"its lease could not be renewed for "
                                                   r"\d+ s"):
            beat.check(JOB)
        assert JOB not in beat.claims and JOB in beat.lost
        with pytest.raises(claims.ClaimLost):  # and keeps saying so
            beat.check(JOB)
    finally:
        beat.stop()
    monkeypatch.undo()
    _, claim = claims.take(tmp_path, "smoke-0000000000ff", ticket="b", transport={})
    beat = claims.Heartbeat(claim, interval_s=3600)
    try:
        # Taken over while paused: the renewal at once finds the newer generation.
        directory = claims.claims_dir(tmp_path)
        (directory / "smoke-0000000000ff.g2.json").write_text(
            (directory / "smoke-0000000000ff.g1.json").read_text())
        beat.check("smoke-0000000000ff")  # not paused: no renewal, nothing known yet
        beat._renewed_at["smoke-0000000000ff"] = time.monotonic() - 2 * 3600
        with pytest.raises(claims.ClaimLost, match="generation 2 is newer than ours"):
            beat.check("smoke-0000000000ff")
    finally:
        beat.stop()


# -- identity (tmgg.config.identity): run-name numbers and the legacy override identity --
def test_run_names_write_numbers_short() -> None:
    cases = [(0.001, "1e-3"), (0, "0"), (0.0, "0"), (-0.0, "0"), (1, "1"), (8.0, "8"),
             (999, "999"), (-5, "-5"), (1000, "1e3"), (1500, "1.5e3"),
             (123456.0, "1.23456e5"), (-0.001, "-1e-3"), (1.5e-3, "1.5e-3"), (0.5, "5e-1"),
             ("1e-3", "1e-3"), (float("inf"), "inf")]
    assert [(value, short_float(value)) for value, _ in cases] == cases
    assert short_float("abc") == "abc" and short_float(None) == "None"  # left to validation


def test_the_legacy_identity_reads_overrides_as_hydra_does() -> None:
    lines = canonical_overrides([
        "experiments_dir=x", "+experiments_dir=y", "~trainer.resume", "hydra.job.chdir=true",
        "logger.mode=online", "seed=1", "+a.b=1", "~c", "model.k=[1,2]", "+x={b:1,a:[2]}",
        "optimizer.weight_decay=0", "optimizer.betas=[0,1]", "optimizer.lr=true"])
    assert lines == ['+a.b=1', '+x={"a": [2], "b": 1}', 'model.k=[1, 2]',
                     'optimizer.betas=[0.0, 1.0]', 'optimizer.lr=true',
                     'optimizer.weight_decay=0.0', 'seed=1', '~c']
    # One grid point whatever the order, and the stage is part of it.
    job_id = legacy_job_id("st", ["seed=1", "model=a"])
    assert job_id == legacy_job_id("st", ["model=a", "seed=1"])
    assert job_id.startswith("st-") and len(job_id) == len("st-") + 10
    assert legacy_job_id("other", ["seed=1", "model=a"]).split("-")[1] != job_id.split("-")[1]
