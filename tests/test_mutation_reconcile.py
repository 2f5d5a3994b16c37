"""Reconcile's verdict and advice per job (tmgg.cli.reconcile), pinned down where
mutation testing found them unexamined (issue 25): each status a user reads in the
table, its detail, the command it advises, and where a misrouted run is searched for.

Fast and in-process (plain PlannedJobs, JobStates and RunEvidence; the run files and
the W&B API are exercised against real wandb in tests/test_reconcile.py): part of
``make mutate``'s selection.
"""

from __future__ import annotations

import shlex
from pathlib import Path
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


# -- evidence: wandb's run logs on disk, and the runs the API lists ----------------------
def log_file(records: list[bytes], torn_tail: bool = False) -> bytes:
    """A run log in wandb's framing (a ":W&B" header, then LevelDB-log records of at most
    one 32 KiB block each, split FIRST/MIDDLE/LAST across blocks), as its writer makes."""
    import struct
    import zlib

    data = bytearray(b":W&B" + b"\x00\x00\x00")
    for payload in records:
        rest, first = payload, True
        while True:
            room = 32768 - len(data) % 32768
            if room < 7:  # the block's trailer: zeros, then the next block
                data += b"\x00" * room
                continue
            chunk, rest = rest[:room - 7], rest[room - 7:]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            checksum = zlib.crc32(chunk, zlib.crc32(bytes([kind])))
            data += struct.pack("<IHB", checksum, len(chunk), kind) + chunk
            first = False
            if not rest:
                break
    if torn_tail:
        data += struct.pack("<IHB", 0, 50, 1) + b"cut"
    return bytes(data)


def run_records(run_id: str, exit_code: int | None, history: int = 2) -> list[bytes]:
    from wandb.proto import wandb_internal_pb2 as pb

    run = pb.Record()
    run.run.run_id, run.run.entity, run.run.project = run_id, "team", "proj"
    run.run.display_name, run.run.run_group = "st_run", "st"
    item = run.run.config.update.add()
    item.key, item.value_json = "seed", "1"
    records = [run.SerializeToString()]
    config = pb.Record()
    bad = config.config.update.add()
    bad.key, bad.value_json = "broken", "{not json"
    nested = config.config.update.add()
    nested.nested_key.extend(["model", "k"])
    nested.value_json = "8"
    records.append(config.SerializeToString())
    for step in range(history):
        row = pb.Record()
        row.history.step.num = step
        records.append(row.SerializeToString())
    records.append(b"\xff\xff not a record")
    if exit_code is not None:
        done = pb.Record()
        done.exit.exit_code = exit_code
        records.append(done.SerializeToString())
    return records


def test_a_run_log_is_read_across_blocks_and_up_to_a_torn_tail(tmp_path: Path) -> None:
    from tmgg.cli.reconcile import iter_records, read_run_file

    payloads = [b"a" * 10, b"b" * 40000, b"c" * 70000, b"d"]
    assert list(iter_records(log_file(payloads))) == payloads
    assert list(iter_records(log_file(payloads[:2], torn_tail=True))) == payloads[:2]
    corrupt = bytearray(log_file([b"x" * 5, b"y" * 5]))
    corrupt[-1] ^= 0xFF  # the last record's checksum no longer matches
    assert list(iter_records(bytes(corrupt))) == [b"x" * 5]
    # A record that leaves fewer than 7 bytes of its block: the writer pads the rest.
    trailer = log_file([b"p" * (32768 - 7 - 7 - 3), b"next"])
    assert trailer[32765:32768] == b"\x00\x00\x00"
    assert list(iter_records(trailer)) == [b"p" * 32751, b"next"]
    # Exactly 7 bytes left: an empty FIRST fragment there, the payload in the next block.
    exact = log_file([b"q" * (32768 - 7 - 7 - 7), b"split"])
    assert list(iter_records(exact)) == [b"q" * 32747, b"split"]
    padded = log_file([b"z"]) + b"\x00" * 20 + log_file([b"after"])[7:]
    assert list(iter_records(padded)) == [b"z"]  # zero padding: the writer stopped there
    path = tmp_path / "run-abc.wandb"
    path.write_bytes(log_file(run_records("abc", 0, history=3)))
    info = read_run_file(path)
    assert info is not None
    assert (info.run_id, info.entity, info.project, info.name, info.group) == (
        "abc", "team", "proj", "st_run", "st")
    assert (info.exit_code, info.history_rows, info.state) == (0, 3, "finished")
    assert info.config == {"seed": 1, "model": {"k": 8}}
    path.write_bytes(log_file(run_records("", None)))
    unfinished = read_run_file(path)
    assert unfinished is not None and unfinished.run_id == "abc"  # from the file name
    assert unfinished.state == "running"
    from wandb.proto import wandb_internal_pb2 as pb

    done = pb.Record()
    done.exit.exit_code = 254
    path.write_bytes(log_file([done.SerializeToString()]))  # no run record: nothing known
    crashed = read_run_file(path)
    assert crashed is not None and crashed.path == path and crashed.state == "crashed"
    assert (crashed.entity, crashed.project, crashed.name, crashed.group) == ("", "", "", "")
    (tmp_path / "other.wandb").write_bytes(b"not a run log")
    assert read_run_file(tmp_path / "other.wandb") is None


def test_local_evidence_keeps_the_newest_log_of_each_run(tmp_path: Path) -> None:
    import os

    from tmgg.cli.reconcile import local_evidence, run_files

    output = tmp_path / "out"
    assert run_files(output) == []
    older = output / "wandb/offline-run-1-abc/run-abc.wandb"
    newer = output / "wandb/run-2-abc/run-abc.wandb"
    for path, code in ((older, 1), (newer, 0)):
        path.parent.mkdir(parents=True)
        path.write_bytes(log_file(run_records("abc", code)))
    os.utime(newer, (2, 2))
    os.utime(older, (1, 1))  # and the newest by time is not the last by name
    newest = output / "wandb/offline-run-0-abc/run-abc.wandb"
    newest.parent.mkdir()
    newest.write_bytes(log_file(run_records("abc", 0)))
    (output / "wandb/offline-run-9-x").mkdir()
    garbage = output / "wandb/offline-run-9-x/run-x.wandb"
    garbage.write_bytes(b"garbage")
    os.utime(garbage, (0, 0))  # read first: a log that is not one hides nothing
    assert run_files(output) == [garbage, older, newer, newest]
    evidence = local_evidence([output, output])  # one folder listed twice: read once
    assert evidence == [RunEvidence(id="abc", entity="team", project="proj", name="st_run",
                                    group="st", state="finished", source=str(newest))]


def test_api_evidence_searches_each_path_and_names_what_it_could_not_read() -> None:
    from types import SimpleNamespace

    from tmgg.cli.reconcile import Unreadable, api_evidence

    listed = SimpleNamespace(id="r1", entity=None, project=None, name="st_run", group="st",
                             state="finished")
    elsewhere = SimpleNamespace(id="r9", entity="moved", project="p2", name="", group=None,
                                state=None)
    asked: list[tuple[str, Any]] = []

    class Api:
        def runs(self, path: str, filters: Any = None) -> list[Any]:
            asked.append((path, filters))
            if path == "team/proj":
                return [listed, listed, elsewhere]
            if path.startswith("mine/"):
                raise ValueError("Could not find project proj")
            if path.startswith("theirs/"):
                raise ValueError("Could not find project x")
            raise ConnectionError("  rate\n limited ")

    notes: list[str] = []
    unreadable: list[Unreadable] = []
    found = api_evidence(Api(), ["team/proj", "mine/proj", "theirs/proj", "down/proj"], "st",
                         [job()], notes, unreadable, visible=["mine"])
    assert found == [RunEvidence(id="r1", entity="team", project="proj", name="st_run",
                                 group="st", state="finished", source="api"),
                     RunEvidence(id="r9", entity="moved", project="p2", name="", group="",
                                 state="unknown", source="api")]
    assert notes == ["no project mine/proj (searched; the key's user belongs to mine)"]
    assert unreadable == [
        Unreadable("theirs/proj", "the key's user cannot read entity theirs, or theirs/proj "
                                  "does not exist (W&B answers the same for both)"),
        Unreadable("down/proj", "ConnectionError: rate limited")]
    filters = asked[0][1]
    assert filters == {"$or": [{"group": "st"}, {"name": {"$in": sorted(own_run_ids(job()))}},
                               {"displayName": {"$in": ["st_run"]}}]}
    only_notes: list[str] = []
    api_evidence(Api(), ["down/proj"], "st", [job()], only_notes)
    assert only_notes == ["could not read runs of down/proj: ConnectionError: rate limited"]


class ListingApi:
    """What reconcile reads of ``wandb.Api``: its viewer and the runs of a path."""

    def __init__(self, runs_at: dict[str, list[Any]], viewer: Any = None) -> None:
        from types import SimpleNamespace

        self.runs_at = runs_at
        self.viewer = viewer or SimpleNamespace(entity="alice", username="alice", teams=[])
        self.paths: list[str] = []

    def runs(self, path: str, filters: Any = None) -> list[Any]:
        self.paths.append(path)
        return self.runs_at.get(path, [])


def listed(run_id: str, name: str = "st_run", run_state: str = "finished") -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(id=run_id, entity=None, project=None, name=name, group="st",
                           state=run_state)


def test_online_reconcile_judges_each_job_from_the_runs_it_finds() -> None:
    from tmgg.cli.reconcile import reconcile_jobs

    api = ListingApi({PIN: [listed(OWN)], "alice/proj": [listed("zz", name="other")]})
    csv = PlannedJob(index=1, job_id="st-csv0000000", run_name="csv_run", stage="st",
                     overrides=[], sweep_config=None, task_config={"logger": {"name": "csv"}})
    foreign = PlannedJob(index=2, job_id="x", run_name="x", stage="st", overrides=[],
                         sweep_config=None, task_config={}, is_tmgg_job=False)
    notes: list[str] = []
    rows = reconcile_jobs([job(), csv, foreign], {JOB_ID: state(FINISHED)}, "st", mode="online",
                          api=api, notes=notes, overrides=OV)
    assert [(r.run_name, r.status, r.advice) for r in rows] == [
        ("st_run", OK, ""), ("csv_run", MISSING, "tmgg-sweep resume stage=st")]
    assert api.paths == ["team/proj", "alice/proj", "alice/uncategorized"]
    assert notes == []
    missing = reconcile_jobs([job()], {JOB_ID: state(FINISHED)}, "st", mode="online",
                             api=ListingApi({}))
    assert missing[0].detail == ("the ledger says finished, but no run of this job was found "
                                 f"at team/proj on {HOST}")


def test_what_could_not_be_read_makes_a_verdict_unknown() -> None:
    from tmgg.cli.reconcile import reconcile_jobs

    class NoViewer(ListingApi):
        @property
        def viewer(self) -> Any:
            raise ConnectionError("refused")

        @viewer.setter
        def viewer(self, value: Any) -> None:
            pass

    notes: list[str] = []
    rows = reconcile_jobs([job()], {JOB_ID: state(FINISHED)}, "st", mode="online",
                          api=NoViewer({PIN: [listed(OWN)]}), notes=notes, overrides=OV)
    assert rows[0].status == UNKNOWN
    assert rows[0].detail == (f"could not read the key's user on {HOST} (ConnectionError: "
                              "refused); from what was read: missing (the ledger says "
                              f"finished, but no run of this job was found at team/proj on "
                              f"{HOST})")
    assert rows[0].advice == "tmgg-sweep reconcile --online stage=st"
    assert notes == [f"could not read the key's user on {HOST} on {HOST}: ConnectionError: "
                     "refused"]
    # A duplicate stays a duplicate whatever was not read.
    class Partial(ListingApi):
        def runs(self, path: str, filters: Any = None) -> list[Any]:
            if path == "alice/uncategorized":
                raise ConnectionError("down")
            return super().runs(path, filters)

    dup = reconcile_jobs([job()], {JOB_ID: state(FINISHED)}, "st", mode="online",
                         api=Partial({PIN: [listed(OWN)], "alice/proj": [listed(OWN)]}))
    assert dup[0].status == DUPLICATED


def test_offline_reconcile_reads_the_jobs_own_run_logs(tmp_path: Path) -> None:
    from tmgg.cli.reconcile import reconcile_jobs

    output = tmp_path / "out"
    run_dir = output / "wandb/offline-run-1-x"
    run_dir.mkdir(parents=True)
    earlier = wandb_run_id(JOB_ID, 0)
    (run_dir / f"run-{earlier}.wandb").write_bytes(log_file(run_records(earlier, 0)))
    rows = reconcile_jobs([job(1)], {JOB_ID: state(FINISHED, output_dir=str(output))}, "st")
    # generation 1's job: the generation-0 run in its folder is an earlier one, not its own
    assert rows[0].status == MISSING
    assert rows[0].detail.startswith(
        f"the ledger says finished, but no run of this job was found in wandb's run files "
        f"under {output / 'wandb'}, ")
    assert rows[0].detail.endswith("(offline evidence: W&B itself was not asked; "
                                   "`tmgg-sweep reconcile --online` asks it)")
    own = reconcile_jobs([job()], {JOB_ID: state(FINISHED, output_dir=str(output))}, "st")
    assert (own[0].status, own[0].run_ids) == (OK, [earlier])


def test_reconciles_command_line() -> None:
    from tmgg.cli.reconcile import DEFAULT_API_TIMEOUT, parse_args

    args = parse_args(["stage=st", "--online", "--search-entity", "a", "--search-entity",
                       "b/p", "--workers-entity", "w", "seed=1"])
    assert (args.mode, args.search_entity, args.workers_entity, args.overrides,
            args.api_timeout) == ("online", ["a", "b/p"], ["w"], ["stage=st", "seed=1"],
                                  DEFAULT_API_TIMEOUT)
    assert parse_args(["--offline"]).mode == "offline"
    assert parse_args([]).mode == "auto" and parse_args(["--mode", "online"]).mode == "online"
    assert parse_args(["--api-timeout", "5"]).api_timeout == 5


def test_the_table_a_user_reads(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.cli.reconcile import print_table

    monkeypatch.setenv("COLUMNS", "200")
    rows = [Row("1", "run_a", OK, PIN, run_ids=["r1"], ledger_status=FINISHED),
            Row("2", "run_b", MISSING, PIN, ledger_status=PLANNED, detail="ledger: [x] y",
                advice="tmgg-sweep resume stage=st"),
            Row("3", "run_c", FAILED_STATUS, PIN, run_ids=["r2", "r3"], ledger_status=FAILED,
                detail="boom", advice="tmgg-sweep resume stage=st"),
            Row("4", "run_d", MISSING, PIN, advice="tmgg-sweep relog stage=st")]
    print_table(rows, "reconcile: stage st", "online", notes=["a note"])
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines() if line.strip()]
    assert lines[0] == "reconcile: stage st → team/proj"  # one destination: in the title
    assert "destination" not in out
    assert "job status ledger run id detail" in lines
    assert "run_a ok FINISHED r1" in lines
    assert "run_b missing PLANNED ledger: [x] y" in lines  # markup-like text shown as is
    assert "run_c failed FAILED r2, r3 boom" in lines
    # Each command once, whole on its own line, after the jobs it brings back by status.
    assert out.splitlines()[-7:] == [
        "advice: run each command as printed to bring its jobs back to ok",
        "missing: run_b; failed: run_c", "  tmgg-sweep resume stage=st",
        "missing: run_d", "  tmgg-sweep relog stage=st",
        "note: a note",
        "4 expected jobs (online evidence): 1 failed, 2 missing, 1 ok"]


def test_the_table_of_several_destinations_and_of_none(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.cli.reconcile import print_table

    monkeypatch.setenv("COLUMNS", "200")
    print_table([Row("1", "a", OK, "t/p"), Row("2", "b", MISROUTED, "t/q", detail="x")],
                "reconcile: stage st", "offline")
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()
             if line.strip()]
    assert lines[0] == "reconcile: stage st"
    assert "job status ledger destination run id detail" in lines
    assert "b misrouted - t/q x" in lines
    assert "advice:" not in " ".join(lines)
    assert lines[-1] == "2 expected jobs (offline evidence): 1 misrouted, 1 ok"
    print_table([], "reconcile: stage st", "offline")
    assert capsys.readouterr().out.splitlines()[-1] == \
        "0 expected jobs (offline evidence): none"


def test_a_jobs_planned_folder_is_under_its_outputs_dir(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.cli.reconcile import job_output_dirs

    monkeypatch.chdir(tmp_path)
    bare = PlannedJob(index=0, job_id=JOB_ID, run_name="r", stage="st", overrides=[],
                      sweep_config=None, task_config={})
    assert job_output_dirs(bare, None) == [tmp_path / "outputs/st/r-0123456789"]
    relative = PlannedJob(index=0, job_id=JOB_ID, run_name="r", stage="st", overrides=[],
                          sweep_config=None, task_config={"outputs_dir": "out"})
    assert job_output_dirs(relative, state(FINISHED, output_dir="/rec")) == [
        Path("/rec"), tmp_path / "out/st/r-0123456789"]


def test_the_command_reports_every_expected_job_and_fails_unless_all_are_ok(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``tmgg-sweep reconcile`` in-process on a composed smoke job that never ran."""
    from tmgg.cli.reconcile import main
    from tmgg.jobs.ledger import Ledger

    monkeypatch.setenv("COLUMNS", "200")
    overrides = ["stage=smoke", "model=linear_pe", "seed=1", "logger=csv",
                 f"experiments_dir={tmp_path / 'experiments'}",
                 f"outputs_dir={tmp_path / 'outputs'}"]
    assert main([*overrides, "--offline", "--search-entity", "someone"]) == 1
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines() if line.strip()]
    assert lines[0] == "reconcile: stage smoke → (no W&B)"
    assert any(line.startswith("smoke_linear_pe_") and " missing - " in line
               and line.endswith("not in the ledger: never launched") for line in lines)
    assert "note: --search-entity is used online only; offline, every run file in a job's " \
           "output dir is read whatever its entity" in " ".join(lines)
    assert "note: offline evidence: only wandb's run files in the jobs' output dirs were " \
           "read; W&B itself was not asked (`--online` asks it)" in " ".join(lines)
    assert lines[-1] == "1 expected jobs (offline evidence): 1 missing"
    # Once its record says FINISHED, the csv job is ok and the command succeeds.
    from tmgg.jobs.compose import compose_sweep

    (planned,) = compose_sweep(overrides).jobs
    ledger = Ledger(tmp_path / "experiments", "smoke")
    ledger.write_job_record(planned.job_id, {"job_id": planned.job_id, "status": "FINISHED"})
    assert main([*overrides, "--mode", "offline"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "1 expected jobs (offline evidence): 1 ok"


def test_a_finished_offline_job_with_its_run_files_is_advised_sync(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run_dir = output / "wandb/offline-run-1-x"
    run_dir.mkdir(parents=True)
    (run_dir / f"run-{OWN}.wandb").write_bytes(log_file(run_records(OWN, 0)))
    offline = state(FINISHED, output_dir=str(output), wandb={"mode": "offline"})
    assert advice(row(MISSING), job(), offline, OV) == "tmgg-sweep sync stage=st"
    online = state(FINISHED, output_dir=str(output), wandb={"mode": "online"})
    assert advice(row(MISSING), job(), online, OV) == "tmgg-sweep relog stage=st"
    no_files = state(FINISHED, output_dir=str(tmp_path / "empty"), wandb={"mode": "offline"})
    assert advice(row(MISSING), job(), no_files, OV) == "tmgg-sweep relog stage=st"
    # A foreign run of a finished job: relog, and delete the stray run.
    assert advice(row(FOREIGN, "team/proj/zzz (finished) has"), job(), offline, OV) == \
        "tmgg-sweep relog stage=st && " + delete_run_command(HOST, "team/proj/zzz")


def test_the_viewer_keeps_the_keys_username_and_teams() -> None:
    from types import SimpleNamespace

    person = SimpleNamespace(entity="e", username="u", teams=["t1", "t2"])
    assert key_viewer(SimpleNamespace(viewer=person)) == Viewer("e", "u", ("t1", "t2"))
    assert key_viewer(SimpleNamespace(viewer=SimpleNamespace())) == Viewer(None, None, ())
    with pytest.raises(ValueError) as no_user:
        key_viewer(SimpleNamespace(viewer=None))
    assert str(no_user.value) == "the W&B API key has no user on this host"
