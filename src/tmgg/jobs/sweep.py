"""What every launcher shares: planning, skipping, ledger events, outcome table.

Launchers stay transport code; the rules of a sweep live here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tmgg.config.identity import task_overrides
from tmgg.jobs import claims
from tmgg.jobs.composer import (
    composition_key,
    keep_compositions_for_the_sweeper,
    master_overrides,
    share_config_cache,
)
from tmgg.jobs.ledger import DONE, FAILED, FINISHED, PRUNED, RUNNING, Ledger, refuse_links
from tmgg.jobs.plan import PlannedJob, compose_plan, expand_grid, is_tmgg_config
from tmgg.jobs.platform_info import platform_info
from tmgg.jobs.records import code_version, host, package_versions, utc_now
from tmgg.jobs.supersede import describe, superseded_records

log = logging.getLogger(__name__)

# Plans composed at multirun start, keyed by override tuple, reused by our launchers
# so every job is composed once.
_PLAN_CACHE: dict[tuple[str, ...], PlannedJob] = {}


@dataclass
class JobSkipped:
    """What a job not run returns instead of a result: it was finished already
    (``reason="finished"``, with the recorded ``metrics``) or another dispatch holds
    its claim (``reason="claimed"``). Launchers record it as a ``skipped`` event, never
    as an outcome: a skip is never FINISHED."""

    job_id: str
    run_name: str
    reason: str
    detail: str
    metrics: dict[str, Any] | None = None
    recorded: bool = False  # its skipped event is in the ledger already

    def __str__(self) -> str:
        return f"{self.run_name}: not run, {self.detail}"


@dataclass
class HeldJob:
    """A job this process runs, and who holds its claim.

    ``claim`` is this process's own generation of the job's claim (its fencing token,
    renewed by ``heartbeat``), or None where the launcher holds the claim for it
    (``LAUNCHER_HOLDS_CLAIMS_ENV``: a Modal container working on a volume); then the
    launcher fences and releases it, and this process's writes carry no token.

    ``records_outcome``: this process appends the job's outcome event itself, fenced,
    the moment the job ends (a fused member holding its own claim: its group's launcher
    hears of it only when the whole group returns).
    """

    claim: claims.Claim | None
    heartbeat: claims.Heartbeat | None = None
    records_outcome: bool = False

    @property
    def holds_own_claim(self) -> bool:
        return self.claim is not None

    def check(self) -> None:
        """``claims.ClaimLost`` once this process may no longer train the job (never
        under the launcher's claim: the launcher's outcome is fenced instead)."""
        if self.claim is not None and self.heartbeat is not None:
            self.heartbeat.check(self.claim.job_id)

    def latest_claim(self) -> claims.Claim | None:
        if self.claim is None or self.heartbeat is None:
            return self.claim
        return self.heartbeat.claims.get(self.claim.job_id, self.claim)

    def end(self) -> tuple[claims.Claim | None, claims.ClaimLost | None]:
        """Stop renewing: the claim as last written (None under the launcher's claim)
        and the ``ClaimLost`` that ended it, if it was lost."""
        if self.claim is None or self.heartbeat is None:
            return None, None
        job_id = self.claim.job_id
        latest = self.heartbeat.discard(job_id)
        self.heartbeat.stop()
        lost = self.heartbeat.lost.get(job_id)
        if latest is None and lost is None:
            lost = claims.ClaimLost(self.claim, claims.current(self.claim.path.parents[1],
                                                                job_id))
        return latest, lost


# What this process decided for each job it was handed: skipped, or held and running
# (under its own claim or its launcher's).
_SKIPPED: dict[str, JobSkipped] = {}
_HELD: dict[str, HeldJob] = {}


# Attributes a job's process sets on its JobReturn for the launcher that records it:
# the ticket of the claim the job ran under (the launcher's outcome is fenced with it)
# and whether the job's outcome event is in the ledger already.
CLAIM_TICKET = "claim_ticket"
OUTCOME_RECORDED = "outcome_recorded"


def finished_metrics(task_config: DictConfig) -> dict[str, Any] | None:
    """The recorded metrics of an already finished job, else None."""
    if not is_tmgg_config(task_config):
        return None
    record = ledger_for(task_config).job_record(str(task_config.job.id))
    if record and record.get("status") in DONE:
        return record.get("metrics") or {}
    return None


def skipped_value(result: Any) -> JobSkipped | None:
    """The JobSkipped a JobReturn carries, if its job was not run."""
    value = getattr(result, "_return_value", None)
    return value if isinstance(value, JobSkipped) else None


_NOT_BEGUN = object()


def _begun_already(job_id: str) -> Any:
    """What an earlier begin of this job in this process decided (its skip or its held
    job), else ``_NOT_BEGUN``."""
    if job_id in _SKIPPED:
        return _SKIPPED[job_id]
    if job_id in _HELD:
        return _HELD[job_id]
    return _NOT_BEGUN


def begin_job(task_config: DictConfig) -> JobSkipped | HeldJob | None:
    """In the job's process, from the task function (where an exception fails the job
    with tmgg's own message; Hydra would only warn about one in a callback): take the
    job's claim and write its RUNNING record, or decide that it is not run.

    Idempotent: the ledger callback's ``on_job_start`` may have done it already.
    None for a config that is not a tmgg job.
    """
    if not is_tmgg_config(task_config):
        return None
    job_id = str(task_config.job.id)
    earlier = _begun_already(job_id)
    if earlier is not _NOT_BEGUN:
        return earlier
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices") or {}
    launcher = str(choices["hydra/launcher"]) if "hydra/launcher" in choices else "unknown"
    from tmgg.config.identity import override_lines

    return _start(_task_dict(task_config), override_lines(hydra_cfg.overrides.task),
                  launcher, OmegaConf.select(hydra_cfg, "runtime.output_dir"))


def experiments_root(cfg: DictConfig | dict[str, Any]) -> Path:
    value = cfg["experiments_dir"] if isinstance(cfg, dict) else cfg.experiments_dir
    path = Path(str(value))
    return path if path.is_absolute() else Path(os.getcwd()) / path


def ledger_for(task_config: dict[str, Any] | DictConfig) -> Ledger:
    stage = task_config["stage"]["name"]
    return Ledger(experiments_root(task_config), str(stage))


def launcher_name(config: DictConfig) -> str:
    choice = OmegaConf.select(config, "hydra.runtime.choices")
    if choice is not None and "hydra/launcher" in choice:
        return str(choice["hydra/launcher"])
    return "unknown"



def record_plan(jobs: Sequence[PlannedJob], master_config: DictConfig,
                arguments: Sequence[str]) -> None:
    """Write plan.json and one 'planned' event per job, before anything is dispatched."""
    tmgg_jobs = [job for job in jobs if job.is_tmgg_job]
    if not tmgg_jobs:
        return
    launcher = launcher_name(master_config)
    by_stage: dict[Path, list[PlannedJob]] = {}
    for job in tmgg_jobs:
        by_stage.setdefault(ledger_for(job.task_config).root, []).append(job)
    now = utc_now()
    for jobs_of_stage in by_stage.values():
        ledger = ledger_for(jobs_of_stage[0].task_config)
        superseded = superseded_records(jobs_of_stage, ledger.states(), ledger.stage)
        if superseded:
            log.warning("stage %s: %s", ledger.stage, describe(superseded))
        ledger.write_plan({
            "stage": ledger.stage,
            "created_at": now,
            "arguments": list(arguments),
            "launcher": launcher,
            "code": code_version(),
            "composition": composition_key(master_overrides(master_config)),
            "sweep_jobs": len(tmgg_jobs),  # all stages' (a plan.json holds its stage's)
            "jobs": [{**job.summary(), "config": job.task_config} for job in jobs_of_stage],
        })
        ledger.append_many([*({
            "event": "planned", "time": now, "job_id": job.job_id, "run_name": job.run_name,
            "overrides": job.overrides, "wandb": job.wandb, "launcher": launcher,
        } for job in jobs_of_stage), *(s.event(now) for s in superseded)])


def ledger_for_stage(config: DictConfig) -> Ledger:
    """The ledger of a master config's stage."""
    return Ledger(experiments_root(config), str(config.stage.name))


def remember_planned(jobs: Sequence[PlannedJob]) -> None:
    """Jobs composed outside the multirun start (an adaptive stage's trials): the
    launcher's ``planned_jobs`` finds them and does not compose them again."""
    for job in jobs:
        _PLAN_CACHE[tuple(job.overrides)] = job


def record_trial_plan(jobs: Sequence[PlannedJob], master_config: DictConfig,
                      arguments: Sequence[str], study: dict[str, Any]) -> None:
    """An adaptive stage's plan grows by a trial: its jobs join plan.json (the jobs
    planned before stay, so status, report and reconcile see every trial) and get their
    ``planned`` events. Callers hold the stage's study lock (one writer at a time)."""
    tmgg_jobs = [job for job in jobs if job.is_tmgg_job]
    if not tmgg_jobs:
        return
    ledger = ledger_for(tmgg_jobs[0].task_config)
    launcher = launcher_name(master_config)
    earlier = ledger.plan() or {}
    new_ids = {job.job_id for job in tmgg_jobs}
    entries = [entry for entry in earlier.get("jobs") or []
               if entry.get("job_id") not in new_ids]
    entries += [{**job.summary(), "config": job.task_config} for job in tmgg_jobs]
    now = utc_now()
    ledger.write_plan({
        "stage": ledger.stage,
        "created_at": earlier.get("created_at") or now,
        "updated_at": now,
        "arguments": list(arguments),
        "launcher": launcher,
        "code": code_version(),
        "composition": composition_key(master_overrides(master_config)),
        "sweep_jobs": len(entries),
        "study": study,
        "jobs": entries,
    })
    ledger.append_many([{
        "event": "planned", "time": now, "job_id": job.job_id, "run_name": job.run_name,
        "overrides": job.overrides, "wandb": job.wandb, "launcher": launcher,
    } for job in tmgg_jobs])


def record_plan_for_multirun(config: DictConfig) -> None:
    """Hydra multirun start: compose, validate and record every job of the sweep.

    An adaptive stage (``hydra/sweeper=tmgg_optuna``) has no grid to compose: its
    search space is checked here and each trial is planned when it is asked."""
    if not is_tmgg_config(config):
        return
    from hydra.core.global_hydra import GlobalHydra

    from tmgg.jobs.workdirs import check_work_dirs, ledger_path

    check_work_dirs(config)  # before composing: one line, nothing recorded
    arguments = task_overrides(config)
    from tmgg.jobs.search_space import SearchSpaceError, is_adaptive, stage_space

    if is_adaptive(config):
        try:
            stage_space(config, arguments)
        except SearchSpaceError as error:
            from tmgg.jobs.plan import PlanError

            raise PlanError(f"stage {config.stage.name}: {error}") from None
        return
    loader = GlobalHydra.instance().config_loader()
    share_config_cache(loader)  # the plan, BasicSweeper's checks and the launcher
    keep_compositions_for_the_sweeper(loader)
    jobs = compose_plan(loader, config, expand_grid(config, arguments))
    _PLAN_CACHE.clear()
    from tmgg.jobs.wandb_check import check_wandb_destinations

    check_wandb_destinations(jobs, config)  # before any job is recorded or dispatched
    from tmgg.jobs.launcher_hooks import run_preflight

    run_preflight(config, jobs)
    for job in jobs:
        _PLAN_CACHE[tuple(job.overrides)] = job
    record_plan(jobs, config, arguments)
    log.info("Planned %d jobs of stage %s; ledger %s", len(jobs),
             jobs[0].stage if jobs else "?", ledger_path(config))
    for root in sorted({ledger_for(job.task_config).root for job in jobs if job.is_tmgg_job}):
        for damaged in Ledger(root.parent, root.name).damaged_files():
            print(f"warning: {damaged} (skipped; `tmgg-sweep status` lists it)",
                  file=sys.stderr, flush=True)


def planned_jobs(config_loader: Any, master_config: DictConfig,
                 job_overrides: Sequence[Sequence[str]], initial_index: int) -> list[PlannedJob]:
    """The launcher's jobs: from the multirun plan when available, else composed now."""
    jobs: list[PlannedJob] = []
    missing = [list(o) for o in job_overrides if tuple(o) not in _PLAN_CACHE]
    composed = {}
    if missing:
        for job in compose_plan(config_loader, master_config, missing, initial_index):
            composed[tuple(job.overrides)] = job
        from tmgg.jobs.wandb_check import check_wandb_destinations

        check_wandb_destinations(list(composed.values()), master_config)
    for offset, overrides in enumerate(job_overrides):
        key = tuple(overrides)
        job = _PLAN_CACHE.get(key) or composed[key]
        job.index = initial_index + offset
        with read_write(job.sweep_config.hydra), open_dict(job.sweep_config.hydra.job):
            job.sweep_config.hydra.job.num = job.index
            job.sweep_config.hydra.job.id = f"job{job.index}"
        jobs.append(job)
    return jobs


def is_finished(job: PlannedJob) -> dict[str, Any] | None:
    """The finished record of a job, if the ledger has one (then it is not re-run)."""
    if not job.is_tmgg_job:
        return None
    record = ledger_for(job.task_config).job_record(job.job_id)
    if record and record.get("status") in DONE:
        return record
    return None


def split_finished(jobs: Sequence[PlannedJob]) -> tuple[list[Any], list[int]]:
    """JobReturns with finished jobs already filled in, and the positions still to run."""
    results: list[Any] = [None] * len(jobs)
    pending: list[int] = []
    for position, job in enumerate(jobs):
        record = is_finished(job)
        if record is not None:
            results[position] = skipped_return(job, record)
        else:
            pending.append(position)
    return results, pending


def skipped_return(job: PlannedJob, record: dict[str, Any]) -> Any:
    """A JobReturn for a job that already finished: not run (its recorded metrics ride
    along in the JobSkipped), with a ``skipped`` event in the ledger."""
    from hydra.core.utils import JobReturn, JobStatus

    task_cfg = OmegaConf.create(job.task_config)
    ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=None,
                    working_dir=os.getcwd(), task_name=None, status=JobStatus.COMPLETED)
    ret.return_value = JobSkipped(job.job_id, job.run_name, "finished", "finished already",
                                  record.get("metrics") or {})
    ret.skipped = True  # type: ignore[attr-defined]
    record_skipped(job, ret.return_value)
    return ret


def record_skipped(job: PlannedJob, skipped: JobSkipped, launcher: str | None = None) -> None:
    """The ledger's ``skipped`` event: this sweep did not run the job (not an outcome)."""
    if job.is_tmgg_job and not skipped.recorded:
        _append_skipped(ledger_for(job.task_config), skipped, launcher)


def _append_skipped(ledger: Ledger, skipped: JobSkipped, launcher: str | None) -> None:
    ledger.append({"event": "skipped", "time": utc_now(), "job_id": skipped.job_id,
                   "run_name": skipped.run_name, "status": "SKIPPED",
                   "reason": skipped.detail, "launcher": launcher})
    skipped.recorded = True


def call_alive_in(ledger: Ledger) -> Callable[[str], bool]:
    """Polls a detached call that holds a claim (and folds its result if it ended), through
    the probe its launcher registered (``tmgg.jobs.launcher_hooks``)."""

    def alive(call_id: str) -> bool:
        from tmgg.jobs.launcher_hooks import call_alive

        return call_alive(ledger, call_id)

    return alive


def claim_for_dispatch(job: PlannedJob, launcher: str, ticket: str | None = None
                       ) -> tuple[claims.Claim | None, Any]:
    """Claim a job right before dispatching it: ``(claim, None)`` to dispatch it, or
    ``(None, JobReturn)`` for a job another dispatch holds or that finished meanwhile.

    The claim's ticket travels with the job, whose own process takes the claim over;
    a retry of the same dispatch (a worker that replaces a crashed one) passes the
    ticket it had, and takes the claim back even from its dead predecessor.
    """
    if not job.is_tmgg_job:
        return None, None
    ledger = ledger_for(job.task_config)
    taken, claim = claims.take(
        ledger.root, job.job_id, ticket=ticket or claims.new_ticket(),
        transport={"kind": launcher},
        call_alive=call_alive_in(ledger),
        extra={"run_name": job.run_name, "dispatcher": claims.this_process()})
    if not taken:
        print(f"{job.run_name}: not dispatched, {claim.describe()}", file=sys.stderr,
              flush=True)
        return None, claimed_return(job, claim)
    record_takeover(ledger, job.job_id, job.run_name, claim, launcher)
    record = is_finished(job)  # checked after claiming: it may have finished meanwhile
    if record is not None:
        claims.release(claim, FINISHED)
        return None, skipped_return(job, record)
    return claim, None


def record_takeover(ledger: Ledger, job_id: str, run_name: str, claim: claims.Claim,
                    launcher: str) -> None:
    """A ``lost`` event when ``claim`` took over another dispatch's unreleased claim
    (its holder was dead: the job was LOST): the ledger then says why the job is
    dispatched again (``tmgg-sweep fsck``'s redispatched-without-end). A hand-over
    within one dispatch (the same ticket) is no loss."""
    took = claim.data.get("took_over")
    if not took or (took.get("ticket") is not None and took.get("ticket") == claim.ticket):
        return
    owner = took.get("owner") or {}
    ledger.append({"event": "lost", "time": utc_now(), "job_id": job_id,
                   "run_name": run_name, "generation": took.get("generation"),
                   "launcher": launcher,
                   "reason": f"claim generation {took.get('generation')} of "
                             f"{owner.get('host')}:{owner.get('pid')} was no longer alive"
                             + (f" ({took.get('damaged')})" if took.get("damaged") else "")
                             + "; taken over by a new dispatch"})


def claimed_return(job: PlannedJob, claim: claims.Claim) -> Any:
    """A JobReturn for a job left to the dispatch that holds it: not run, not failed."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=job.overrides, cfg=OmegaConf.create(job.task_config),
                    hydra_cfg=None, working_dir=os.getcwd(), task_name=None,
                    status=JobStatus.COMPLETED)
    ret.return_value = JobSkipped(job.job_id, job.run_name, "claimed", claim.describe())
    ret.claimed_by = claim.describe()  # type: ignore[attr-defined]
    record_skipped(job, ret.return_value)
    return ret


def release_dispatch(job: PlannedJob, claim: claims.Claim | None, result: Any) -> None:
    """After a job's outcome: release its claim if its own process could not (crashed)."""
    if claim is None or not job.is_tmgg_job or claim.ticket is None:
        return
    status = FINISHED if result.status.name == "COMPLETED" else FAILED
    claims.release_ticket(ledger_for(job.task_config).root, job.job_id, claim.ticket, status)


def record_dispatched(job: PlannedJob, launcher: str, call_id: str | None = None) -> None:
    if job.is_tmgg_job:
        ledger_for(job.task_config).append({
            "event": "dispatched", "time": utc_now(), "job_id": job.job_id,
            "run_name": job.run_name, "launcher": launcher, "call_id": call_id,
        })


def record_outcome(job: PlannedJob, result: Any, launcher: str,
                   write_job_record: bool = False, claim: claims.Claim | None = None,
                   ticket: str | None = None) -> bool:
    """Append the outcome event; for remote jobs also write the job's own record.

    A job that was not run (``JobSkipped``) gets a ``skipped`` event instead, never an
    outcome. The write is fenced: refused once another dispatch holds a newer
    generation of the job's claim than the one the job ran under (``claim``, the
    launcher's claim of the dispatch, or its ``ticket``, or the ticket the job's
    process reported on its JobReturn). A job whose own process recorded its outcome
    already (a fused member) gets no second event. False when the write was refused.
    """
    if not job.is_tmgg_job:
        return False
    skipped = skipped_value(result)
    if skipped is not None:
        record_skipped(job, skipped, launcher)
        return True
    ledger = ledger_for(job.task_config)
    if _fenced_off(ledger, job, result, claim.ticket if claim is not None else ticket):
        return False
    status = outcome_status(result.status.name == "COMPLETED", result._return_value)
    error = None if status in DONE else str(result._return_value)
    metrics = result._return_value if status in DONE else None
    duration = getattr(result, "duration_s", None)
    if not getattr(result, OUTCOME_RECORDED, False):
        ledger.append(outcome_event(job.job_id, job.run_name, status, duration, error,
                                    launcher))
    if write_job_record:
        record = base_record(job.task_config, job.overrides, launcher, in_job_process=False)
        record.update(status=status, finished_at=utc_now(), duration_s=duration, error=error,
                      metrics=metrics if isinstance(metrics, dict) else None)
        if status == PRUNED:
            record["pruned_at_step"] = metrics["pruned_at_step"]
        _record_live_run(record, metrics)
        ledger.write_job_record(job.job_id, record)
    return True


def _fenced_off(ledger: Ledger, job: PlannedJob, result: Any, ticket: str | None) -> bool:
    """Whether a launcher's write about ``job`` is refused: a newer generation of another
    dispatch than ``ticket`` (else the ticket the job's process reported) holds the
    job's claim (then it is logged, naming the holder)."""
    ticket = ticket or getattr(result, CLAIM_TICKET, None)
    newer = claims.fence_ticket(ledger.root, job.job_id, ticket)
    if newer is None:
        return False
    log.warning("%s: its outcome is not recorded by this sweep: the job is now %s",
                job.run_name, newer.describe())
    return True


def outcome_event(job_id: str, run_name: str, status: str, duration: float | None,
                  error: str | None, launcher: str) -> dict[str, Any]:
    """The ledger's ``outcome`` event of a job (FINISHED or FAILED)."""
    return {"event": "outcome", "time": utc_now(), "job_id": job_id, "run_name": run_name,
            "status": status, "duration_s": duration, "error": _first_lines(error),
            "launcher": launcher}


def record_lost_job(job: PlannedJob, result: Any, launcher: str,
                    claim: claims.Claim | None = None) -> Any:
    """The launcher's outcome for a job whose process died before recording its own.

    Call it only once that process is dead: then nothing writes the job's record after
    the launcher, and the job's last RUNNING record cannot hide the crash. That record
    (start time, attempts, output dir) becomes FAILED with the launcher's error. A job
    that recorded FINISHED just before dying stays finished. Returns the JobReturn to
    report (``result``, or the finished one). Fenced as ``record_outcome`` is: nothing
    is written once another dispatch holds a newer generation of the job's claim.
    """
    if not job.is_tmgg_job:
        return result
    ledger = ledger_for(job.task_config)
    if _fenced_off(ledger, job, result, claim.ticket if claim is not None else None):
        return result
    record = ledger.job_record(job.job_id)
    if record and record.get("status") in DONE:  # a real run's result, not a skip
        from hydra.core.utils import JobReturn, JobStatus

        finished = JobReturn(overrides=job.overrides, cfg=OmegaConf.create(job.task_config),
                             hydra_cfg=None, working_dir=os.getcwd(), task_name=None,
                             status=JobStatus.COMPLETED)
        finished.return_value = record.get("metrics") or {}
        finished.skipped = False  # type: ignore[attr-defined]
        return finished
    record = record or base_record(job.task_config, job.overrides, launcher,
                                   in_job_process=False)
    record.update(status=FAILED, finished_at=utc_now(), metrics=None,
                  error=str(result._return_value))
    ledger.write_job_record(job.job_id, record)
    return result


def outcome_status(completed: bool, value: Any) -> str:
    """FINISHED, PRUNED (a trial its sweeper stopped: its metrics say at which step,
    tmgg.jobs.trials) or FAILED."""
    if not completed:
        return FAILED
    from tmgg.jobs.trials import PRUNED_AT_KEY

    return PRUNED if isinstance(value, dict) and PRUNED_AT_KEY in value else FINISHED


def _first_lines(text: str | None, limit: int = 2000) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit] + " ..."


def base_record(task_config: dict[str, Any], overrides: Sequence[str], launcher: str,
                output_dir: str | None = None, in_job_process: bool = True) -> dict[str, Any]:
    """A job record's fixed part. ``in_job_process``: this process runs the job, so its
    platform is the job's; a launcher writing a remote job's record leaves it None."""
    logger = task_config.get("logger", {})
    return {
        "job_id": task_config["job"]["id"],
        "run_name": task_config["job"]["run_name"],
        "stage": task_config["stage"]["name"],
        "overrides": list(overrides),
        "launcher": launcher,
        "host": host(),
        "pid": os.getpid(),
        "output_dir": output_dir,
        "code": code_version(),
        "versions": package_versions(),
        "platform": platform_info() if in_job_process else None,
        "wandb": {
            "entity": logger.get("entity"),
            "project": logger.get("project"),
            "group": logger.get("group"),
            "run_id": _wandb_run_id(task_config),
            "base_url": _pinned_base_url(logger),
            # The mode this job uses where it runs (auto resolved); the live run's mode
            # replaces it when the job ends.
            "mode": _job_wandb_mode(task_config),
            "path": None,
        } if logger.get("name") == "wandb" else None,
        "config": task_config,
    }


def _wandb_run_id(task_config: dict[str, Any]) -> str:
    from tmgg.config.identity import job_wandb_run_id

    return job_wandb_run_id(task_config)


def _pinned_base_url(logger: dict[str, Any]) -> str:
    from tmgg.task.loggers import pinned_base_url

    return pinned_base_url(logger)


def _job_wandb_mode(task_config: dict[str, Any]) -> str | None:
    from tmgg.task.loggers import job_wandb_mode

    return job_wandb_mode(task_config)


def _record_live_run(record: dict[str, Any], metrics: Any) -> None:
    """The W&B path and mode the job's live run actually had (from its metrics)."""
    if not isinstance(metrics, dict) or not record.get("wandb"):
        return
    if metrics.get("wandb_path"):
        record["wandb"]["path"] = metrics["wandb_path"]
    if metrics.get("wandb_mode"):
        record["wandb"]["mode"] = metrics["wandb_mode"]


def _task_dict(config: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(config, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container


# Set in a Modal container (tmgg.launch.modal.app.run_job): the job's claim is the
# launcher's, on the launching machine. A claim taken on the volume would protect
# nothing (each container works on its own snapshot until it commits) and would rest
# on hard links, which Modal does not document for volumes.
LAUNCHER_HOLDS_CLAIMS_ENV = "TMGG_LAUNCHER_HOLDS_CLAIMS"


def job_record_start(config: DictConfig) -> JobSkipped | HeldJob | None:
    """In the job's process (a solo job's callback, a fused member): ``begin_job`` from
    a full config (with its ``hydra`` node)."""
    if not is_tmgg_config(config):
        return None
    task = _task_dict(config)
    job_id = str(task["job"]["id"])
    earlier = _begun_already(job_id)
    if earlier is not _NOT_BEGUN:
        return earlier
    return _start(task, task_overrides(config), launcher_name(config),
                  OmegaConf.select(config, "hydra.runtime.output_dir"))


def _start(task: dict[str, Any], overrides: Sequence[str], launcher: str,
           output_dir: str | None) -> JobSkipped | HeldJob:
    """Claim the job for this process and record it RUNNING, or skip it. Where the
    launcher's claim is the only authority (``LAUNCHER_HOLDS_CLAIMS_ENV``: a job on a
    Modal volume) no claim is taken here: the held job names no claim of its own."""
    ledger = ledger_for(task)
    job_id = str(task["job"]["id"])
    run_name = str(task["job"]["run_name"])
    if output_dir is not None and task.get("outputs_dir"):
        outputs = Path(str(task["outputs_dir"]))
        refuse_links(Path(output_dir), outputs if outputs.is_absolute()
                     else Path(os.getcwd()) / outputs)
    record = base_record(task, overrides, launcher, output_dir=output_dir)
    if os.environ.get(LAUNCHER_HOLDS_CLAIMS_ENV):
        return _begin_held(ledger, job_id, run_name, record, launcher, None)
    taken, claim = claims.take(ledger.root, job_id, ticket=claims.dispatch_ticket(),
                               transport={"kind": launcher},
                               call_alive=call_alive_in(ledger),
                               extra={"run_name": run_name})
    if taken:
        record_takeover(ledger, job_id, run_name, claim, launcher)
    if not taken:
        log.warning("Job %s not run: %s", run_name, claim.describe())
        _SKIPPED[job_id] = JobSkipped(job_id, run_name, "claimed", claim.describe())
        _append_skipped(ledger, _SKIPPED[job_id], launcher)
        return _SKIPPED[job_id]
    return _begin_held(ledger, job_id, run_name, record, launcher, claim)


def _begin_held(ledger: Ledger, job_id: str, run_name: str, record: dict[str, Any],
                launcher: str, claim: claims.Claim | None) -> JobSkipped | HeldJob:
    """With the claim held (``claim``: this process's own; None: the launcher's), skip
    a job that finished meanwhile, else record it RUNNING (fenced by its own claim)."""
    previous = ledger.job_record(job_id)
    if previous and previous.get("status") in DONE:
        if claim is not None:
            claims.release(claim, FINISHED)  # keep the finished (or pruned) record intact
        log.info("Job %s already finished; skipped", run_name)
        _SKIPPED[job_id] = JobSkipped(job_id, run_name, "finished", "finished already",
                                      previous.get("metrics") or {})
        _append_skipped(ledger, _SKIPPED[job_id], launcher)
        return _SKIPPED[job_id]
    record.update(status=RUNNING, started_at=utc_now(),
                  attempts=(previous or {}).get("attempts", 0) + 1)
    if claim is None:
        held = HeldJob(None)
    else:
        held = HeldJob(claim, claims.Heartbeat(claim))
        record["claim"] = {"generation": claim.generation, "ticket": claim.ticket,
                           "pid_start": claim.owner.get("start")}
    try:
        ledger.write_job_record(job_id, record, fence=claim)
    except BaseException:
        held.end()
        if claim is not None:
            with contextlib.suppress(Exception):  # not begun: the claim is nobody's now
                claims.release(claim, FAILED)
        raise
    _HELD[job_id] = held
    return held


def job_record_end(config: DictConfig, job_return: Any) -> None:
    """In the job's process: FINISHED with metrics, or FAILED with the error text."""
    if not is_tmgg_config(config):
        return
    task = _task_dict(config)
    ledger = ledger_for(task)
    job_id = task["job"]["id"]
    if _SKIPPED.pop(job_id, None) is not None:
        return  # not run here: finished already, or another dispatch keeps its record
    value = job_return._return_value
    held = _HELD.pop(job_id, None)
    if held is None:
        return  # never begun by this process: it has nothing to record
    if held.claim is not None:
        # The launcher's outcome for this job is fenced with the ticket it ran under.
        setattr(job_return, CLAIM_TICKET, held.claim.ticket)
    claim, lost = held.end()
    if lost is not None or isinstance(value, claims.ClaimLost):
        log.error("%s", lost or value)
        return  # fenced off: a newer generation holds the job and keeps its record
    record = ledger.job_record(job_id) or base_record(task, [], launcher_name(config))
    completed = job_return.status.name == "COMPLETED"
    started = record.get("started_at")
    record.update(status=outcome_status(completed, value), finished_at=utc_now(),
                  metrics=value if completed and isinstance(value, dict) else None,
                  error=None if completed else _error_text(value))
    if started:
        from datetime import datetime

        delta = datetime.fromisoformat(record["finished_at"]) - datetime.fromisoformat(started)
        record["duration_s"] = round(delta.total_seconds(), 3)
    if completed:
        _record_live_run(record, value)
    if record["status"] == PRUNED:
        record["pruned_at_step"] = value["pruned_at_step"]
    record["platform"] = platform_info()  # threads as the job trained with them
    try:
        # Fenced by this process's claim; under the launcher's claim (None) the
        # launcher fences its own outcome and releases its claim.
        ledger.write_job_record(job_id, record, fence=claim)
        if held.records_outcome and claim is not None:
            ledger.append(outcome_event(job_id, str(task["job"]["run_name"]),
                                        record["status"], record.get("duration_s"),
                                        record.get("error"), launcher_name(config)),
                          fence=claim)
            setattr(job_return, OUTCOME_RECORDED, True)
    except claims.ClaimLost as error:
        log.error("%s", error)
        return
    if claim is not None:  # after the record and outcome: released means recorded
        claims.release(claim, record["status"])


def _error_text(error: Any) -> str:
    import traceback

    if isinstance(error, BaseException) and error.__traceback__ is not None:
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return str(error)
