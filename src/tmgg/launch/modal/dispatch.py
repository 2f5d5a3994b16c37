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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.jobs import claims
from tmgg.jobs.ledger import CANCELLED, DISPATCHED
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.records import utc_now
from tmgg.jobs.sweep import (
    claim_for_dispatch,
    ledger_for,
    planned_jobs,
    record_dispatched,
    release_dispatch,
    split_finished,
)
from tmgg.jobs.trials import TRIAL_CHANNEL_ENV
from tmgg.launch.common import (
    dispatch_tasks,
    prepare_sweep_dir,
    print_outcome_table,
    task_payload,
)
from tmgg.launch.cost import check_cost_limit, group_time_factor, plan_estimates
from tmgg.launch.modal.calls import CALLS_DIR, local_calls_dir, write_call_record
from tmgg.launch.modal.results import (
    LAUNCHER,
    group_returns,
    on_volume,
    record_result,
    to_job_return,
    volume_root,
)
from tmgg.launch.modal.settings import (
    ModalSettings,
    check_settings,
    check_wandb_secret,
    require_wandb_secret,
    trial_store_spec,
)
from tmgg.launch.modal.transport import CallInFlight, call_id_of, open_runner

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
    it records the plan (``tmgg.jobs.launcher_hooks.run_preflight``), so a refused sweep
    leaves no trace; ``launch_modal`` runs it again for apps without the ledger (and
    for the jobs still unfinished when the launch begins).
    """
    settings = check_settings(config.hydra.launcher)
    offline_preflight(config, pending, groups)
    if pending:
        require_wandb_secret(settings)
        from tmgg.launch.modal.app import check_workers_wandb_key

        check_workers_wandb_key(settings, pending)  # the Secret's key, asked where it runs
    return settings


def offline_preflight(config: DictConfig, pending: Sequence[PlannedJob],
                      groups: Sequence[Sequence[int]] | None = None) -> ModalSettings:
    """``preflight`` less what needs credentials or the network: every setting, the cost
    limit, a W&B secret for W&B jobs. ``tmgg-sweep plan`` refuses what this refuses."""
    settings = ModalSettings.from_params(config.hydra.launcher)
    # One container per fused group (``groups``: positions of ``pending`` per container;
    # by default the launcher's grouping of tmgg-train's jobs).
    check_cost_limit(config, plan_estimates(config, pending, groups))
    check_wandb_secret(settings, pending)
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
    if pending and jobs[pending[0]].is_tmgg_job:
        # A pruning trial's channel back (tmgg.jobs.trials): the container cannot see
        # the ledger's directory; other jobs ignore it.
        env[TRIAL_CHANNEL_ENV] = trial_store_spec(
            settings, ledger_for(jobs[pending[0]].task_config).root)
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
    calls_dir = _calls_dir(jobs, config) if settings.detach or settings.local_calls else None
    with open_runner(settings, settings.detach, size, calls_dir) as runner:
        if settings.detach:
            for (members, _), args in zip(claimed_tasks, inputs, strict=True):
                call_id = runner.spawn(args)
                _hand_to_call(jobs, members, held, call_id, settings, root)
                for position in members:
                    results[position] = _detached_return(jobs[position], call_id)
        else:
            _BlockingSweep(runner, jobs, claimed_tasks, held, settings, root, results).run(
                inputs)
    for position in pending:
        if results[position] is None:  # the transport returned fewer outputs than inputs
            results[position] = to_job_return(jobs[position], RuntimeError(
                "the transport returned no result for this job"))
            record_result(jobs[position], results[position], settings, root,
                          ticket=_ticket(held[position]))
            release_dispatch(jobs[position], held[position], results[position])
    if settings.detach:
        _print_detached(jobs, pending, results, settings)
    elif settings.progress:
        print_outcome_table(jobs, results, title=f"modal launcher ({settings.transport}): "
                            f"{len(jobs)} jobs in {len(inputs)} containers")
    return results


def _hand_to_call(jobs: Sequence[PlannedJob], members: Sequence[int], held: dict[int, Any],
                  call_id: str, settings: ModalSettings, root: str | None) -> None:
    """From now on the call answers for these jobs: their claims name it (alive while it
    runs, whatever becomes of this process), the ledger and a call record hold its id
    for ``tmgg-sweep status`` to collect by."""
    grouped = len(members) > 1
    for member, position in enumerate(members):
        job = jobs[position]
        if held[position] is not None:
            held[position] = claims.renew(held[position], transport={
                "kind": LAUNCHER, "call_id": call_id}) or held[position]
        record_dispatched(job, LAUNCHER, call_id)
        write_call_record(job, call_id, settings, root, member=member if grouped else None,
                          group_size=len(members) if grouped else None,
                          ticket=_ticket(held[position]))


def _ticket(claim: Any) -> str | None:
    """The fencing ticket of the launcher's claim of a job (None: no claim)."""
    return claim.ticket if claim is not None else None


class _BlockingSweep:
    """A blocking sweep's calls, awaited; what a lost connection or a Ctrl-C leaves.

    Each call's result is recorded as it finishes (a killed launcher loses no finished
    result). A call the client lost touch with (``CallInFlight``) is not a result: its
    jobs keep their claims (which name the call) and stay in flight for ``tmgg-sweep
    status`` to collect by call id. Ctrl-C asks whether to stop the calls still running
    or to leave them running, detached (``_ask_stop_or_leave``).
    """

    def __init__(self, runner: Any, jobs: Sequence[PlannedJob],
                 claimed_tasks: Sequence[tuple[list[int], str]], held: dict[int, Any],
                 settings: ModalSettings, root: str | None, results: list[Any]) -> None:
        self.runner, self.jobs, self.tasks = runner, jobs, claimed_tasks
        self.held, self.settings, self.root, self.results = held, settings, root, results
        self.done: set[int] = set()  # task indexes whose outcome is settled
        self.in_flight: list[tuple[int, CallInFlight]] = []
        self.stream: Any = None  # the runner's results, as they come
        self.handed: set[int] = set()  # task indexes recorded as dispatched

    def run(self, inputs: Sequence[tuple[bytes, str | None]]) -> None:
        keeper: Any = None
        try:
            call_ids = self.runner.start(inputs)
            for index, ((members, _), call_id) in enumerate(zip(self.tasks, call_ids,
                                                                  strict=True)):
                if call_id is None:  # warm local containers: no call to hand the jobs to
                    for position in members:
                        record_dispatched(self.jobs[position], LAUNCHER)
                else:
                    _hand_to_call(self.jobs, members, self.held, call_id, self.settings,
                                  self.root)
                self.handed.add(index)
            # Queued at Modal, the jobs' claims are this process's to renew until each
            # job's container takes its own over (or, on Modal's volume, until it ends).
            keeper = claims.Heartbeat(*[c for c in self.held.values() if c is not None])
            self.stream = self.runner.results()
            self._collect(keeper)
        except KeyboardInterrupt:
            if keeper is not None:
                keeper.stop()
            if self.stream is not None:  # warm local containers stop here
                self.stream.close()
            self._interrupted()
        if keeper is not None:
            keeper.stop()
        self._report_in_flight()

    def _collect(self, keeper: Any) -> None:
        total = len(self.jobs)
        finished = total - sum(len(members) for members, _ in self.tasks)
        with _progress(self.settings, total, finished) as bar:
            for index, output in self.stream:
                self.done.add(index)
                members = self.tasks[index][0]
                if isinstance(output, CallInFlight):
                    self.in_flight.append((index, output))
                    for position in members:
                        keeper.discard(self.jobs[position].job_id)
                        self.results[position] = _detached_return(self.jobs[position],
                                                                   output.call_id)
                    continue
                task_jobs = [self.jobs[p] for p in members]
                for position, result in zip(members, group_returns(
                        task_jobs, output, self.settings, self.root), strict=True):
                    job = self.jobs[position]
                    self.results[position] = result
                    record_result(job, result, self.settings, self.root,
                                  ticket=_ticket(self.held[position]))
                    if self.held[position] is not None:
                        keeper.discard(job.job_id)
                    release_dispatch(job, self.held[position], result)
                    bar.advance(job, result)

    def _interrupted(self) -> None:
        """Ctrl-C: stop the unfinished calls, or leave them running; record either; exit."""
        import signal

        asking = [False]

        def second_ctrl_c(*_: Any) -> None:
            if asking[0]:  # answers the question: stop
                asking[0] = False
                raise KeyboardInterrupt
            os._exit(130)  # forced: out now, with what was recorded so far

        signal.signal(signal.SIGINT, second_ctrl_c)
        started = [_started_call_id(self.runner, index) for index in range(len(self.tasks))]
        unfinished = [index for index in range(len(self.tasks)) if index not in self.done]
        leavable = all(started[index] is not None for index in unfinished)
        answer = _ask_stop_or_leave(len(unfinished), leavable, asking)
        stage = next((job.stage for job in self.jobs if job.is_tmgg_job), None)
        for index in unfinished:
            members, _ = self.tasks[index]
            call_id = started[index]
            names = ", ".join(self.jobs[p].run_name for p in members)
            if answer == "leave":
                assert call_id is not None
                if index not in self.handed:  # sent before the Ctrl-C, not yet recorded
                    _hand_to_call(self.jobs, members, self.held, call_id, self.settings,
                                  self.root)
                print(f"left running: {names} (call {call_id})", file=sys.stderr)
                continue
            if call_id is not None:
                try:  # one cancel per call: a fused group's members share it
                    self.runner.cancel(call_id)
                except Exception as error:  # noqa: BLE001 - say so; the others still stop
                    print(f"could not stop {names} (call {call_id}): {error}; it stays in "
                          f"flight, stop it with `tmgg-sweep cancel stage={stage}`",
                          file=sys.stderr)
                    continue
            for position in members:
                self._record_cancelled(position, call_id)
            print(f"stopped: {names}" + (f" (call {call_id})" if call_id else ""),
                  file=sys.stderr)
        if answer == "leave" and stage:
            print(f"Collect their results with `tmgg-sweep status stage={stage}`; stop them "
                  f"with `tmgg-sweep cancel stage={stage}` (add the same experiments_dir= "
                  "override if you changed it).", file=sys.stderr)
        raise SystemExit(130)

    def _record_cancelled(self, position: int, call_id: str | None) -> None:
        job = self.jobs[position]
        if not job.is_tmgg_job:
            return
        ledger = ledger_for(job.task_config)
        ledger.append({"event": "cancelled", "time": utc_now(), "job_id": job.job_id,
                       "run_name": job.run_name, "launcher": LAUNCHER, "call_id": call_id})
        claim = self.held[position]
        if claim is not None and claim.ticket is not None:
            claims.release_ticket(ledger.root, job.job_id, claim.ticket, CANCELLED)

    def _report_in_flight(self) -> None:
        if not self.in_flight:
            return
        stage = next((job.stage for job in self.jobs if job.is_tmgg_job), None)
        jobs = sum(len(self.tasks[index][0]) for index, _ in self.in_flight)
        print(f"{jobs} job(s) still in flight: this client lost touch with their calls, "
              "which may still be running on Modal. Nothing was recorded FAILED and their "
              "claims are kept, so no sweep or resume starts them again while they run.",
              file=sys.stderr)
        for index, unreachable in self.in_flight:
            names = ", ".join(self.jobs[p].run_name for p in self.tasks[index][0])
            print(f"  {names}: call {unreachable.call_id}: {unreachable.cause}",
                  file=sys.stderr)
        if stage:
            print(f"Collect them with `tmgg-sweep status stage={stage}` once the connection "
                  f"is back (stop them with `tmgg-sweep cancel stage={stage}`).",
                  file=sys.stderr)


def _started_call_id(runner: Any, index: int) -> str | None:
    """The call id of a task's call if it was sent (a Ctrl-C may come mid-way)."""
    calls = getattr(runner, "calls", None) or []
    return call_id_of(calls[index]) if index < len(calls) else None


def _ask_stop_or_leave(unfinished: int, leavable: bool, asking: list[bool]) -> str:
    """Ask (on the terminal) whether to stop the unfinished calls or leave them running.

    Default, and the answer without a terminal or after 60 s: stop. A second Ctrl-C
    while asking answers stop (``asking[0]`` is true meanwhile: the SIGINT handler
    then raises KeyboardInterrupt here). Calls without a call id (warm local
    containers) can only be stopped: they end with this process.
    """
    import select

    if not unfinished:
        return "stop"
    if not leavable:
        print(f"\nInterrupted: stopping {unfinished} unfinished container call(s) (local "
              "containers end with the launcher).", file=sys.stderr, flush=True)
        return "stop"
    try:
        asking[0] = True
        print(f"\nInterrupted: {unfinished} container call(s) are still running. [s]top "
              "them (default) or [l]eave them running, detached? ", end="", file=sys.stderr,
              flush=True)
        readable, _, _ = select.select([sys.stdin], [], [], 60.0)
        line = sys.stdin.readline() if readable else ""
    except (KeyboardInterrupt, OSError, ValueError):
        line = ""
    finally:
        asking[0] = False
    print(file=sys.stderr)
    return "leave" if line.strip().lower() in ("l", "leave") else "stop"


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
