"""The durable record of a stage: what was planned, dispatched and how each job ended.

Layout under ``experiments/<stage>/``:

- ``ledger.jsonl`` — append-only events from launching machines (``planned``,
  ``dispatched``, ``outcome``, ``cancelled``, ``superseded``), one JSON object a line,
  written with O_APPEND and fsync, so a SIGKILLed launcher leaves every complete line
  intact. A torn line (disk full, writer killed mid-write) stays on a line of its own:
  the next append starts on a fresh line, readers skip it and ``damaged_lines`` names it.
- ``jobs/<job_id>.json`` — the latest state of one job, written by the job itself
  (or by the launcher for remote jobs) through an atomic rename: one writer a file,
  safe on shared file systems, readable at any moment.
- ``plan.json`` — the newest plan, every job with its composed config.

Folding the two gives each expected job one state (``JobState``).

Every line and file is read through ``tmgg.jobs.schema``: one of the wrong
shape is *damaged* (``damaged_files`` / ``damaged_lines`` name it with its line), is
skipped, and never raises in a reader. No write here follows a symbolic link below
the experiments directory (``refuse_links``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmgg.jobs import schema
from tmgg.jobs.schema import Damaged

PLANNED = "PLANNED"
DISPATCHED = "DISPATCHED"
RUNNING = "RUNNING"
FINISHED = "FINISHED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
MISSING = "MISSING"
# Dispatched or running, but nothing holds its claim any more: its process died
# (killed launcher or worker, lost node) without recording an outcome.
LOST = "LOST"
IN_FLIGHT = frozenset({DISPATCHED, RUNNING})
# Not run by the sweep that recorded it: finished already, or another dispatch holds
# its claim. Never an outcome: while the holder's claim lives the job stays SKIPPED
# (the holder's records take over), once that claim is dead it is LOST and resumable.
SKIPPED = "SKIPPED"
# Not a job status: how status shows a record of an earlier config (see supersede.py).
SUPERSEDED = "SUPERSEDED"

# An adaptive stage's trial its sweeper stopped early (tmgg.jobs.trials): done, its
# record says at which step; never resumed, never re-run.
PRUNED = "PRUNED"
TERMINAL = frozenset({FINISHED, FAILED, CANCELLED, PRUNED})
# Jobs a sweep does not run again: they ran to their end (FINISHED) or were pruned.
DONE = frozenset({FINISHED, PRUNED})


class LinkRefused(RuntimeError):
    """A write under experiments_dir or outputs_dir would follow a symbolic link."""


def refuse_links(path: Path, root: Path) -> None:
    """Refuse (``LinkRefused``) when ``path`` or a folder between ``root`` (the
    experiments or outputs directory, which may itself be a link) and it is a symbolic
    link."""
    path, root = Path(path), Path(root)
    for component in [p for p in [path, *path.parents] if p != root and root in p.parents]:
        if component.is_symlink():
            raise LinkRefused(
                f"refusing to write {path}: {component} is a symbolic link (to "
                f"{os.readlink(component)}); nothing under experiments_dir or outputs_dir "
                f"follows links. Replace the link with a real folder or file.")


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
    claim: str | None = None  # who holds an in-flight job, or why a LOST one was lost
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
        self.experiments_dir = Path(experiments_dir)
        self.root = Path(experiments_dir) / stage
        self.events_path = self.root / "ledger.jsonl"
        self.jobs_dir = self.root / "jobs"
        self.plan_path = self.root / "plan.json"

    # -- writing ---------------------------------------------------------------
    def append(self, event: dict[str, Any], fence: Any = None) -> None:
        """Append one event line durably (see ``append_many``); with ``fence`` (the
        writer's claim), only while that claim is the job's newest generation
        (``claims.ClaimLost`` otherwise)."""
        if fence is not None:
            from tmgg.jobs.claims import verify

            verify(fence)
        self.append_many([event])

    def append_many(self, events: Iterable[dict[str, Any]]) -> None:
        """Append event lines durably, whole, and never glued to a torn line.

        O_APPEND keeps concurrent writers' lines apart; an advisory lock makes "does the
        file end mid-line?" and the write one step between tmgg's writers; the write is
        repeated until every byte is down (``os.write`` may write less than asked).
        """
        payload = b"".join(
            (json.dumps(e, default=str, sort_keys=True) + "\n").encode() for e in events
        )
        if not payload:
            return
        refuse_links(self.events_path, self.experiments_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.events_path,
                         os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            refuse_links(self.events_path, self.experiments_dir)  # made a link meanwhile
            raise error
        try:
            with contextlib.suppress(OSError):  # a file system without flock still appends
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _ends_mid_line(fd):
                payload = b"\n" + payload  # close a torn line left by a killed writer
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def write_plan(self, plan: dict[str, Any]) -> None:
        refuse_links(self.plan_path, self.experiments_dir)
        atomic_write_json(self.plan_path, plan)

    def write_job_record(self, job_id: str, record: dict[str, Any],
                         fence: Any = None) -> None:
        """Write a job's record; with ``fence`` (the writer's claim), only while that
        claim is the job's newest generation (``claims.ClaimLost`` otherwise)."""
        if fence is not None:
            from tmgg.jobs.claims import verify

            verify(fence)
        path = self.jobs_dir / f"{job_id}.json"
        refuse_links(path, self.experiments_dir)
        atomic_write_json(path, record)

    # -- reading ---------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        """Every complete event; damaged lines (torn writes) are skipped, see ``damaged_lines``."""
        for _, event, _, _ in self._lines():
            if event is not None:
                yield event

    def damaged_lines(self) -> list[tuple[int, str]]:
        """``(line number, start of its text)`` of every line that is not one whole event."""
        return [(number, raw[:80]) for number, _, raw, damaged in self._lines() if damaged]

    def damaged_files(self) -> list[Damaged]:
        """Every damaged line of the ledger, job record, claim and the plan, named."""
        damaged = [Damaged(self.events_path, reason, number)
                   for number, _, _, reason in self._checked_lines() if reason]
        for paths, kind in ((_listed(self.jobs_dir, "*.json"), schema.JobRecordFile),
                            ([self.plan_path], schema.PlanFile),
                            (_listed(self.root / "claims", "*.g*.json"), schema.ClaimFile)):
            damaged += [read for read in _read_files(paths, kind) if isinstance(read, Damaged)]
        return damaged

    def _checked_lines(self) -> Iterator[tuple[int, dict[str, Any] | None, str, str | None]]:
        """(number, its event or None, its text, why it is damaged or None)."""
        for number, event, raw, damaged in self._lines():
            if event is None:
                yield number, None, raw, "not one whole JSON object (a torn write?)"
            elif damaged:
                yield number, event, raw, "a whole event glued behind torn text"
            else:
                yield number, event, raw, None

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | None, str, bool]]:
        """(number, its event or None, its text, damaged?) for every non-blank line."""
        try:
            handle = self.events_path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for number, data in enumerate(handle, start=1):
                raw = data.decode("utf-8", errors="replace").strip()
                if raw:
                    event, start = _parse_event(raw)
                    if event is not None:
                        try:
                            event = schema.decode(raw[start:], schema.LedgerEvent,
                                                  self.events_path, number)
                        except schema.Damaged:
                            event = None
                    yield number, event, raw, event is None or start > 0

    def job_record(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None when it has none or it is damaged (see
        ``damaged_files``)."""
        path = self.jobs_dir / f"{job_id}.json"
        try:
            return schema.read(path, schema.JobRecordFile)
        except (FileNotFoundError, schema.Damaged):
            return None

    def job_records(self) -> dict[str, dict[str, Any]]:
        """Every job's record by job id; damaged ones are left out (``damaged_files``)."""
        return {read["job_id"]: read for read in _read_files(
            _listed(self.jobs_dir, "*.json"), schema.JobRecordFile)
            if not isinstance(read, Damaged)}

    def plan(self) -> dict[str, Any] | None:
        try:
            return schema.read(self.plan_path, schema.PlanFile)
        except (FileNotFoundError, schema.Damaged):
            return None

    def is_finished(self, job_id: str) -> bool:
        record = self.job_record(job_id)
        return bool(record) and record.get("status") == FINISHED

    def states(self) -> dict[str, JobState]:
        """Fold events, job records and claims: one state per job ever planned, in plan
        order. A job in flight whose claim is no longer alive is ``LOST``.

        Consistent at any moment of a running sweep: a job writes its final record (and
        a launcher its outcome event) before it releases the claim, so a claim found
        released is checked against a second, fresh fold before its job is called LOST.
        """
        from tmgg.jobs.claims import mark_lost

        return mark_lost(self, self._fold())

    def _fold(self) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        for event in self.events():
            _fold_event(states, event)
        for job_id, record in self.job_records().items():
            _fold_record(states, job_id, record)
        return states


def _fold_event(states: dict[str, JobState], event: dict[str, Any]) -> None:
    """One ledger event into the jobs' states (events first, in ledger order)."""
    job_id = event.get("job_id")
    if not job_id:
        return
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
        state.status = event.get("status") or state.status
        state.record = {**state.record, **event}
    elif kind == "skipped":
        if state.status in (PLANNED, MISSING, DISPATCHED, LOST):
            state.status = SKIPPED
            state.claim = event.get("reason")
    elif kind == "cancelled":
        state.status = CANCELLED
    elif kind == "superseded":
        state.superseded_by = event.get("by") or "?"


def _fold_record(states: dict[str, JobState], job_id: str, record: dict[str, Any]) -> None:
    """A job's own record over its folded events (after all of them)."""
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
    elif recorded == RUNNING and state.status in (DISPATCHED, SKIPPED):
        state.status = RUNNING


class LedgerFold:
    """``Ledger.states()`` for a reader that asks again and again (an adaptive study,
    at every ask and every batch of pruning decisions): each call reads only what
    changed since the last, the lines appended to ``ledger.jsonl`` (from a byte offset;
    a line still being written waits for its end) and the records of jobs not done
    (a FINISHED or PRUNED job's record no longer changes), instead of the whole stage.
    The states are those ``Ledger.states()`` gives at that moment."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.root = ledger.root
        self.offset = 0
        self.line = 0
        self._by_events: dict[str, JobState] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def states(self) -> dict[str, JobState]:
        from tmgg.jobs.claims import mark_lost

        return mark_lost(self, self._fold())

    def _fold(self) -> dict[str, JobState]:
        """The event fold brought up to date, with the current records over copies of it
        (``mark_lost`` calls this to fold again)."""
        with self._lock:
            self._read_events()
            self._read_records()
            states = {job_id: dataclasses.replace(state)
                      for job_id, state in self._by_events.items()}
            for job_id, record in sorted(self._records.items()):
                _fold_record(states, job_id, record)
            return states

    def _read_events(self) -> None:
        path = self.ledger.events_path
        try:
            with path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        for data_line in whole.split(b"\n")[:-1]:
            self.line += 1
            raw = data_line.decode("utf-8", errors="replace").strip()
            if not raw:
                continue
            event, start = _parse_event(raw)
            if event is None:
                continue
            try:
                event = schema.decode(raw[start:], schema.LedgerEvent, path, self.line)
            except schema.Damaged:
                continue
            _fold_event(self._by_events, event)

    def _read_records(self) -> None:
        jobs_dir = self.ledger.jobs_dir
        to_read = [path for path in _listed(jobs_dir, "*.json")
                   if self._records.get(path.stem, {}).get("status") not in DONE]
        for read in _read_files(to_read, schema.JobRecordFile):
            if not isinstance(read, Damaged):
                self._records[read["job_id"]] = read


def _listed(directory: Path, pattern: str) -> list[Path]:
    """The files of ``directory`` matching ``pattern``, sorted; none if it is missing."""
    return sorted(directory.glob(pattern)) if directory.exists() else []


def _read_files(paths: Iterable[Path], kind: Any) -> Iterator[Any]:
    """Each file read through its schema (``kind``): its content, or the ``Damaged``
    that says why it is not one; a file removed meanwhile is skipped."""
    for path in paths:
        try:
            yield schema.read(path, kind)
        except schema.Damaged as error:
            yield error
        except FileNotFoundError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written; an error (ENOSPC, EIO) propagates."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"os.write wrote {written} bytes of {len(view)}")
        view = view[written:]


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _parse_event(raw: str) -> tuple[dict[str, Any] | None, int]:
    """The event on a line and where it starts; (None, -1) for a damaged line. A whole
    event glued behind a torn one (in a ledger written before appends closed torn
    lines) is recovered, starting after the torn text."""
    start = 0
    while start != -1:
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(raw[start:])
            return (event, start) if isinstance(event, dict) else (None, -1)
        start = raw.find("{", start + 1)
    return None, -1
