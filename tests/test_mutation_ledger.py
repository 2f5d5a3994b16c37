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
import os
from pathlib import Path
from typing import Any

import pytest

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


def test_an_events_first_line_or_a_record_names_the_job_alone(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many([{"event": "skipped", "job_id": "a", "overrides": ["seed=3"]},
                        planned("b", ["x=1"]), {"event": "planned", "job_id": "b"}])
    ledger.write_job_record("bare", {"job_id": "bare", "status": FAILED})
    states = ledger._fold()
    assert states["a"].overrides == ["seed=3"]  # from the first event that names the job
    assert states["b"].overrides == ["x=1"]  # a plan line without overrides keeps them
    bare = states["bare"]
    assert (bare.job_id, bare.run_name, bare.overrides, bare.status) == ("bare", "", [], FAILED)


def test_writes_under_a_lost_claim_are_fenced(tmp_path: Path) -> None:
    from tmgg.jobs import claims

    ledger = Ledger(tmp_path, "s")
    _, mine = claims.take(ledger.root, "j", ticket="a", transport={})
    ledger.append(planned("j"), fence=mine)
    ledger.write_job_record("j", record("j", RUNNING), fence=mine)
    _, theirs = claims.take(ledger.root, "j", ticket="a", transport={})  # a newer generation
    with pytest.raises(claims.ClaimLost):
        ledger.append({"event": "outcome", "job_id": "j", "status": FINISHED}, fence=mine)
    with pytest.raises(claims.ClaimLost):
        ledger.write_job_record("j", record("j", FINISHED), fence=mine)
    assert ledger._fold()["j"].status == RUNNING  # nothing of the fenced writer landed
    ledger.append({"event": "outcome", "job_id": "j", "status": FINISHED}, fence=theirs)


def test_event_lines_are_sorted_json_and_the_file_is_readable_by_all(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.append({"job_id": "j", "event": "planned", "run_name": "r",
                   "output": Path("/out/r")})
    raw = ledger.events_path.read_text()
    assert raw == '{"event": "planned", "job_id": "j", "output": "/out/r", "run_name": "r"}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert ledger.events_path.stat().st_mode & 0o777 == 0o644 & ~umask  # nobody executes it


def test_a_link_made_between_the_check_and_the_open_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A racing process replaces ledger.jsonl by a symbolic link after the link check:
    O_NOFOLLOW refuses to open it and the refusal names the link."""
    from tmgg.jobs.ledger import LinkRefused

    ledger = Ledger(tmp_path, "s")
    ledger.append(planned("a"))
    elsewhere = tmp_path / "elsewhere.jsonl"
    real_open = os.open

    def racing_open(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == ledger.events_path and not ledger.events_path.is_symlink():
            ledger.events_path.unlink()
            ledger.events_path.symlink_to(elsewhere)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(LinkRefused, match="ledger.jsonl is a symbolic link"):
        ledger.append(planned("b"))
    assert not elsewhere.exists()


def test_the_plan_is_written_and_read_back_and_never_through_a_link(tmp_path: Path) -> None:
    from tmgg.jobs.ledger import LinkRefused

    ledger = Ledger(tmp_path, "s")
    assert ledger.plan() is None
    plan = {"stage": "s", "jobs": [{"job_id": "a", "run_name": "r"}]}
    ledger.write_plan(plan)
    assert ledger.plan() == plan
    ledger.plan_path.write_text("{torn")
    assert ledger.plan() is None
    assert [d.path.name for d in ledger.damaged_files()] == ["plan.json"]
    other = Ledger(tmp_path, "t")
    other.root.parent.mkdir(exist_ok=True)
    (tmp_path / "real_t").mkdir()
    other.root.symlink_to(tmp_path / "real_t")
    with pytest.raises(LinkRefused):
        other.write_plan(plan)
    assert not (tmp_path / "real_t/plan.json").exists()


def test_damaged_lines_and_files_are_named_with_line_and_reason(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.events_path.parent.mkdir(parents=True)
    torn = '{"event": "planned", "job_id": "' + "x" * 100
    glued = 'garbage{"event": "planned", "job_id": "g"}'
    ledger.events_path.write_text(json.dumps(planned("a")) + "\n" + torn + "\n" + glued + "\n")
    assert ledger.damaged_lines() == [(2, torn[:80]), (3, glued)]
    claims_dir = ledger.root / "claims"
    claims_dir.mkdir()
    (claims_dir / "a.g1.json").write_text("{")
    (claims_dir / "notes.txt").write_text("{")
    damaged = ledger.damaged_files()
    assert [(d.path, d.line, d.reason) for d in damaged[:2]] == [
        (ledger.events_path, 2, "not one whole JSON object (a torn write?)"),
        (ledger.events_path, 3, "a whole event glued behind torn text")]
    assert [d.path.name for d in damaged[2:]] == ["a.g1.json"]
    assert [e["job_id"] for e in ledger.events()] == ["a", "g"]


def test_a_record_file_removed_while_listing_hides_no_other(tmp_path: Path) -> None:
    from tmgg.jobs import schema
    from tmgg.jobs.ledger import _read_files

    ledger = Ledger(tmp_path, "s")
    ledger.write_job_record("b", record("b", FINISHED))
    listed = [ledger.jobs_dir / "a.json", ledger.jobs_dir / "b.json"]  # a: gone meanwhile
    assert [r["job_id"] for r in _read_files(listed, schema.JobRecordFile)] == ["b"]


def test_records_are_indented_json_of_any_value_and_written_next_to_their_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_tmpdir"))
    path = tmp_path / "records/r.json"
    atomic_write_json(path, {"b": [1], "where": Path("/x")})
    assert path.read_text() == '{\n  "b": [\n    1\n  ],\n  "where": "/x"\n}\n'
    with pytest.raises(IsADirectoryError):  # the rename fails: the temporary file goes
        atomic_write_json(tmp_path / "records", {"a": 1})
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["r.json"]


def test_a_line_of_json_that_is_no_event_is_damaged_and_skipped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.events_path.parent.mkdir(parents=True)
    no_job = '{"event": "planned"}'
    one_char_glued = 'x{"event": "planned", "job_id": "g"}'
    ledger.events_path.write_text("\n".join([no_job, one_char_glued, '"just a string"']) + "\n")
    assert list(ledger.events()) == [{"event": "planned", "job_id": "g"}]
    assert [number for number, _ in ledger.damaged_lines()] == [1, 2, 3]
