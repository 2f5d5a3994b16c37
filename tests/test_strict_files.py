"""Every file under experiments/ is read through one schema: a damaged claim, ledger
line, job record or plan is named (file and line), never crashes a reader, never
blocks a job forever and never grants a claim; no write follows a symbolic link."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs import claims, schema
from tmgg.jobs.ledger import FINISHED, LOST, RUNNING, Ledger, LinkRefused

JOB = "smoke-0123456789ab"
SMOKE = ["stage=smoke", "logger=csv", "model=linear_pe", "trainer.max_steps=20",
         "trainer.val_check_interval=10"]
BAD_CLAIMS = {
    "garbage": b"\x00\xff{{{ not json",
    "null": b"null",
    "list": b"[1]",
    "lease_expires_text": json.dumps({"job_id": JOB, "owner": {"host": "h", "pid": 1},
                                      "lease_expires": "x"}).encode(),
    "empty": b"",
}


def _age(path: Path, seconds: float) -> None:
    """Move a file's mtime back: the file system's clock has moved on by ``seconds``."""
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def _write(root: Path, generation: int, raw: bytes) -> Path:
    path = claims.claims_dir(root) / f"{JOB}.g{generation}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_CLAIMS))
def test_a_damaged_newest_claim_is_held_until_its_lease_runs_out(tmp_path: Path,
                                                                 kind: str) -> None:
    """Over a released generation, too: the damaged newer one is the claim."""
    taken, mine = claims.take(tmp_path, JOB, ticket="old", transport={})
    assert taken and claims.release(mine, FINISHED)
    bad = _write(tmp_path, 3, BAD_CLAIMS[kind])
    newest = claims.current(tmp_path, JOB)
    assert newest is not None and newest.generation == 3 and newest.damaged
    alive, reason = claims.assess(newest)
    assert alive and "unreadable" in reason
    taken, holder = claims.take(tmp_path, JOB, ticket="new", transport={})
    assert not taken and holder.generation == 3
    assert f"unreadable claim file {bad.name}" in holder.describe()

    _age(bad, claims.lease_seconds() + 1)
    alive, reason = claims.assess(claims.current(tmp_path, JOB))
    assert not alive and "lease has run out" in reason
    taken, claim = claims.take(tmp_path, JOB, ticket="new", transport={})
    assert taken and claim.generation == 4
    assert claim.data["took_over"]["damaged"]


def test_a_running_job_under_a_damaged_claim_is_lost_once_its_lease_ran_out(
        tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "smoke")
    ledger.append({"event": "planned", "job_id": JOB, "run_name": "r"})
    ledger.append({"event": "dispatched", "job_id": JOB, "run_name": "r"})
    ledger.write_job_record(JOB, {"job_id": JOB, "run_name": "r", "status": RUNNING})
    bad = _write(ledger.root, 1, b"null")
    assert ledger.states()[JOB].status == RUNNING
    _age(bad, claims.lease_seconds() + 1)
    state = ledger.states()[JOB]
    assert state.status == LOST and "unreadable" in (state.claim or "")
    assert [d.path for d in ledger.damaged_files()] == [bad]


def test_wrong_shape_ledger_lines_records_and_plan_are_named_not_raised(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "smoke")
    ledger.append({"event": "planned", "job_id": JOB, "run_name": "r"})
    with ledger.events_path.open("a") as handle:
        handle.write('{"event": "planned", "job_id": ["x"]}\n')
        handle.write("null\n")
        handle.write(json.dumps({"event": "outcome", "job_id": JOB, "status": 7}) + "\n")
    ledger.jobs_dir.mkdir(parents=True)
    (ledger.jobs_dir / "other.json").write_text('{"job_id": 5, "status": "FINISHED"}')
    ledger.plan_path.write_text('{"stage": "smoke", "jobs": "all"}')
    states = ledger.states()
    assert list(states) == [JOB] and states[JOB].status == "PLANNED"
    assert [number for number, _ in ledger.damaged_lines()] == [2, 3, 4]
    named = {(d.path.name, d.line) for d in ledger.damaged_files()}
    assert named == {("ledger.jsonl", 2), ("ledger.jsonl", 3), ("ledger.jsonl", 4),
                     ("other.json", None), ("plan.json", None)}
    assert ledger.plan() is None and ledger.job_record("other") is None
    with pytest.raises(schema.Damaged, match=r"plan.json is damaged: wrong shape"):
        schema.read(ledger.plan_path, schema.PlanFile)


def test_status_names_every_damaged_file_and_line(sweep_dirs: SweepDirs) -> None:
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    ledger.append({"event": "planned", "job_id": JOB, "run_name": "r"})
    with ledger.events_path.open("a") as handle:
        handle.write('{"event": "planned", "job_id": ["x"]}\n')
    bad = _write(ledger.root, 1, b"[1]")
    result = tmgg_sweep("status", "--json", "--no-poll", "stage=smoke", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = json.loads(result.stdout)["damaged_lines"]
    assert {(Path(n["file"]).name, n["line"]) for n in notes} == {("ledger.jsonl", 2),
                                                                  (bad.name, None)}
    table = tmgg_sweep("status", "--no-poll", "stage=smoke", *sweep_dirs.overrides)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "ledger.jsonl line 2 is damaged" in table.stdout.replace("\n", "")
    assert f"{bad.name} is damaged" in table.stdout.replace("\n", "")


def test_a_sweep_over_damaged_files_runs_what_is_free_and_skips_what_an_unreadable_claim_holds(
        sweep_dirs: SweepDirs) -> None:
    """Garbage claim on one job under Hydra's basic launcher: no crash; that job is
    skipped (held until the lease runs out), the other trains; a wrong-shape ledger line
    is named at sweep start, the plan is still recorded."""
    plan = json.loads(tmgg_sweep("plan", "--json", *SMOKE, *sweep_dirs.overrides).stdout)
    held, free = plan["jobs"]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    ledger.root.mkdir(parents=True)
    ledger.events_path.write_text('{"event": "planned", "job_id": ["x"]}\n')
    bad = claims.claims_dir(ledger.root) / f"{held['job_id']}.g1.json"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage")
    result = tmgg_train("-m", *SMOKE, *sweep_dirs.overrides, "hydra/launcher=basic")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ledger.jsonl line 1 is damaged" in result.stderr
    assert "claimed by an unreadable claim file" in result.stdout + result.stderr
    assert ledger.plan() is not None and len(ledger.plan()["jobs"]) == 2
    assert ledger.job_record(free["job_id"])["status"] == FINISHED
    assert ledger.job_record(held["job_id"]) is None  # not run, nothing recorded for it
    skipped = [e for e in ledger.events() if e["event"] == "skipped"]
    assert [e["job_id"] for e in skipped] == [held["job_id"]]
    assert ledger.states()[held["job_id"]].status == "SKIPPED"

    _age(bad, claims.lease_seconds() + 1)  # the lease of the unreadable claim runs out
    assert ledger.states()[held["job_id"]].status == LOST
    dry = tmgg_sweep("resume", "--dry-run", *SMOKE, *sweep_dirs.overrides)
    assert "1 to run (0 failed, 1 lost" in dry.stdout, dry.stdout


def test_no_write_follows_a_symlink_under_the_experiments_dir(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_text("precious\n")
    ledger = Ledger(tmp_path / "experiments", "smoke")
    ledger.root.mkdir(parents=True)
    ledger.events_path.symlink_to(victim)
    with pytest.raises(LinkRefused, match=r"ledger.jsonl is a symbolic link"):
        ledger.append({"event": "planned", "job_id": JOB})
    assert victim.read_text() == "precious\n"
    ledger.jobs_dir.symlink_to(elsewhere)
    with pytest.raises(LinkRefused, match=r"jobs is a symbolic link"):
        ledger.write_job_record(JOB, {"job_id": JOB, "status": RUNNING})
    claims.claims_dir(ledger.root).symlink_to(elsewhere)
    with pytest.raises(LinkRefused, match=r"claims is a symbolic link"):
        claims.take(ledger.root, JOB, ticket="t", transport={})
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim"]


def test_a_sweep_whose_ledger_is_a_symlink_is_refused_before_dispatch(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    root = sweep_dirs.experiments / "smoke"
    root.mkdir(parents=True)
    (root / "ledger.jsonl").symlink_to(victim)
    result = tmgg_train("-m", *SMOKE, *sweep_dirs.overrides, "hydra/launcher=basic")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sweep refused, nothing dispatched" in result.stderr
    assert "ledger.jsonl is a symbolic link" in result.stderr
    assert victim.read_text() == "precious\n"
    assert not sweep_dirs.outputs.exists() or not list(sweep_dirs.outputs.rglob("*.ckpt"))


def test_a_job_whose_records_folder_is_a_symlink_fails_with_the_reason(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = sweep_dirs.experiments / "smoke"
    root.mkdir(parents=True)
    (root / "jobs").symlink_to(elsewhere)
    started = time.monotonic()
    result = tmgg_train("-m", *SMOKE, "seed=1", *sweep_dirs.overrides, "hydra/launcher=basic")
    assert result.returncode != 0
    assert "jobs is a symbolic link" in result.stdout + result.stderr
    assert list(elsewhere.iterdir()) == []
    assert not list(sweep_dirs.outputs.rglob("*.ckpt"))  # refused before training
    assert time.monotonic() - started < 120
