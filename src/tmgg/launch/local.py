"""The local launcher's dispatch: a pool of warm worker processes.

Workers are started once per sweep and have torch and lightning imported before
their first job, so a job costs its training time plus a few milliseconds. With the
default ``forkserver`` start method the heavy imports happen once, in the fork
server (``tmgg.launch.warm``), started at multirun start while Hydra is still
composing the sweep (``LocalWorkersCallback``); every worker is a fork of it.
Results are recorded in the ledger as they arrive. Each worker has its own pipe
(``tmgg.launch.worker_pool``), so a worker killed by the kernel (OOM, SIGKILL) fails
its own job only, FAILED with the signal named; a fresh worker takes the next job.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from tmgg.jobs.claims import new_ticket
from tmgg.jobs.fusion import balance_groups, bank_key, local_workers
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.sweep import (
    claim_for_dispatch,
    planned_jobs,
    record_dispatched,
    record_lost_job,
    record_outcome,
    release_dispatch,
    split_finished,
)
from tmgg.launch.common import (
    dispatch_tasks,
    outcome_rows,
    outcome_summary,
    prepare_sweep_dir,
    print_outcome_table,
    task_payload,
    task_results,
)
from tmgg.launch.sweep_console import SweepConsole, job_log_path
from tmgg.launch.worker_pool import Died, WorkerPool
from tmgg.run.executor import JobFailure, deserialize, execute_payload, serialize

log = logging.getLogger(__name__)
LAUNCHER = "local"


def preload_modules(config: Any) -> list[str]:
    """What every worker imports once before its first job (nothing for non-tmgg apps).

    ``tmgg.launch.warm`` holds the job's own imports; wandb (≈0.6 s) only when the
    sweep logs to W&B, with the launch-inputs module every run start imports (≈2 s,
    once in the forkserver instead of once per worker).
    """
    from omegaconf import OmegaConf

    from tmgg.jobs.plan import is_tmgg_config

    if not is_tmgg_config(config):
        return []
    modules = ["tmgg.launch.warm"]
    if OmegaConf.select(config, "logger.name") == "wandb":
        modules += ["wandb", "wandb.sdk.launch.inputs.internal"]
    return modules


def worker_context(start_method: str, modules: Sequence[str]) -> Any:
    """The multiprocessing context of the workers (forkserver: with the preload set)."""
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver" and modules:
        context.set_forkserver_preload(list(modules))
    return context


def prestart(start_method: str, modules: Sequence[str]) -> None:
    """Start the fork server (and its imports) now, beside Hydra's composition.

    Idempotent: the multirun callback calls it before the plan is composed, the
    launcher's setup again for apps without that callback.
    """
    if start_method != "forkserver":
        return
    import threading
    from multiprocessing import forkserver

    worker_context(start_method, modules)
    threading.Thread(target=forkserver.ensure_running, name="tmgg-forkserver-start",
                     daemon=True).start()


def _init_worker(threads: int, modules: Sequence[str]) -> None:
    """Runs once per worker: pin threads, then import what jobs need (no-op if forked)."""
    _exit_with_parent()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["TMGG_NUM_THREADS"] = str(threads)
    import importlib

    import torch

    torch.set_num_threads(threads)
    for module in modules:
        importlib.import_module(module)


def _exit_with_parent() -> None:
    """A worker whose launcher died (even by SIGKILL) stops instead of running on.

    The parent is the launcher (spawn) or the fork server (forkserver), which exits
    when the launcher does; either way the parent pid changes.
    """
    import threading
    import time

    parent_pid = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="tmgg-parent-watch", daemon=True).start()


def _worker_main(conn: Any, threads: int, modules: Sequence[str], steps: Any = None) -> None:
    """A worker: warm up once, then run task after task until the pipe closes.

    A task is ``(payload, log paths)``: the task's output goes to its jobs' logs
    (``tmgg.launch.worker_console``). Replies ``("ok", pickled JobReturn)``, or
    ``("error", pickled JobFailure)`` when the payload itself could not be run (a
    failing job is an ok reply with a FAILED return).
    """
    # Ctrl-C is the launcher's: it stops the workers and records their jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Never share the launcher's wandb-core service: a job killed mid-run would leave its
    # run id "in use" there, and its retry could not start the same run.
    os.environ.pop("WANDB_SERVICE", None)
    from tmgg.launch.worker_console import count_steps_in, job_console

    count_steps_in(steps)
    _init_worker(threads, modules)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        payload, log_paths = message
        try:
            with job_console(log_paths):
                reply = ("ok", execute_payload(payload))
        except Exception as error:  # noqa: BLE001 - becomes this job's FAILED return
            reply = ("error", serialize(JobFailure.from_exception(error)))
        conn.send(reply)


def _failed_return(job: PlannedJob, failure: JobFailure) -> Any:
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
    ret.return_value = failure
    return ret


def worker_crash(job: PlannedJob, died: Died) -> JobFailure:
    """The error of a job whose worker process died under it (OOM killer, SIGKILL, ...)."""
    return JobFailure("WorkerCrashed", f"{died.describe()} while running job "
                      f"{job.run_name}; its other jobs went on in the remaining workers", "")


def launch_local(launcher: Any, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[Any]:
    params = launcher.params
    config = launcher.config
    jobs = planned_jobs(launcher.hydra_context.config_loader, config, job_overrides,
                        initial_job_idx)
    prepare_sweep_dir(config)
    results, pending = split_finished(jobs)
    n_workers = local_workers(params, len(pending))
    threads = int(params.get("threads_per_worker") or 1)
    modules = preload_modules(config)
    context = worker_context(str(params.get("start_method") or "forkserver"), modules)
    crash_retries = {position: int(params.get("worker_crash_retries") or 0)
                     for position in pending}
    held: dict[int, Any] = {}  # position -> the job's claim, until its outcome
    tickets: dict[tuple[int, ...], str] = {}  # a task run again keeps its ticket
    log.info("Launching %d jobs (%d already finished) on %d local workers", len(pending),
             len(jobs) - len(pending), n_workers)

    # A fused group (jobs of one batch stream) is one task; its results fan out.
    # Split so that the workers finish together (fusion.balance_groups).
    tasks = balance_groups(dispatch_tasks(jobs, pending, config, launcher.task_function),
                           n_workers, lambda position: bank_key(jobs[position]))
    queue: deque[tuple[int, ...]] = deque(tuple(task) for task in tasks)
    progress = bool(params.get("progress", True))
    steps = context.Value("q", 0)  # training steps of every job, added by the workers
    display = SweepConsole(jobs, pending, steps, enabled=progress)
    try:
        _run_tasks(jobs, results, queue, held, tickets, crash_retries, display, launcher,
                   WorkerPool(context, _worker_main, (threads, modules, steps), n_workers,
                              "tmgg-local-worker"))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        _record_interrupted(jobs, results, held)
        from tmgg.config.identity import task_overrides

        stage = jobs[0].stage if jobs else str(config.stage.name)
        print(display.interrupted_line(stage, task_overrides(config)), file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None
    if progress:
        _print_outcome(jobs, results)
    return results


def _run_tasks(jobs: list[PlannedJob], results: list[Any], queue: deque[tuple[int, ...]],
               held: dict[int, Any], tickets: dict[tuple[int, ...], str],
               crash_retries: dict[int, int], display: SweepConsole, launcher: Any,
               workers: WorkerPool) -> None:
    """Hand the tasks to the workers and record every outcome as it arrives."""
    with display as bar, workers as pool:

        def finish(position: int, result: Any) -> None:
            """Every job's outcome is recorded here, once."""
            results[position] = result
            record_outcome(jobs[position], result, LAUNCHER, claim=held.get(position))
            release_dispatch(jobs[position], held.pop(position, None), result)
            bar.ended(position, result)

        def crashed(task: tuple[int, ...], died: Died) -> None:
            """The task's worker is dead: run it again, or record its jobs FAILED."""
            if all(crash_retries[position] > 0 for position in task):
                for position in task:
                    crash_retries[position] -= 1
                log.warning("%s; running it again in a fresh worker",
                            worker_crash(jobs[task[0]], died).message)
                queue.append(task)
                return
            for position in task:
                job = jobs[position]
                failed = _failed_return(job, worker_crash(job, died))
                finish(position, record_lost_job(job, failed, LAUNCHER,
                                                 claim=held.get(position)))

        while queue or pool.busy():
            while queue and (worker := pool.idle_worker()) is not None:
                task = queue.popleft()
                # Claimed when a worker is free for it, not before: a second sweep of the
                # stage meanwhile takes the jobs this one has not reached. One ticket
                # for the task's jobs; a job claimed elsewhere leaves the task.
                ticket = tickets.get(task) or new_ticket()
                claimed: list[int] = []
                for position in task:
                    claim, skipped = claim_for_dispatch(jobs[position], LAUNCHER, ticket=ticket)
                    if skipped is not None:
                        results[position] = skipped
                        bar.ended(position, skipped)
                        continue
                    held[position] = claim
                    claimed.append(position)
                if not claimed:
                    continue
                task = tuple(claimed)
                tickets[task] = ticket
                task_jobs = [jobs[position] for position in task]
                # The one place a task (a job, or a fused group) is handed to a worker.
                for job in task_jobs:
                    record_dispatched(job, LAUNCHER)
                bar.started_task(task)
                logs = [str(path) for job in task_jobs if (path := job_log_path(job))]
                try:
                    worker.send(task, (task_payload(task_jobs, launcher.task_function,
                                                    claim_ticket=ticket), logs))
                except OSError:  # the worker died before it took the task
                    pool.discard(worker)
                    crashed(task, Died(worker.process.pid, worker.process.exitcode))
            for worker, reply in pool.wait():
                task, worker.task = worker.task, None
                if isinstance(reply, Died):
                    crashed(task, reply)
                    continue
                status, value = reply
                try:
                    if status != "ok":
                        raise deserialize(value)
                    returned = task_results(deserialize(value))
                except Exception as error:  # noqa: BLE001 - becomes FAILED jobs
                    failure = JobFailure.from_exception(error)
                    returned = [_failed_return(jobs[position], failure) for position in task]
                for position, result in zip(task, returned, strict=True):
                    finish(position, result)


def _record_interrupted(jobs: Sequence[PlannedJob], results: list[Any],
                        held: dict[int, Any]) -> None:
    """After Ctrl-C (the workers are stopped): the jobs they were running are FAILED,
    interrupted, their claims released; ``tmgg-sweep resume`` runs them again from
    their last checkpoints."""
    for position, claim in list(held.items()):
        job = jobs[position]
        failure = JobFailure("Interrupted", "the sweep was stopped (Ctrl-C) while this job "
                             "ran; `tmgg-sweep resume` runs it again from its last "
                             "checkpoint", "")
        result = record_lost_job(job, _failed_return(job, failure), LAUNCHER)
        results[position] = result
        record_outcome(job, result, LAUNCHER)
        release_dispatch(job, claim, result)
        held.pop(position, None)


def _print_outcome(jobs: Sequence[PlannedJob], results: Sequence[Any]) -> None:
    """The sweep's end: the jobs that did not finish here, as a table, and the count
    (each job that ran already had its line as it ended)."""
    from rich.console import Console

    unfinished = [(job, result) for job, result in zip(jobs, results, strict=True)
                  if result is not None and result.status.name != "COMPLETED"
                  or getattr(result, "claimed_by", None)]
    if unfinished:
        print_outcome_table([job for job, _ in unfinished], [r for _, r in unfinished],
                            title="jobs that did not finish here", summary=False)
    Console(stderr=True).print(outcome_summary(outcome_rows(jobs, results)), soft_wrap=True)
