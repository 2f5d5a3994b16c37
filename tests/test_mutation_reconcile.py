"""Reconcile's verdict and advice per job (tmgg.cli.reconcile), pinned down where
mutation testing found them unexamined (issue 25): each status a user reads in the
table, its detail, the command it advises, and where a misrouted run is searched for.

Fast and in-process (plain PlannedJobs, JobStates and RunEvidence; the run files and
the W&B API are exercised against real wandb in tests/test_reconcile.py): part of
``make mutate``'s selection.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from tmgg.cli.reconcile import (
    DUPLICATED,
    FAILED_STATUS,
    FOREIGN,
    MISROUTED,
    MISSING,
    OK,
    RUNNING_STATUS,
    UNKNOWN,
    Row,
    RunEvidence,
    RunFile,
    Viewer,
    advice,
    advice_groups,
    delete_run_command,
    earlier_run_ids,
    error_detail,
    judge,
    key_viewer,
    own_run_ids,
    search_paths,
    search_paths_for,
)
from tmgg.config.identity import wandb_run_id
from tmgg.jobs.ledger import DISPATCHED, FAILED, FINISHED, PLANNED, PRUNED, RUNNING, JobState
from tmgg.jobs.plan import PlannedJob

JOB_ID = "st-0123456789"
PIN = "team/proj"
HOST = "http://wandb.local"
OV = ["stage=st"]


def job(generation: int = 0, wandb: bool = True, run_name: str = "st_run") -> PlannedJob:
    logger: dict[str, Any] = (
        {"name": "wandb", "entity": "team", "project": "proj", "mode": "offline",
         "base_url": HOST, "run_generation": generation} if wandb else {"name": "csv"})
    return PlannedJob(index=0, job_id=JOB_ID, run_name=run_name, stage="st", overrides=[],
                      sweep_config=None, task_config={"job": {"id": JOB_ID}, "logger": logger})


def state(status: str, error: str | None = None, **record: Any) -> JobState:
    return JobState(job_id=JOB_ID, run_name="st_run", status=status,
                    record={**({"error": error} if error else {}), **record})


def run(run_id: str, destination: str = PIN, run_state: str = "finished",
        name: str = "st_run") -> RunEvidence:
    entity, project = destination.split("/")
    return RunEvidence(id=run_id, entity=entity, project=project, name=name, group="g",
                       state=run_state, source="api")


OWN = wandb_run_id(JOB_ID)


def test_a_csv_job_is_judged_by_the_ledger_alone() -> None:
    csv = job(wandb=False)
    for status in (FINISHED, PRUNED):
        row = judge(csv, state(status), [])
        assert (row.status, row.destination, row.detail) == (OK, "(no W&B)", "")
    failed = judge(csv, state(FAILED, "Traceback\n  RuntimeError: boom\n"), [])
    assert (failed.status, failed.detail) == (FAILED_STATUS, "RuntimeError: boom")
    assert judge(csv, state(RUNNING), []).status == RUNNING_STATUS
    assert judge(csv, state(DISPATCHED), []).detail == ""
    planned = judge(csv, state(PLANNED), [])
    assert (planned.status, planned.detail) == (MISSING, "ledger: PLANNED, no run found")
    never = judge(csv, None, [])
    assert (never.status, never.ledger_status, never.detail) == (
        MISSING, "-", "not in the ledger: never launched")


def test_the_jobs_own_finished_run_at_its_pin_is_ok() -> None:
    row = judge(job(), state(FINISHED), [run(OWN)])
    assert row == Row(JOB_ID, "st_run", OK, PIN, run_ids=[OWN], ledger_status=FINISHED)


def test_runs_only_elsewhere_are_misrouted() -> None:
    row = judge(job(), state(FINISHED), [run(OWN, "alice/proj"), run(OWN, "team/other")])
    assert row.status == MISROUTED
    assert row.detail == (f"found at alice/proj/{OWN} (finished), team/other/{OWN} (finished)")
    assert row.run_ids == [OWN]
    no_entity = judge(job(), state(FINISHED), [run("x1", "/uncategorized")])
    assert no_entity.detail == "found at <no entity>/uncategorized/x1 (finished)"


def test_the_own_run_with_another_anywhere_is_duplicated() -> None:
    row = judge(job(), state(FINISHED), [run(OWN), run("zzz", name="st_run"),
                                         run(OWN, "alice/proj")])
    assert row.status == DUPLICATED
    assert row.detail == (f"runs: team/proj/{OWN} (finished), team/proj/zzz (finished), "
                          f"alice/proj/{OWN} (finished)")
    assert row.run_ids == sorted({OWN, "zzz"})
    assert judge(job(), state(FINISHED), [run(OWN), run(OWN, "a/b")]).status == DUPLICATED


def test_a_run_with_the_jobs_name_but_not_its_id_is_foreign() -> None:
    row = judge(job(), state(FINISHED), [run("zzz")])
    assert row.status == FOREIGN
    assert row.detail == (f"team/proj/zzz (finished) has this job's name but not its run id "
                          f"{OWN}: not this job's run")
    also = judge(job(), state(FINISHED), [run("zzz"), run("yyy", "alice/proj")])
    assert also.detail.endswith("not this job's run; also at alice/proj/yyy (finished)")


def test_no_run_found_follows_the_ledger() -> None:
    done = judge(job(), state(FINISHED), [])
    assert (done.status, done.detail) == (
        MISSING, "the ledger says finished, but no run of this job was found at team/proj")
    looked = judge(job(), state(PRUNED), [], looked="in 3 offline runs")
    assert looked.detail == "the ledger says pruned, but no run of this job was found in " \
                            "3 offline runs"
    failed = judge(job(), state(FAILED, "x\nW&B refuses run id abc\nlater line"), [])
    assert (failed.status, failed.detail) == (FAILED_STATUS, "W&B refuses run id abc")
    assert judge(job(), state(RUNNING), []).status == RUNNING_STATUS
    missing = judge(job(), None, [])
    assert (missing.status, missing.detail) == (MISSING, "not in the ledger: never launched")


def test_the_latest_generations_run_decides() -> None:
    later = wandb_run_id(JOB_ID, 1)
    crashed_then_finished = [run(OWN, run_state="crashed"), run(later)]
    assert judge(job(), state(FINISHED), crashed_then_finished).status == OK
    assert judge(job(), state(FINISHED), [run(later, run_state="crashed"), run(OWN)]).status \
        == FAILED_STATUS
    for bad in ("failed", "crashed", "killed"):
        row = judge(job(), state(FINISHED), [run(OWN, run_state=bad)])
        assert (row.status, row.detail) == (FAILED_STATUS, f"run {OWN} {bad}")
    by_ledger = judge(job(), state(FAILED, "ValueError: nan"), [run(OWN)])
    assert (by_ledger.status, by_ledger.detail) == (FAILED_STATUS, "ValueError: nan")
    running = judge(job(), state(RUNNING), [run(OWN, run_state="running")])
    assert (running.status, running.detail) == (RUNNING_STATUS, f"run {OWN} running")


def test_a_jobs_run_ids_are_its_generation_and_the_next_ones() -> None:
    assert own_run_ids(job()) == [wandb_run_id(JOB_ID, g) for g in range(8)]
    assert own_run_ids(job(2))[0] == wandb_run_id(JOB_ID, 2) and len(own_run_ids(job(2))) == 8
    assert earlier_run_ids(job(2)) == {wandb_run_id(JOB_ID, 0), wandb_run_id(JOB_ID, 1)}
    assert earlier_run_ids(job()) == set()


def test_error_detail_prefers_the_explained_line() -> None:
    assert error_detail("") == ""
    assert error_detail("  a\n\n  b  \n") == "b"
    assert error_detail("W&B refuses run id x\nTraceback\nboom") == "W&B refuses run id x"


def row(status: str, detail: str = "", ledger: str = FINISHED) -> Row:
    return Row(JOB_ID, "st_run", status, PIN, ledger_status=ledger, detail=detail)


def test_the_advice_brings_each_status_back_to_ok() -> None:
    assert advice(row(OK), job(), None, OV) == ""
    assert advice(row(UNKNOWN), job(), None, OV) == "tmgg-sweep reconcile --online stage=st"
    assert advice(row(RUNNING_STATUS), job(), None, OV) == "tmgg-sweep status stage=st"
    assert advice(row(FAILED_STATUS, "W&B refuses run id x"), job(1), None, OV) == (
        "tmgg-sweep resume stage=st logger.run_generation=2")
    assert advice(row(FAILED_STATUS), job(), None, OV) == "tmgg-sweep relog stage=st"
    assert advice(row(FAILED_STATUS, ledger=FAILED), job(), None, OV) == \
        "tmgg-sweep resume stage=st"
    assert advice(row(MISSING), job(), state(FINISHED), OV) == "tmgg-sweep relog stage=st"
    assert advice(row(MISSING, ledger=PLANNED), job(), None, OV) == "tmgg-sweep resume stage=st"
    assert advice(row(DUPLICATED, "runs: team/proj/zzz (finished)"), job(), None, OV) == \
        delete_run_command(HOST, "team/proj/zzz")


def test_a_stray_run_is_deleted_but_never_the_jobs_own() -> None:
    detail = f"found at alice/proj/{OWN} (finished), team/proj/{OWN} (finished)"
    fix = advice(row(MISROUTED, detail), job(), state(FINISHED), OV)
    assert fix == "tmgg-sweep relog stage=st && " + delete_run_command(
        HOST, f"alice/proj/{OWN}")
    foreign = advice(row(FOREIGN, "team/proj/zzz (finished) has", ledger=PLANNED), job(),
                     None, OV)
    assert foreign == "tmgg-sweep resume stage=st && " + delete_run_command(HOST,
                                                                             "team/proj/zzz")
    # The command runs as printed in a shell: the code it runs deletes that run.
    assert shlex.split(delete_run_command(HOST, "a/b/c")) == [
        "python", "-c", "import wandb; wandb.Api(overrides={'base_url': 'http://wandb.local'})"
        ".run('a/b/c').delete()"]


def test_each_advice_is_given_once_with_its_jobs_by_status() -> None:
    rows = [Row("1", "a", MISSING, PIN, advice="resume"), Row("2", "b", OK, PIN),
            Row("3", "c", FAILED_STATUS, PIN, advice="resume"),
            Row("4", "d", MISSING, PIN, advice="resume"), Row("5", "e", MISSING, PIN,
                                                              advice="relog")]
    assert advice_groups(rows) == [("resume", {MISSING: ["a", "d"], FAILED_STATUS: ["c"]}),
                                   ("relog", {MISSING: ["e"]})]


def test_a_misrouted_run_is_searched_where_it_can_land() -> None:
    assert search_paths(["e", "x/y"], ["p", "q"]) == ["e/p", "e/q", "x/y"]
    viewer = Viewer(entity="alice", username="alice_u", teams=("t1", "alice"))
    assert viewer.entities == ["alice", "alice_u", "t1"]
    assert Viewer(entity=None, username=None).entities == []
    assert search_paths_for(["team/proj"], viewer, ["workers"], ["extra", "o/p"]) == [
        "team/proj", "alice/proj", "alice/uncategorized", "workers/proj",
        "workers/uncategorized", "alice_u/proj", "alice_u/uncategorized", "t1/proj",
        "t1/uncategorized", "extra/proj", "o/p"]
    assert search_paths_for(["team/proj"], None) == ["team/proj"]


def test_the_keys_viewer_and_a_run_files_state() -> None:
    class Api:
        def __init__(self, viewer: Any) -> None:
            self.viewer = viewer

    class Person:
        entity, username, teams = "alice", "", ["t"]

    assert key_viewer(Api(Person())) == Viewer(entity="alice", username=None, teams=("t",))
    with pytest.raises(ValueError, match="the W&B API key has no user on this host"):
        key_viewer(Api(None))
    states = [RunFile(path=None, run_id="r", entity="e", project="p", name="n",  # type: ignore[arg-type]
                      group="g", exit_code=code, history_rows=0).state
              for code in (None, 0, 254, 1)]
    assert states == ["running", "finished", "crashed", "failed"]
