"""The one typed schema of every file under ``experiments/<stage>/``.

Claims, ledger lines, job records and ``plan.json`` are written by many processes on
many machines and read back by every later sweep, ``status`` and ``resume``. A file of
the wrong shape (a torn write, a hand edit, a tool of another version, garbage) must
never crash a reader with an unrelated ``AttributeError``, never block a job forever
and never grant a claim: it is *damaged*, named with its file and line, and the
caller decides what a damaged file means (a damaged claim is held until its lease
runs out by the file system's clock; a damaged ledger line is skipped and reported).

Every reader goes through ``decode``: msgspec checks the shape against the structs
below, and the reader gets the plain dict back (unknown keys kept, so a newer tmgg's
extra fields survive a rewrite by an older one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class Damaged(Exception):
    """A file (or one line of it) under experiments/ that does not have its schema's shape."""

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path} line {line}" if line is not None else str(self.path)
        super().__init__(f"{where} is damaged: {reason}")


class _Open(msgspec.Struct, kw_only=True):
    """Unknown keys are allowed (and kept by ``decode``'s dict)."""


class ClaimOwner(_Open):
    host: str
    pid: int
    boot_id: str | None = None
    start: str | None = None
    pid_ns: str | None = None


class ClaimTransport(_Open):
    kind: str | None = None
    call_id: str | None = None


class ClaimFile(_Open):
    """``claims/<job_id>.g<N>.json``: one generation of a job's claim."""

    job_id: str
    owner: ClaimOwner
    ticket: str | None = None
    transport: ClaimTransport | None = None
    taken_at: str | None = None
    heartbeat_at: str | None = None
    lease_s: float | None = None
    lease_expires: float | None = None
    released: bool = False
    released_at: str | None = None
    outcome: str | None = None
    run_name: str | None = None


class LedgerEvent(_Open):
    """One line of ``ledger.jsonl``."""

    event: str
    job_id: str
    time: str | None = None
    run_name: str | None = None
    overrides: list[str] | None = None
    status: str | None = None
    call_id: str | None = None
    by: str | None = None
    launcher: str | None = None
    generation: int | None = None
    reason: str | None = None


class JobRecordFile(_Open):
    """``jobs/<job_id>.json``: the latest state of one job, written by the job."""

    job_id: str
    status: str
    run_name: str | None = None
    stage: str | None = None
    overrides: list[str] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    attempts: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    output_dir: str | None = None
    claim: dict[str, Any] | None = None
    # Where the job ran (tmgg.jobs.platform_info); absent in records older than issue 24.
    platform: dict[str, Any] | None = None


class PlanJob(_Open):
    job_id: str
    run_name: str | None = None


class PlanFile(_Open):
    """``plan.json``: the newest plan of the stage."""

    stage: str
    jobs: list[PlanJob]
    arguments: list[str] | None = None


def decode(raw: bytes | str, schema: type[T], path: Path | str,
           line: int | None = None) -> dict[str, Any]:
    """The JSON object in ``raw`` as a dict, if it has ``schema``'s shape; else ``Damaged``."""
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        msgspec.json.decode(data, type=schema)
        value = msgspec.json.decode(data)
    except msgspec.ValidationError as error:
        raise Damaged(path, f"wrong shape for a {schema.__name__}: {error}", line) from None
    except msgspec.DecodeError as error:
        raise Damaged(path, f"not JSON ({error})", line) from None
    assert isinstance(value, dict)  # a struct decodes only from an object
    return value


def read(path: Path, schema: type[T]) -> dict[str, Any]:
    """Read and check one file; ``FileNotFoundError`` when it is absent, ``Damaged``
    when it cannot be read or has the wrong shape."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise Damaged(path, f"unreadable ({error})") from None
    return decode(raw, schema, path)
