"""Issue 24: ``tmgg-sweep fsck`` names every inconsistency of a stage's files, explains
it, and passes only once each is acknowledged by tmgg's own ``acknowledged`` event."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tmgg.cli.fsck import main as fsck_main
from tmgg.jobs.fsck import check_stage
from tmgg.jobs.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]
CLEAN_STAGE = "stage1_legacy_fp64"  # committed, 36 jobs, no findings


@pytest.fixture
def stage_copy(tmp_path: Path) -> Ledger:
    """A copy of a committed stage under tmp_path/experiments."""
    shutil.copytree(REPO / "experiments" / CLEAN_STAGE, tmp_path / "experiments" / CLEAN_STAGE)
    return Ledger(tmp_path / "experiments", CLEAN_STAGE)


def _fsck(ledger: Ledger, *extra: str) -> int:
    return fsck_main([f"stage={ledger.stage}", f"experiments_dir={ledger.experiments_dir}",
                      *extra])


def _lines(ledger: Ledger) -> list[dict]:
    return [json.loads(line) for line in ledger.events_path.read_text().splitlines() if line]


def _rewrite(ledger: Ledger, events: list[dict]) -> None:
    ledger.events_path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_a_committed_stage_copy_is_clean(stage_copy: Ledger,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _fsck(stage_copy) == 0
    assert "ok" in capsys.readouterr().out


def test_every_committed_stage_passes_fsck(capsys: pytest.CaptureFixture[str]) -> None:
    """What `make fsck` (CI) runs: the committed findings are all acknowledged."""
    assert fsck_main(["--all", f"experiments_dir={REPO / 'experiments'}"]) == 0, \
        capsys.readouterr().out


def test_a_missing_dispatched_event_is_named_and_explained(
        stage_copy: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    events = _lines(stage_copy)
    dropped = next(e for e in events if e["event"] == "dispatched")
    _rewrite(stage_copy, [e for e in events if e is not dropped])
    assert _fsck(stage_copy) == 1
    out = capsys.readouterr().out
    assert f"no-dispatch:{dropped['job_id']}" in out
    assert "what to do:" in out
    assert [f.id for f in check_stage(stage_copy).unexplained] == \
        [f"no-dispatch:{dropped['job_id']}"]


def test_acknowledging_appends_an_event_and_passes(
        stage_copy: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    events = _lines(stage_copy)
    dropped = [e for e in events if e["event"] == "dispatched"][:2]
    _rewrite(stage_copy, [e for e in events if e not in dropped])
    before = len(_lines(stage_copy))
    assert _fsck(stage_copy, "--acknowledge", "no-dispatch:*") == 2  # no reason: refused
    assert len(_lines(stage_copy)) == before
    assert _fsck(stage_copy, "--acknowledge", "no-dispatch:*",
                 "--reason", "dispatch documented in NOTES.md") == 0
    acknowledged = [e for e in _lines(stage_copy) if e["event"] == "acknowledged"]
    assert sorted(e["finding"] for e in acknowledged) == \
        sorted(f"no-dispatch:{e['job_id']}" for e in dropped)
    assert all(e["reason"] == "dispatch documented in NOTES.md" for e in acknowledged)
    # The acknowledged jobs keep their status; nothing new appears as a job.
    states = stage_copy.states()
    assert len(states) == 36 and {s.status for s in states.values()} == {"FINISHED"}
    # A pattern that matches nothing is refused, and a new finding is not covered.
    assert _fsck(stage_copy, "--acknowledge", "no-such:*", "--reason", "x") == 2
    capsys.readouterr()


def test_outcome_without_record_and_orphan_record(stage_copy: Ledger,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    records = sorted(stage_copy.jobs_dir.glob("*.json"))
    removed = records[0]
    removed.unlink()
    orphan = json.loads(records[1].read_text())
    orphan["job_id"] = "stage1_legacy_fp64-0000000000"
    (stage_copy.jobs_dir / f"{orphan['job_id']}.json").write_text(json.dumps(orphan))
    assert _fsck(stage_copy) == 1
    out = capsys.readouterr().out
    assert f"outcome-without-record:{removed.stem}" in out
    assert "orphan-record:stage1_legacy_fp64-0000000000" in out


def test_dirty_tree_status_mismatch_and_redispatch(stage_copy: Ledger) -> None:
    path = sorted(stage_copy.jobs_dir.glob("*.json"))[0]
    record = json.loads(path.read_text())
    record["code"]["git_dirty"] = True
    record["status"] = "FAILED"
    path.write_text(json.dumps(record))
    events = _lines(stage_copy)
    other = sorted(stage_copy.jobs_dir.glob("*.json"))[1].stem
    first = next(i for i, e in enumerate(events)
                 if e["event"] == "dispatched" and e["job_id"] == other)
    events.insert(first + 1, dict(events[first]))  # dispatched again, nothing between
    _rewrite(stage_copy, events)
    found = {f.id for f in check_stage(stage_copy).unexplained}
    assert {f"dirty-tree:{path.stem}", f"status-mismatch:{path.stem}",
            f"redispatched-without-end:{other}"} <= found


def test_damaged_line_orphan_claim_and_output(stage_copy: Ledger, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with stage_copy.events_path.open("a") as handle:
        handle.write('{"event": "outc\n')
    claims = stage_copy.root / "claims"
    claims.mkdir()
    (claims / "stage1_legacy_fp64-ffffffffff.g1.json").write_text(json.dumps(
        {"job_id": "stage1_legacy_fp64-ffffffffff", "owner": {"host": "h", "pid": 1}}))
    outputs = tmp_path / "outputs"
    (outputs / CLEAN_STAGE / "stage1_legacy_fp64_x-eeeeeeeeee").mkdir(parents=True)
    assert _fsck(stage_copy, f"outputs_dir={outputs}") == 1
    out = capsys.readouterr().out
    assert "damaged:ledger.jsonl#L" in out
    assert "orphan-claim:stage1_legacy_fp64-ffffffffff" in out
    assert "orphan-output:stage1_legacy_fp64-eeeeeeeeee" in out


def test_usage_errors(stage_copy: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    assert fsck_main([]) == 2
    assert fsck_main(["stage=nope", f"experiments_dir={stage_copy.experiments_dir}"]) == 2
    assert fsck_main(["model=x", "--all"]) == 2
    capsys.readouterr()


def test_a_takeover_of_a_dead_claim_records_a_lost_event(tmp_path: Path) -> None:
    """Resuming a LOST job leaves a `lost` event before its new dispatch, so fsck finds
    no redispatch without an end."""
    import subprocess
    import sys

    from tmgg.jobs import claims
    from tmgg.jobs.records import host
    from tmgg.jobs.sweep import record_takeover

    ledger = Ledger(tmp_path / "experiments", "smoke")
    job_id = "smoke-0123456789"
    ledger.append_many([{"event": "planned", "job_id": job_id, "run_name": "r"},
                        {"event": "dispatched", "job_id": job_id, "run_name": "r"}])
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = claims.process_start(process.pid)
    process.kill()
    process.wait()
    dead = claims.claims_dir(ledger.root) / f"{job_id}.g1.json"
    dead.parent.mkdir(parents=True)
    dead.write_text(json.dumps({
        "job_id": job_id, "released": False, "ticket": "first",
        "owner": {"host": host(), "boot_id": claims._boot_id(), "pid": process.pid,
                  "start": start, "pid_ns": claims.pid_namespace()}}))
    taken, claim = claims.take(ledger.root, job_id, ticket="second", transport={})
    assert taken and claim.generation == 2
    record_takeover(ledger, job_id, "r", claim, "local")
    ledger.append({"event": "dispatched", "job_id": job_id, "run_name": "r"})
    lost = [e for e in _lines(ledger) if e["event"] == "lost"]
    assert len(lost) == 1 and lost[0]["generation"] == 1
    assert str(process.pid) in lost[0]["reason"]
    assert not [f for f in check_stage(ledger).findings
                if f.kind == "redispatched-without-end"]
    # A hand-over within one dispatch (same ticket) is no loss.
    handed, again = claims.take(ledger.root, job_id, ticket="second", transport={})
    assert handed
    record_takeover(ledger, job_id, "r", again, "local")
    assert len([e for e in _lines(ledger) if e["event"] == "lost"]) == 1
