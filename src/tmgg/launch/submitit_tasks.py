"""SLURM array tasks through submitit: one task per job, or per fused group.

``launch_submitit`` replaces hydra-submitit-launcher's ``launch`` (the launchers in
``hydra_plugins.tmgg_launchers.submitit_launchers``). It groups the sweep like the
local and Modal launchers (``tmgg.launch.common.dispatch_tasks``), submits one array of
tasks, each running its payload through ``tmgg.run.executor.execute_payload``
(the body of the local workers and of the Modal function), and returns one JobReturn
per job in the sweep's order. The jobs write their own records where they run, as
solo submitit jobs do; the launcher appends the dispatched and outcome events, and
records a job whose task died before it could (``record_lost_job``).

A task that SLURM stops at its time limit (USR2) or preempts is requeued by submitit
(``SubmititTask.checkpoint``) with the same payload: a solo job resumes from its
``last.ckpt``, a group resumes each unfinished member from its own and skips the
finished ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.sweep import (
    launcher_name,
    planned_jobs,
    record_dispatched,
    record_lost_job,
    record_outcome,
    split_finished,
)
from tmgg.launch.common import dispatch_tasks, task_payload, task_results
from tmgg.launch.cost import group_time_factor
from tmgg.run.executor import JobFailure

log = logging.getLogger(__name__)

#: Settings of ours that submitit's executor does not take.
TMGG_KEYS = ("fuse", "fuse_max_members")
#: Settings that configure the executor itself rather than each task.
INIT_KEYS = ("submitit_folder", "max_num_timeout")


class SubmititTask:
    """What one array task runs: a job's or a fused group's payload, in the task's process.

    Returns the JobReturn (a group: the list of its members'). ``checkpoint`` is
    submitit's requeue hook (USR2 at the time limit, or a preemption): the same
    payload, resubmitted, resumes from the checkpoints the jobs left.
    """

    def __call__(self, payload: bytes) -> Any:
        from tmgg.run.executor import deserialize, execute_payload

        return deserialize(execute_payload(payload))

    def checkpoint(self, payload: bytes) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, payload)


def executor_for(launcher: Any, largest_task: int) -> Any:
    """submitit's executor with the launcher's settings (as hydra-submitit-launcher
    builds it); the time limit stretched for the largest fused group."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    kind = launcher._EXECUTOR
    params = {k: v for k, v in launcher.params.items() if k not in TMGG_KEYS}
    init = {f"{kind}_max_num_timeout": params["max_num_timeout"]} \
        if "max_num_timeout" in params else {}
    executor = submitit.AutoExecutor(cluster=kind, folder=params["submitit_folder"], **init)
    if largest_task > 1 and params.get("timeout_min"):
        params["timeout_min"] = task_minutes(int(params["timeout_min"]), largest_task)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in shared else f"{kind}_{key}": value
                                  for key, value in params.items() if key not in INIT_KEYS})
    return executor


def task_minutes(job_minutes: int, members: int) -> int:
    """An array task's time limit: one job's, times the group's time factor (the plan
    shows the same figure: ``slurm_resources.describe_launcher``)."""
    return max(1, math.ceil(job_minutes * group_time_factor(members)))


def launch_submitit(launcher: Any, job_overrides: Sequence[Sequence[str]],
                    initial_job_idx: int) -> list[Any]:
    """Submit the sweep's unfinished jobs as one array, a task per job or fused group."""
    config = launcher.config
    jobs = planned_jobs(launcher.hydra_context.config_loader, config, job_overrides,
                        initial_job_idx)
    results, pending = split_finished(jobs)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not pending:
        return results
    tasks = dispatch_tasks(jobs, pending, config, launcher.task_function)
    name = launcher_name(config)
    executor = executor_for(launcher, max(len(task) for task in tasks))
    log.info("Submitit '%s': %d jobs (%d already finished) in %d array tasks, output under %s",
             launcher._EXECUTOR, len(pending), len(jobs) - len(pending), len(tasks), sweep_dir)
    payloads = [task_payload([jobs[p] for p in task], launcher.task_function)
                for task in tasks]
    submitted = executor.map_array(SubmititTask(), payloads)  # sbatch refused: nothing sent
    for position in pending:
        record_dispatched(jobs[position], name, str(submitted[0].job_id).split("_")[0])
    for task, job in zip(tasks, submitted, strict=True):
        for position, result in zip(task, _task_returns(job, [jobs[p] for p in task], name),
                                    strict=True):
            results[position] = result
            record_outcome(jobs[position], result, name)
    return results


def _task_returns(job: Any, task_jobs: Sequence[PlannedJob], launcher: str) -> list[Any]:
    """The JobReturns of one array task; a task that died fails its unfinished jobs."""
    try:
        returned = task_results(job.results()[0])
    except Exception as error:  # noqa: BLE001 - the task's jobs fail, the sweep goes on
        failure = JobFailure("TaskFailed", f"array task {job.job_id} ended without a result: "
                             f"{type(error).__name__}: {error}", "")
        return [record_lost_job(member, _failed(member, failure), launcher)
                for member in task_jobs]
    if len(returned) != len(task_jobs):
        failure = JobFailure("TaskFailed", f"array task {job.job_id} returned {len(returned)} "
                             f"results for {len(task_jobs)} jobs", "")
        return [record_lost_job(member, _failed(member, failure), launcher)
                for member in task_jobs]
    return returned


def _failed(job: PlannedJob, failure: JobFailure) -> Any:
    from hydra.core.utils import JobReturn, JobStatus

    result = JobReturn(overrides=list(job.overrides), status=JobStatus.FAILED)
    result.return_value = failure
    return result
