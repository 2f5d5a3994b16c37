"""How the ledger folds events and job records into one state per job (tmgg.jobs.ledger),
pinned down where mutation testing found it unexamined (issue 25): every event kind,
which record wins over which event, and what each state carries for ``tmgg-sweep
status``, resume and reconcile.

``Ledger._fold`` is the fold before the claims are judged (``states()`` = ``mark_lost``
of it): in-flight states are asserted on it, so that no claim file is needed.
Fast and in-process: part of ``make mutate``'s selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmgg.jobs.ledger import (
    CANCELLED,
    DISPATCHED,
    FAILED,
    FINISHED,
    MISSING,
    PLANNED,
    RUNNING,
    SKIPPED,
    Ledger,
    atomic_write_json,
)


def planned(job_id: str, overrides: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"event": "planned", "job_id": job_id, "run_name": f"run_{job_id}",
            "overrides": overrides if overrides is not None else [f"seed={job_id}"], **extra}


def record(job_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "status": status, **extra}


def test_planned_jobs_fold_in_plan_order_with_their_names_and_overrides(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([planned("b"), planned("a", ["x=1"]), {"event": "planned", "job_id": ""}])
    states = ledger._fold()
    assert list(states) == ["b", "a"]  # plan order; an event without a job id is no job
    a = states["a"]
    assert (a.job_id, a.run_name, a.status, a.overrides) == ("a", "run_a", PLANNED, ["x=1"])
    assert a.plan["event"] == "planned" and a.plan["overrides"] == ["x=1"]
    assert (a.call_id, a.claim, a.superseded_by, a.record) == (None, None, None, {})
    # Planned again with other overrides: the newest plan's.
    ledger.append(planned("a", ["x=2"]))
    assert ledger._fold()["a"].overrides == ["x=2"]


def test_an_event_before_the_plan_starts_the_job_missing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append({"event": "cancelled", "job_id": "j"})
    ledger.append({"event": "superseded", "job_id": "k"})
    states = ledger._fold()
    assert states["j"].status == CANCELLED and states["j"].run_name == ""
    assert states["k"].status == MISSING and states["k"].overrides == []
    ledger.append(planned("k"))
    assert ledger._fold()["k"].status == PLANNED  # a plan promotes only a MISSING job
    ledger.append(planned("j"))
    assert ledger._fold()["j"].status == CANCELLED


def test_dispatch_outcome_and_cancel_move_the_status(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([planned("j"), {"event": "dispatched", "job_id": "j", "call_id": "fc-1"}])
    state = ledger._fold()["j"]
    assert state.status == DISPATCHED and state.call_id == "fc-1"
    ledger.append({"event": "dispatched", "job_id": "j"})  # a re-dispatch without a call id
    assert ledger._fold()["j"].call_id == "fc-1"
    ledger.append({"event": "dispatched", "job_id": "j", "call_id": "fc-2"})
    assert ledger._fold()["j"].call_id == "fc-2"
    ledger.append({"event": "outcome", "job_id": "j", "status": FAILED, "error": "boom"})
    state = ledger._fold()["j"]
    assert state.status == FAILED and state.error == "boom"
    assert state.record["event"] == "outcome" and state.record["status"] == FAILED
    ledger.append({"event": "outcome", "job_id": "j", "metrics": {"m": 1}})  # no status
    state = ledger._fold()["j"]
    assert state.status == FAILED and state.error == "boom" and state.metrics == {"m": 1}
    ledger.append({"event": "cancelled", "job_id": "j"})
    assert ledger.states()["j"].status == CANCELLED


def test_a_skip_applies_only_to_a_job_not_run_to_an_end(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([
        planned("p"), {"event": "skipped", "job_id": "p", "reason": "held by sweep 2"},
        planned("d"), {"event": "dispatched", "job_id": "d"},
        {"event": "skipped", "job_id": "d", "reason": "claimed"},
        planned("f"), {"event": "outcome", "job_id": "f", "status": FINISHED},
        {"event": "skipped", "job_id": "f", "reason": "finished already"},
        planned("c"), {"event": "cancelled", "job_id": "c"},
        {"event": "skipped", "job_id": "c", "reason": "late"},
        {"event": "skipped", "job_id": "m", "reason": "never planned"},
    ])
    states = ledger._fold()
    assert (states["p"].status, states["p"].claim) == (SKIPPED, "held by sweep 2")
    assert (states["d"].status, states["d"].claim) == (SKIPPED, "claimed")
    assert (states["f"].status, states["f"].claim) == (FINISHED, None)
    assert (states["c"].status, states["c"].claim) == (CANCELLED, None)
    assert (states["m"].status, states["m"].claim) == (SKIPPED, "never planned")


def test_superseded_names_the_current_job_until_planned_again(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([planned("old"), {"event": "superseded", "job_id": "old", "by": "new"},
                        planned("x"), {"event": "superseded", "job_id": "x"}])
    states = ledger._fold()
    assert states["old"].superseded_by == "new" and states["old"].status == PLANNED
    assert states["x"].superseded_by == "?"
    ledger.append(planned("old"))
    assert ledger._fold()["old"].superseded_by is None


def test_a_jobs_own_record_is_the_truth_except_a_stale_running(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([
        planned("planned_running"),
        planned("dispatched_finished"), {"event": "dispatched", "job_id": "dispatched_finished"},
        planned("dispatched_running"), {"event": "dispatched", "job_id": "dispatched_running"},
        planned("skipped_running"), {"event": "skipped", "job_id": "skipped_running"},
        planned("cancelled_running"), {"event": "cancelled", "job_id": "cancelled_running"},
        planned("failed_finished"),
        {"event": "outcome", "job_id": "failed_finished", "status": FAILED, "error": "lost"},
    ])
    for job_id, status in (("planned_running", RUNNING), ("dispatched_finished", FINISHED),
                           ("dispatched_running", RUNNING), ("skipped_running", RUNNING),
                           ("cancelled_running", RUNNING), ("failed_finished", FINISHED),
                           ("unplanned", FAILED)):
        ledger.write_job_record(job_id, record(job_id, status, run_name=f"own_{job_id}",
                                               overrides=["o=1"]))
    states = ledger._fold()
    assert {job_id: s.status for job_id, s in states.items()} == {
        "planned_running": RUNNING, "dispatched_finished": FINISHED,
        "dispatched_running": RUNNING, "skipped_running": RUNNING,
        "cancelled_running": CANCELLED,  # the launcher cancelled it after its last write
        "failed_finished": FINISHED, "unplanned": FAILED}
    # The job's record replaces what the outcome event said.
    assert states["failed_finished"].record == record(
        "failed_finished", FINISHED, run_name="own_failed_finished", overrides=["o=1"])
    assert states["failed_finished"].error is None
    # A record of a job never planned here is a job of its own, named by its record.
    unplanned = states["unplanned"]
    assert (unplanned.run_name, unplanned.overrides) == ("own_unplanned", ["o=1"])
    assert states["planned_running"].run_name == "run_planned_running"


def test_records_are_written_whole_and_read_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    assert ledger.job_records() == {} and ledger.job_record("j") is None
    ledger.write_job_record("j", record("j", FINISHED, metrics={"test/mse": 0.5}))
    path = tmp_path / "s/jobs/j.json"
    assert json.loads(path.read_text()) == record("j", FINISHED, metrics={"test/mse": 0.5})
    assert ledger.job_records() == {"j": record("j", FINISHED, metrics={"test/mse": 0.5})}
    assert ledger.is_finished("j") and not ledger.is_finished("k")
    (tmp_path / "s/jobs/k.json").write_text("{torn")
    assert list(ledger.job_records()) == ["j"]  # the damaged one is left out
    assert [d.path.name for d in ledger.damaged_files()] == ["k.json"]
    assert not list((tmp_path / "s/jobs").glob(".*"))  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644  # collaborators on a shared FS read it
    assert path.read_text().endswith("}\n")
    nested = tmp_path / "deep/er/file.json"
    atomic_write_json(nested, {"b": 1, "a": [1, 2]})
    assert json.loads(nested.read_text()) == {"b": 1, "a": [1, 2]}
    assert [p.name for p in nested.parent.iterdir()] == ["file.json"]
