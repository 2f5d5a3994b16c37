"""Superseded records: jobs of an earlier config at a grid point the stage now composes
differently (DESIGN.md contract 2).

A job's id covers its composed config, so editing a stage or a config group gives
the same grid point (the same override set) a new id. The records of the earlier
id stay in the ledger; they are superseded, not deleted. Recording a plan appends
one ``superseded`` event per such record (``by`` names the job that replaces it), so
``status`` can tell them apart from the ledger alone; a later ``planned`` event of
the same id (the config was changed back) makes it current again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tmgg.config.identity import legacy_job_id, wandb_run_id
from tmgg.jobs.ledger import FINISHED, JobState
from tmgg.jobs.plan import PlannedJob


@dataclass(frozen=True)
class Supersession:
    """A ledger job of an earlier config and the planned job that replaces it."""

    old: JobState
    new: PlannedJob

    def event(self, time: str) -> dict[str, Any]:
        return {"event": "superseded", "time": time, "job_id": self.old.job_id,
                "run_name": self.old.run_name, "overrides": self.old.overrides,
                "by": self.new.job_id, "status": self.old.status}


def grid_point(stage: str, overrides: Sequence[str]) -> str:
    """The grid point of a job: its stage and canonical override set, whatever the config."""
    return legacy_job_id(stage, overrides)


def superseded_records(jobs: Iterable[PlannedJob], states: dict[str, JobState],
                       stage: str | None = None) -> list[Supersession]:
    """Ledger jobs, not yet marked, at a grid point of ``jobs`` under another id."""
    planned = [job for job in jobs if job.is_tmgg_job]
    if not planned:
        return []
    stage = stage or planned[0].stage
    current = {job.job_id for job in planned}
    by_point = {grid_point(job.stage, job.overrides): job for job in planned}
    found = []
    for state in states.values():
        if state.job_id in current or state.superseded_by or not state.overrides:
            continue
        job = by_point.get(grid_point(stage, state.overrides))
        if job is not None:
            found.append(Supersession(old=state, new=job))
    return found


def superseded_ids(jobs: Iterable[PlannedJob], states: dict[str, JobState],
                   stage: str | None = None) -> dict[str, str]:
    """Every superseded ledger job, marked so or replaced by one of ``jobs`` now: the
    id of the job that replaces it, by its own id."""
    replaced = {job_id: str(state.superseded_by) for job_id, state in states.items()
                if state.superseded_by}
    replaced.update((s.old.job_id, s.new.job_id)
                    for s in superseded_records(jobs, states, stage))
    return replaced


def stale_run_ids(stale: Iterable[JobState]) -> set[str]:
    """The W&B run ids of superseded jobs (their runs are not the current jobs')."""
    ids = set()
    for state in stale:
        wandb = state.record.get("wandb") or {}
        ids.add(str(wandb.get("run_id") or wandb_run_id(state.job_id)))
    return ids


def describe(supersessions: Sequence[Supersession]) -> str | None:
    """One line for the user before anything runs, or None when nothing is superseded."""
    if not supersessions:
        return None
    finished = sum(1 for s in supersessions if s.old.status == FINISHED)
    return (f"this plan supersedes {finished} finished job{'s' if finished != 1 else ''} "
            f"({len(supersessions)} ledger record{'s' if len(supersessions) != 1 else ''}) "
            "of an earlier config: their grid points now compose to another config, so "
            "they run again under new job ids, output dirs and W&B runs; the old records "
            "stay in the ledger, marked superseded")
