"""Per-job claims: taken atomically, one winner, stale ones taken over, LOST folded."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from tmgg.jobs import claims
from tmgg.jobs.ledger import FINISHED, LOST, RUNNING, Ledger
from tmgg.jobs.records import host

JOB = "smoke-0123456789ab"


def _dead_pid() -> tuple[int, str | None]:
    """A pid of a process that has exited (and its start time while it lived)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = claims.process_start(process.pid)
    process.kill()
    process.wait()
    return process.pid, start


def _write_claim(root: Path, generation: int, **data: object) -> Path:
    """A claim file; its ``lease_expires`` is made true by the file system's clock (the
    file's mtime is set ``lease_s`` before it), which is what liveness reads."""
    path = claims.claims_dir(root) / f"{JOB}.g{generation}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": JOB, "released": False, **data}))
    if "lease_expires" in data:
        written = float(data["lease_expires"]) - claims.lease_seconds()  # type: ignore[arg-type]
        os.utime(path, (written, written))
    return path


def _owner(pid: int, start: str | None, on_host: str | None = None) -> dict[str, object]:
    return {"host": on_host or host(), "boot_id": claims._boot_id(), "pid": pid,
            "start": start, "pid_ns": claims.pid_namespace()}


def test_a_live_claim_of_another_dispatch_is_not_taken(tmp_path: Path) -> None:
    taken, claim = claims.take(tmp_path, JOB, ticket="a", transport={"kind": "local"})
    assert taken and claim.generation == 1
    taken_again, holder = claims.take(tmp_path, JOB, ticket="b", transport={"kind": "local"})
    assert not taken_again
    assert holder.generation == 1 and holder.ticket == "a"
    assert holder.describe().startswith(f"claimed by {host()}:{os.getpid()} since ")
    # The same dispatch (its job's process, or a retry) takes it over although it lives.
    handed, adopted = claims.take(tmp_path, JOB, ticket="a", transport={})
    assert handed and adopted.generation == 2
    assert adopted.data["transport"]["kind"] == "local"  # what the dispatcher said


def test_a_claim_whose_process_died_is_taken_over(tmp_path: Path) -> None:
    pid, start = _dead_pid()
    _write_claim(tmp_path, 4, ticket="old", owner=_owner(pid, start),
                 lease_expires=time.time() + 3600, heartbeat_at="then")
    alive, reason = claims.assess(claims.current(tmp_path, JOB))
    assert not alive and f"{pid} is gone" in reason  # despite an unexpired lease
    taken, claim = claims.take(tmp_path, JOB, ticket="new", transport={"kind": "local"})
    assert taken and claim.generation == 5
    assert claim.data["took_over"]["owner"]["pid"] == pid
    assert [g for g, _ in claims._generations(tmp_path, JOB)] == [5]


def test_a_reused_pid_does_not_keep_a_claim_alive(tmp_path: Path) -> None:
    """Same pid, another start time: another process, so the claim is stale."""
    _write_claim(tmp_path, 1, owner=_owner(os.getpid(), "1"), lease_expires=0)
    assert not claims.assess(claims.current(tmp_path, JOB))[0]


def test_another_hosts_claim_lives_as_long_as_its_lease(tmp_path: Path) -> None:
    owner = _owner(1, "1", on_host="gpu-node-7")
    _write_claim(tmp_path, 1, owner=owner, lease_expires=time.time() + 60)
    assert claims.assess(claims.current(tmp_path, JOB)) == (True, "lease")
    _write_claim(tmp_path, 2, owner=owner, lease_expires=time.time() - 1, heartbeat_at="t0")
    alive, reason = claims.assess(claims.current(tmp_path, JOB))
    assert not alive and "no heartbeat from gpu-node-7 since t0" in reason


def test_a_claim_on_a_detached_call_lives_while_the_call_runs(tmp_path: Path) -> None:
    pid, start = _dead_pid()  # the launcher that spawned the call has exited
    _write_claim(tmp_path, 1, owner=_owner(pid, start), lease_expires=0,
                 transport={"kind": "modal", "call_id": "fc-1"})
    claim = claims.current(tmp_path, JOB)
    assert claims.assess(claim, call_alive=lambda call: True)[0]
    assert claims.assess(claim)[0]  # not polled: unknown, so not taken
    assert not claims.assess(claim, call_alive=lambda call: False)[0]
    taken, holder = claims.take(tmp_path, JOB, ticket="x", transport={},
                                call_alive=lambda call: call == "fc-1")
    assert not taken and "call fc-1" in holder.describe()


def test_renew_and_release(tmp_path: Path) -> None:
    _, claim = claims.take(tmp_path, JOB, ticket="a", transport={})
    time.sleep(0.01)
    renewed = claims.renew(claim)
    assert renewed is not None and renewed.data["lease_expires"] > claim.data["lease_expires"]
    assert claims.release(renewed, FINISHED)
    released = claims.current(tmp_path, JOB)
    assert released.released and released.generation == 2
    assert claims.renew(renewed) is None  # no longer its holder
    taken, again = claims.take(tmp_path, JOB, ticket="b", transport={})
    assert taken and again.generation == 3 and again.data["took_over"] is None


def _race(root: str, barrier: object, results: object, done: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    taken, claim = claims.take(Path(root), JOB, ticket=f"t{os.getpid()}", transport={})
    results.put((taken, claim.generation))  # type: ignore[attr-defined]
    done.wait(60)  # type: ignore[attr-defined]  # a winner that exited would lose its claim


def test_of_many_processes_taking_over_a_stale_claim_exactly_one_wins(tmp_path: Path) -> None:
    pid, start = _dead_pid()
    _write_claim(tmp_path, 1, owner=_owner(pid, start), lease_expires=0)
    context = multiprocessing.get_context("fork")
    barrier, results, done = context.Barrier(6), context.Queue(), context.Event()
    racers = [context.Process(target=_race, args=(str(tmp_path), barrier, results, done))
              for _ in range(6)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=60) for _ in racers]
    done.set()
    for racer in racers:
        racer.join()
    winners = [generation for taken, generation in outcomes if taken]
    assert len(winners) == 1
    assert claims.current(tmp_path, JOB).generation == winners[0]


def _record(ledger: Ledger, status: str) -> None:
    ledger.write_job_record(JOB, {"job_id": JOB, "run_name": "smoke_x", "status": status})


def test_a_running_job_whose_claim_is_dead_is_lost(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "smoke")
    ledger.append({"event": "planned", "job_id": JOB, "run_name": "smoke_x"})
    ledger.append({"event": "dispatched", "job_id": JOB, "run_name": "smoke_x"})
    _record(ledger, RUNNING)
    _, claim = claims.take(ledger.root, JOB, ticket="a", transport={"kind": "local"})
    state = ledger.states()[JOB]
    assert state.status == RUNNING and state.claim.startswith("claimed by")
    pid, start = _dead_pid()
    claims.renew(claim, owner=_owner(pid, start))  # as if its process had been killed
    state = ledger.states()[JOB]
    assert state.status == LOST and "is gone" in state.claim


def test_a_released_claim_after_the_final_record_is_not_lost(tmp_path: Path) -> None:
    """The fold read RUNNING, then the job wrote FINISHED and released its claim before
    the fold looked at the claim: the job is FINISHED, never LOST."""
    ledger = Ledger(tmp_path, "smoke")
    ledger.append({"event": "planned", "job_id": JOB, "run_name": "smoke_x"})
    _record(ledger, RUNNING)
    _, claim = claims.take(ledger.root, JOB, ticket="a", transport={})
    first_fold = ledger._fold()
    _record(ledger, FINISHED)
    claims.release(claim, FINISHED)
    assert claims.mark_lost(ledger, first_fold)[JOB].status == FINISHED


def test_a_running_record_without_a_claim_is_judged_by_its_process(tmp_path: Path) -> None:
    """Records of a tmgg without claims: LOST only when provably dead (same host, no pid)."""
    ledger = Ledger(tmp_path, "smoke")
    pid, _ = _dead_pid()
    ledger.write_job_record(JOB, {"job_id": JOB, "run_name": "smoke_x", "status": RUNNING,
                                  "host": host(), "pid": pid})
    assert ledger.states()[JOB].status == LOST
    ledger.write_job_record(JOB, {"job_id": JOB, "run_name": "smoke_x", "status": RUNNING,
                                  "host": "gpu-node-7", "pid": pid})
    assert ledger.states()[JOB].status == RUNNING  # cannot tell from here
