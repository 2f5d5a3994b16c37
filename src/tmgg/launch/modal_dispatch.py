"""``hydra/launcher=modal``: check, then dispatch a sweep, blocking or detached.

What decides what a sweep does lives here once, for both transports: the refusals
before anything is recorded (``preflight``: settings, credentials, cost limit, W&B
secret), skipping finished jobs, payloads (cloudpickled exactly as sent), the ledger
events, the progress display and the outcome table. The pieces it composes:

- ``modal_settings``: ``hydra.launcher`` checked, and the credential check;
- ``modal_transport``: Modal itself or local processes standing in for containers;
- ``modal_results``: jobs on the volume, outputs as JobReturns and ledger records;
- ``modal_calls``: detached calls, folded by ``tmgg-sweep status``, stopped by
  ``tmgg-sweep cancel``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.launch.common import (
    dispatch_tasks,
    prepare_sweep_dir,
    print_outcome_table,
    task_payload,
)
from tmgg.launch.cost import check_cost_limit, group_time_factor, plan_estimates
from tmgg.launch.modal_calls import CALLS_DIR, local_calls_dir, write_call_record
from tmgg.launch.modal_results import (
    LAUNCHER,
    member_outputs,
    on_volume,
    record_result,
    to_job_return,
    volume_root,
)
from tmgg.launch.modal_settings import (
    ModalSettings,
    check_settings,
    check_wandb_secret,
    require_wandb_secret,
)
from tmgg.launch.modal_transport import open_runner
from tmgg.orchestration import claims
from tmgg.orchestration.ledger import DISPATCHED
from tmgg.orchestration.plan import PlannedJob
from tmgg.orchestration.sweep import (
    claim_for_dispatch,
    ledger_for,
    planned_jobs,
    record_dispatched,
    release_dispatch,
    split_finished,
)

log = logging.getLogger(__name__)


def _detached_return(job: PlannedJob, call_id: str) -> Any:
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=list(job.overrides),
                    cfg=OmegaConf.create(job.task_config) if job.is_tmgg_job else None,
                    status=JobStatus.COMPLETED)
    ret.return_value = {"status": DISPATCHED, "call_id": call_id}
    ret.detached = True  # type: ignore[attr-defined]
    return ret


class _LineProgress:
    """One line per finished job (Modal's own output owns the live display)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.done = enabled, total, completed

    def __enter__(self) -> _LineProgress:
        return self

    def advance(self, job: PlannedJob, result: Any) -> None:
        self.done += 1
        if self.enabled:
            status = "ok" if result.status.name == "COMPLETED" else "FAILED"
            print(f"[{self.done}/{self.total}] {job.run_name}: {status}", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc: Any) -> None:
        return None


def _progress(settings: ModalSettings, total: int, completed: int) -> Any:
    if settings.transport == "local":
        try:  # the local launcher's rich bar: nothing else owns the terminal here
            from tmgg.launch.local import _Progress as rich_progress
        except ImportError:
            pass
        else:
            return rich_progress(settings.progress, total, completed)
    return _LineProgress(settings.progress, total, completed)


def _calls_dir(jobs: Sequence[PlannedJob], config: DictConfig) -> Path:
    tmgg_jobs = [job for job in jobs if job.is_tmgg_job]
    if tmgg_jobs:
        return local_calls_dir(ledger_for(tmgg_jobs[0].task_config).root)
    return Path(str(config.hydra.sweep.dir)) / f".{CALLS_DIR}"


def preflight(config: DictConfig, pending: Sequence[PlannedJob],
              groups: Sequence[Sequence[int]] | None = None) -> ModalSettings:
    """Every refusal this launcher makes before dispatch, for the jobs still to run.

    Settings, credentials, the cost limit and the W&B secret (that it is set when jobs
    log to W&B online, and, on Modal, that it exists: one lookup). The ledger runs it before
    it records the plan (``tmgg.launch.common.launcher_preflight``), so a refused sweep
    leaves no trace; ``launch_modal`` runs it again for apps without the ledger (and
    for the jobs still unfinished when the launch begins).
    """
    settings = check_settings(config.hydra.launcher)
    # One container per fused group (``groups``: positions of ``pending`` per container;
    # by default the launcher's grouping of tmgg-train's jobs).
    check_cost_limit(config, plan_estimates(config, pending, groups))
    check_wandb_secret(settings, pending)
    if pending:
        require_wandb_secret(settings)
        from tmgg.launch.modal_app import check_workers_wandb_key

        check_workers_wandb_key(settings, pending)  # the Secret's key, asked where it runs
    return settings


def launch_modal(launcher: Any, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[Any]:
    """Check, then dispatch every unfinished job of the sweep; JobReturns in job order.

    One container call per task: a job alone, or a fused group (``hydra.launcher.fuse``)
    whose call returns one JobReturn per member. Each member is recorded as a solo job
    is (dispatched, outcome, its record with the call), so status, cancel, resume and
    reconcile see jobs, never groups.
    """
    config = launcher.config
    jobs = planned_jobs(launcher.hydra_context.config_loader, config, job_overrides,
                        initial_job_idx)
    results, pending = split_finished(jobs)
    tasks = dispatch_tasks(jobs, pending, config, launcher.task_function)
    settings = task_settings(preflight(config, [jobs[p] for p in pending], groups=[
        [pending.index(p) for p in task] for task in tasks]), tasks)
    prepare_sweep_dir(config)
    held: dict[int, Any] = {}  # position -> the job's claim, taken before it is sent
    claimed_tasks: list[tuple[list[int], str]] = []  # the members still to send, ticket
    for task in tasks:
        ticket = claims.new_ticket()  # one ticket for a task's jobs, as the local launcher
        members = []
        for position in task:
            claim, skipped = claim_for_dispatch(jobs[position], LAUNCHER, ticket=ticket)
            if skipped is not None:  # held by another sweep (or a detached call still running)
                results[position] = skipped
                continue
            held[position] = claim
            members.append(position)
        if members:
            claimed_tasks.append((members, ticket))
    pending = [p for members, _ in claimed_tasks for p in members]
    root = volume_root(settings)
    env = {"TMGG_NUM_THREADS": str(settings.container_threads())}
    inputs = [(task_payload([on_volume(jobs[p], root) for p in members], launcher.task_function,
                            env, claim_ticket=ticket if held[members[0]] else None),
               settings.volume) for members, ticket in claimed_tasks]
    size = settings.local_size(len(inputs))
    where = (f"Modal ({settings.gpu or 'CPU-only'}, app {settings.app_name})"
             if settings.transport == "modal" else f"{size} local containers")
    log.info("Launching %d jobs in %d containers (%d already finished) on %s", len(pending),
             len(inputs), len(jobs) - len(pending), where)
    if not pending:
        if settings.progress:
            print_outcome_table(jobs, results, title=f"modal launcher: {len(jobs)} jobs")
        return results
    calls_dir = _calls_dir(jobs, config) if settings.detach else None
    with open_runner(settings, settings.detach, size, calls_dir) as runner:
        if settings.detach:
            for (members, _), args in zip(claimed_tasks, inputs, strict=True):
                call_id = runner.spawn(args)
                for member, position in enumerate(members):
                    job = jobs[position]
                    if held[position] is not None:  # from now on, the call answers for it
                        claims.renew(held[position], transport={"kind": LAUNCHER,
                                                                "call_id": call_id})
                    record_dispatched(job, LAUNCHER, call_id)
                    grouped = len(members) > 1
                    write_call_record(job, call_id, settings, root,
                                      member=member if grouped else None,
                                      group_size=len(members) if grouped else None)
                    results[position] = _detached_return(job, call_id)
        else:
            for position in pending:
                record_dispatched(jobs[position], LAUNCHER)
            # Queued at Modal, the jobs' claims are this process's to renew until each
            # job's container takes its own over (or, on Modal's volume, until it ends).
            keeper = claims.Heartbeat(*[c for c in held.values() if c is not None])
            with _progress(settings, len(jobs), len(jobs) - len(pending)) as bar:
                # Recorded as each call finishes: a killed launcher loses no finished result.
                for index, output in runner.map(inputs):
                    members = claimed_tasks[index][0]
                    task_jobs = [jobs[p] for p in members]
                    for position, result in zip(members, task_returns(task_jobs, output),
                                                strict=True):
                        job = jobs[position]
                        results[position] = result
                        record_result(job, result, settings, root)
                        if held[position] is not None:
                            keeper.discard(job.job_id)
                        release_dispatch(job, held[position], result)
                        bar.advance(job, result)
            keeper.stop()
    for position in pending:
        if results[position] is None:  # the transport returned fewer outputs than inputs
            results[position] = to_job_return(jobs[position], RuntimeError(
                "the transport returned no result for this job"))
            record_result(jobs[position], results[position], settings, root)
            release_dispatch(jobs[position], held[position], results[position])
    if settings.detach:
        _print_detached(jobs, pending, results, settings)
    elif settings.progress:
        print_outcome_table(jobs, results, title=f"modal launcher ({settings.transport}): "
                            f"{len(jobs)} jobs in {len(inputs)} containers")
    return results


def task_settings(settings: ModalSettings, tasks: Sequence[Sequence[int]]) -> ModalSettings:
    """The settings a sweep's containers get: timeout_s stretched for its largest group.

    ``timeout_s`` bounds one job; a fused group's container runs its members together,
    for about ``group_time_factor`` times one job's time (tmgg/launch/cost.py), so the
    container's limit grows by the same factor (within Modal's 86400 s).
    """
    largest = max((len(task) for task in tasks), default=1)
    if largest <= 1:
        return settings
    timeout = min(86400, math.ceil(settings.timeout_s * group_time_factor(largest)))
    return dataclasses.replace(settings, timeout_s=timeout)


def task_returns(task_jobs: Sequence[PlannedJob], output: Any) -> list[Any]:
    """A container call's output as one JobReturn per job of its task.

    A group's call returns its members' JobReturns (a list, in payload order); a call
    that failed as a whole (its container lost after the last retry, a time-out) fails
    every member it had not finished, with the call's error.
    """
    if len(task_jobs) == 1:
        return [to_job_return(task_jobs[0], output)]
    returned = member_outputs(output, len(task_jobs))
    return [to_job_return(job, value) for job, value in zip(task_jobs, returned, strict=True)]


def _print_detached(jobs: Sequence[PlannedJob], pending: Sequence[int], results: Sequence[Any],
                    settings: ModalSettings) -> None:
    if not settings.progress:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"modal launcher ({settings.transport}, detached): "
                        f"{len(pending)} jobs dispatched")
    for column in ("job", "call id"):
        table.add_column(column)
    for position in pending:
        table.add_row(jobs[position].run_name, str(results[position].return_value["call_id"]))
    console = Console(stderr=True)
    console.print(table)
    stage = next((job.stage for job in jobs if job.is_tmgg_job), None)
    if stage:
        console.print(f"Follow with `tmgg-sweep status stage={stage}`; stop with "
                      f"`tmgg-sweep cancel stage={stage}` (add the same experiments_dir= "
                      "override if you changed it).")
