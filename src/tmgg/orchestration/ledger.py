"""The durable record of a stage: what was planned, dispatched and how each job ended.

Layout under ``experiments/<stage>/``:

- ``ledger.jsonl`` — append-only events from launching machines (``planned``,
  ``dispatched``, ``outcome``, ``cancelled``, ``superseded``), one JSON object a line,
  written with O_APPEND and fsync, so a SIGKILLed launcher leaves every complete line
  intact.
- ``jobs/<job_id>.json`` — the latest state of one job, written by the job itself
  (or by the launcher for remote jobs) through an atomic rename: one writer a file,
  safe on shared file systems, readable at any moment.
- ``plan.json`` — the newest plan, every job with its composed config.

Folding the two gives each expected job one state (``JobState``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLANNED = "PLANNED"
DISPATCHED = "DISPATCHED"
RUNNING = "RUNNING"
FINISHED = "FINISHED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
MISSING = "MISSING"
# Not a job status: how status shows a record of an earlier config (see supersede.py).
SUPERSEDED = "SUPERSEDED"

TERMINAL = frozenset({FINISHED, FAILED, CANCELLED})


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; collaborators on a shared FS read these
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class JobState:
    """What the ledger knows of one job, folded from events and the job's own record."""

    job_id: str
    run_name: str
    status: str
    overrides: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    call_id: str | None = None
    superseded_by: str | None = None  # the job of the current config at its grid point

    @property
    def error(self) -> str | None:
        return self.record.get("error")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}

    @property
    def duration_s(self) -> float | None:
        return self.record.get("duration_s")


class Ledger:
    """One stage's records under ``<experiments_dir>/<stage>``."""

    def __init__(self, experiments_dir: str | Path, stage: str) -> None:
        self.stage = stage
        self.root = Path(experiments_dir) / stage
        self.events_path = self.root / "ledger.jsonl"
        self.jobs_dir = self.root / "jobs"
        self.plan_path = self.root / "plan.json"

    # -- writing ---------------------------------------------------------------
    def append(self, event: dict[str, Any]) -> None:
        """Append one event line durably (O_APPEND keeps concurrent lines whole)."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(event, default=str, sort_keys=True) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def append_many(self, events: Iterable[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        payload = b"".join(
            (json.dumps(e, default=str, sort_keys=True) + "\n").encode() for e in events
        )
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_plan(self, plan: dict[str, Any]) -> None:
        atomic_write_json(self.plan_path, plan)

    def write_job_record(self, job_id: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.jobs_dir / f"{job_id}.json", record)

    # -- reading ---------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        """Every complete event line; a torn last line (killed writer) is skipped."""
        if not self.events_path.exists():
            return
        with self.events_path.open() as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def job_record(self, job_id: str) -> dict[str, Any] | None:
        path = self.jobs_dir / f"{job_id}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def job_records(self) -> dict[str, dict[str, Any]]:
        records = {}
        if self.jobs_dir.exists():
            for path in sorted(self.jobs_dir.glob("*.json")):
                try:
                    record = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                records[record.get("job_id", path.stem)] = record
        return records

    def plan(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.plan_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_finished(self, job_id: str) -> bool:
        record = self.job_record(job_id)
        return bool(record) and record.get("status") == FINISHED

    def states(self) -> dict[str, JobState]:
        """Fold events and job records: one state per job ever planned, in plan order."""
        states: dict[str, JobState] = {}
        for event in self.events():
            job_id = event.get("job_id")
            if not job_id:
                continue
            kind = event.get("event")
            state = states.get(job_id)
            if state is None:
                state = JobState(job_id=job_id, run_name=event.get("run_name", ""),
                                 status=MISSING, overrides=event.get("overrides", []))
                states[job_id] = state
            if kind == "planned":
                state.plan = event
                state.overrides = event.get("overrides", state.overrides)
                state.superseded_by = None  # planned again: its config is current again
                if state.status == MISSING:
                    state.status = PLANNED
            elif kind == "dispatched":
                state.status = DISPATCHED
                state.call_id = event.get("call_id") or state.call_id
            elif kind == "outcome":
                state.status = event.get("status", state.status)
                state.record = {**state.record, **event}
            elif kind == "cancelled":
                state.status = CANCELLED
            elif kind == "superseded":
                state.superseded_by = event.get("by") or "?"
        for job_id, record in self.job_records().items():
            state = states.get(job_id)
            if state is None:
                state = JobState(job_id=job_id, run_name=record.get("run_name", ""),
                                 status=MISSING, overrides=record.get("overrides", []))
                states[job_id] = state
            state.record = record
            recorded = record.get("status")
            # A job's own record is the truth, except a stale RUNNING after a newer
            # dispatch or cancel by the launcher.
            if recorded in TERMINAL or state.status in (PLANNED, MISSING, RUNNING):
                state.status = recorded or state.status
            elif recorded == RUNNING and state.status == DISPATCHED:
                state.status = RUNNING
        return states
