"""Consistency of one stage's ledger, job records, claims and plan (``tmgg-sweep fsck``).

tmgg writes a stage's files in a fixed order: ``planned`` events and ``plan.json``,
then per job ``dispatched``, the job's RUNNING record, its FINISHED/FAILED record,
the ``outcome`` event. Anything else (a missing event, an outcome without a record, a
job dispatched twice with nothing recorded between, a record of a job never planned)
means the files were edited, lost or written by something other than tmgg: each such
*finding* is named with a stable id (``<kind>:<job_id>``), explained, and given the
thing to do about it.

A finding that is history rather than damage (a committed stage run from a dirty
tree, a hand repair documented in its NOTES.md) is *acknowledged* by
``tmgg-sweep fsck --acknowledge ID --reason TEXT``, which appends an ``acknowledged``
event to the ledger: committed ledgers are written by tmgg only, never by hand.
``fsck`` fails (non-zero) while any finding is unacknowledged.
"""

from __future__ import annotations

import fnmatch
import getpass
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmgg.jobs import schema
from tmgg.jobs.ledger import TERMINAL, Ledger
from tmgg.jobs.records import host, utc_now

ACKNOWLEDGED = "acknowledged"
# Events after which a job may be dispatched again without anything being lost
# ("lost": a LOST dispatch recorded as such before the job was resumed).
ENDS_A_DISPATCH = frozenset({"outcome", "cancelled", "skipped", "lost"})

# What each kind of finding means and what to do about it.
ADVICE: dict[str, tuple[str, str]] = {
    "damaged": (
        "a line or file does not have its schema's shape (torn write, hand edit)",
        "readers skip it; restore it from git if committed, else acknowledge it"),
    "no-dispatch": (
        "the job has an outcome or a record but no `dispatched` event",
        "the ledger lost lines or was assembled by hand; acknowledge with where the "
        "dispatch is documented, or re-run the job (`tmgg-sweep resume`)"),
    "outcome-without-record": (
        "an `outcome` event names the job but jobs/<job_id>.json is absent",
        "the record was lost: re-run the job (`tmgg-sweep resume`) or acknowledge"),
    "record-without-outcome": (
        "the job's record is terminal but no `outcome` event was appended",
        "the launcher died before recording the outcome, or the line was lost; "
        "acknowledge, or re-run the job"),
    "status-mismatch": (
        "the last `outcome` event and the job's record disagree on its status",
        "one of the two was written by hand or lost an update; re-run the job or "
        "acknowledge which one is right"),
    "finished-without-metrics": (
        "a FINISHED record holds no metrics",
        "the record cannot be reported; re-run the job"),
    "dirty-tree": (
        "the job ran from a working tree with uncommitted changes: its commit does "
        "not say which code produced it",
        "acknowledge with what the changes were (NOTES.md), or re-run from a clean tree"),
    "no-commit": (
        "the record names no git commit", "re-run from a git checkout, or acknowledge"),
    "redispatched-without-end": (
        "the job was dispatched again with no outcome, `lost` or cancel between: an "
        "earlier dispatch was LOST and resumed without a LOST event",
        "acknowledge with what happened to the first dispatch (NOTES.md)"),
    "orphan-record": (
        "jobs/<job_id>.json names a job the ledger never planned",
        "a record copied in from elsewhere; remove it with git or acknowledge"),
    "orphan-claim": (
        "a claim file names a job the ledger never planned",
        "claims are runtime state: delete claims/ of a stage that is not running"),
    "stale-claim": (
        "a job whose record is terminal still has an unreleased claim",
        "its holder died after recording; harmless, delete claims/ when idle"),
    "orphan-output": (
        "an output directory names a job the ledger never planned",
        "left by a run of another ledger or a deleted stage; remove it or acknowledge"),
    "plan-without-planned-event": (
        "plan.json lists a job that has no `planned` event",
        "plan.json was replaced by hand or copied; re-plan the stage"),
    "record-plan-mismatch": (
        "the job's record and plan.json disagree on its run name or overrides",
        "the record was edited or belongs to another plan; re-run the job"),
    "unfinished": (
        "a job of the newest plan has no terminal record",
        "note only: `tmgg-sweep status` / `resume` show and run it"),
}
NOTE_KINDS = frozenset({"unfinished"})


@dataclass
class Finding:
    kind: str
    subject: str  # the job id, or the file for a damaged one
    detail: str = ""
    acknowledged: str | None = None  # the acknowledgement's reason

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.subject}"

    @property
    def is_note(self) -> bool:
        return self.kind in NOTE_KINDS

    def explain(self) -> str:
        meaning, advice = ADVICE[self.kind]
        text = f"{self.id}: {meaning}"
        if self.detail:
            text += f" ({self.detail})"
        if self.acknowledged is not None:
            return f"{text}\n    acknowledged: {self.acknowledged}"
        return f"{text}\n    what to do: {advice}"


@dataclass
class StageCheck:
    """Every finding of one stage, with its acknowledgements applied."""

    ledger: Ledger
    findings: list[Finding] = field(default_factory=list)
    stale_acknowledgements: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.ledger.root)

    @property
    def unexplained(self) -> list[Finding]:
        return [f for f in self.findings if f.acknowledged is None and not f.is_note]


def _events_by_job(ledger: Ledger) -> dict[str, list[dict[str, Any]]]:
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in ledger.events():
        if event.get("job_id"):
            by_job[str(event["job_id"])].append(event)
    return by_job


def acknowledgements(ledger: Ledger) -> dict[str, str]:
    """Finding id -> the reason of its (latest) acknowledgement."""
    return {str(e.get("finding")): str(e.get("reason") or "")
            for e in ledger.events() if e.get("event") == ACKNOWLEDGED and e.get("finding")}


def _job_findings(job_id: str, events: list[dict[str, Any]],
                  record: dict[str, Any] | None) -> list[Finding]:
    found: list[Finding] = []
    kinds = [e.get("event") for e in events]
    outcomes = [e for e in events if e.get("event") == "outcome"]
    has_dispatch = "dispatched" in kinds
    if not has_dispatch and (outcomes or (record and record.get("status") in TERMINAL)):
        found.append(Finding("no-dispatch", job_id))
    if outcomes and record is None:
        found.append(Finding("outcome-without-record", job_id))
    if record is not None and record.get("status") in TERMINAL:
        if not outcomes and "cancelled" not in kinds:
            found.append(Finding("record-without-outcome", job_id,
                                 f"record {record.get('status')}"))
        elif outcomes and outcomes[-1].get("status") != record.get("status"):
            found.append(Finding("status-mismatch", job_id,
                                 f"outcome {outcomes[-1].get('status')}, record "
                                 f"{record.get('status')}"))
    if record is not None and record.get("status") == "FINISHED" and not record.get("metrics"):
        found.append(Finding("finished-without-metrics", job_id))
    if record is not None:
        code = record.get("code") or {}
        if code.get("git_dirty"):
            found.append(Finding("dirty-tree", job_id, f"commit {code.get('git_commit')}"))
        elif not code.get("git_commit"):
            found.append(Finding("no-commit", job_id))
    dispatches = 0
    for kind in kinds:
        if kind == "dispatched":
            dispatches += 1
            if dispatches > 1:
                found.append(Finding("redispatched-without-end", job_id,
                                     f"attempts {record.get('attempts') if record else '?'}"))
                break
        elif kind in ENDS_A_DISPATCH:
            dispatches = 0
    return found


def _plan_findings(ledger: Ledger, planned: set[str],
                   records: dict[str, dict[str, Any]]) -> list[Finding]:
    plan = ledger.plan()
    if plan is None:
        return []
    found: list[Finding] = []
    for job in plan.get("jobs") or []:
        job_id = str(job.get("job_id"))
        if job_id not in planned:
            found.append(Finding("plan-without-planned-event", job_id))
        record = records.get(job_id)
        if record is None or record.get("status") not in TERMINAL:
            found.append(Finding("unfinished", job_id,
                                 f"status {record.get('status') if record else 'none'}"))
            continue
        differs = [key for key in ("run_name", "overrides")
                   if job.get(key) is not None and record.get(key) is not None
                   and job.get(key) != record.get(key)]
        if differs:
            found.append(Finding("record-plan-mismatch", job_id, ", ".join(differs)))
    return found


def _claim_findings(ledger: Ledger, planned: set[str],
                    records: dict[str, dict[str, Any]]) -> list[Finding]:
    claims_dir = ledger.root / "claims"
    if not claims_dir.is_dir():
        return []
    newest: dict[str, tuple[int, dict[str, Any]]] = {}
    for path in claims_dir.glob("*.g*.json"):
        job_id, _, generation = path.name[:-len(".json")].rpartition(".g")
        try:
            claim = schema.read(path, schema.ClaimFile)
        except (FileNotFoundError, schema.Damaged):
            continue  # damaged ones are named by damaged_files
        if generation.isdigit() and int(generation) >= newest.get(job_id, (-1, {}))[0]:
            newest[job_id] = (int(generation), claim)
    found = []
    for job_id, (_, claim) in sorted(newest.items()):
        if job_id not in planned:
            found.append(Finding("orphan-claim", job_id))
        elif not claim.get("released") and (records.get(job_id) or {}).get("status") \
                in TERMINAL:
            found.append(Finding("stale-claim", job_id))
    return found


def _output_findings(outputs_dir: Path | None, stage: str, known: set[str]) -> list[Finding]:
    """Output folders ``<outputs_dir>/<stage>/<run_name>-<hash>`` of jobs never planned."""
    if outputs_dir is None or not (outputs_dir / stage).is_dir():
        return []
    found = []
    hashes = {job_id.rsplit("-", 1)[-1]: job_id for job_id in known}
    for folder in sorted(p for p in (outputs_dir / stage).iterdir() if p.is_dir()):
        suffix = folder.name.rsplit("-", 1)[-1]
        if "-" in folder.name and suffix not in hashes:
            found.append(Finding("orphan-output", f"{stage}-{suffix}", str(folder)))
    return found


def check_stage(ledger: Ledger, outputs_dir: Path | None = None) -> StageCheck:
    """Every finding of one stage, acknowledged ones marked."""
    check = StageCheck(ledger)
    for damaged in ledger.damaged_files():
        where = f"{damaged.path.name}" + (f"#L{damaged.line}" if damaged.line else "")
        check.findings.append(Finding("damaged", where, damaged.reason))
    by_job = _events_by_job(ledger)
    records = ledger.job_records()
    planned = {job_id for job_id, events in by_job.items()
               if any(e.get("event") == "planned" for e in events)}
    for job_id in sorted(set(by_job) | set(records)):
        if job_id not in planned:
            if job_id in records:
                check.findings.append(Finding("orphan-record", job_id))
            continue
        check.findings.extend(_job_findings(job_id, by_job.get(job_id, []),
                                            records.get(job_id)))
    check.findings.extend(_plan_findings(ledger, planned, records))
    check.findings.extend(_claim_findings(ledger, planned, records))
    check.findings.extend(_output_findings(outputs_dir, ledger.stage, planned | set(records)))
    acknowledged = acknowledgements(ledger)
    current = {finding.id for finding in check.findings}
    for finding in check.findings:
        finding.acknowledged = acknowledged.get(finding.id)
    check.stale_acknowledgements = sorted(set(acknowledged) - current)
    return check


def acknowledge(ledger: Ledger, patterns: list[str], reason: str,
                outputs_dir: Path | None = None) -> list[Finding]:
    """Append one ``acknowledged`` event per current, unacknowledged finding matching
    any of ``patterns`` (fnmatch: ``dirty-tree:*``). A pattern never covers a finding
    that appears later: each event names one finding. Returns the acknowledged ones;
    ``ValueError`` when a pattern matches nothing or the reason is empty."""
    if not reason.strip():
        raise ValueError("an acknowledgement needs --reason: what happened and where it "
                         "is documented")
    check = check_stage(ledger, outputs_dir)
    open_findings = [f for f in check.findings if f.acknowledged is None and not f.is_note]
    chosen: list[Finding] = []
    for pattern in patterns:
        matched = [f for f in open_findings if fnmatch.fnmatchcase(f.id, pattern)]
        if not matched:
            raise ValueError(f"{pattern!r} matches no unacknowledged finding of "
                             f"{check.name}; `tmgg-sweep fsck` lists them")
        chosen.extend(f for f in matched if f not in chosen)
    planned_jobs = {job_id for job_id, events in _events_by_job(ledger).items()
                    if any(e.get("event") == "planned" for e in events)}
    now = utc_now()
    by = f"{getpass.getuser()}@{host()}"
    ledger.append_many({
        "event": ACKNOWLEDGED, "time": now, "finding": finding.id,
        # Only a planned job's id: an unplanned one would show up as a job in `status`.
        "job_id": finding.subject if finding.subject in planned_jobs else "",
        "reason": reason, "by": by,
    } for finding in chosen)
    for finding in chosen:
        finding.acknowledged = reason
    return chosen


def stage_ledgers(experiments_dir: Path) -> list[Ledger]:
    """Every stage under ``experiments_dir`` (any folder holding a ledger.jsonl, also
    nested ones such as ``fused/stage1``)."""
    return [Ledger(path.parent.parent, path.parent.name)
            for path in sorted(Path(experiments_dir).rglob("ledger.jsonl"))]
