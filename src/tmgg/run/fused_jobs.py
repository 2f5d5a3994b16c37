"""A fused group as a launcher task: each member's bookkeeping as Hydra's run_job does it.

A group travels like a job (``GroupPayload``: the members' ``JobPayload`` bytes in one
payload, through the same ``execute_payload``) and comes back as one ``JobReturn``
per member. For every member, in the process that trains it, this does what Hydra's
``run_job`` does for a solo job: the member's output directory and ``.hydra`` files,
the job callbacks' ``on_job_start`` (the ledger's RUNNING record) before training,
and ``on_job_end`` (FINISHED with metrics, or FAILED with the error, and the member's
outcome event, fenced by its own claim) as soon as the member is done or has failed.
Resume, status, reconcile and report read those records and files and cannot tell a
member from a solo job.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tmgg.run.executor import JobFailure, JobPayload, _restore_singletons

log = logging.getLogger(__name__)


@dataclass
class GroupPayload:
    """The jobs of one fused group: dispatched, trained and returned together."""

    members: list[JobPayload]


@dataclass
class _MemberRun:
    config: DictConfig  # the member's sweep config, hydra.runtime.output_dir set
    task_config: DictConfig
    callbacks: Any
    job_return: Any
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False


def _start_member(payload: JobPayload) -> _MemberRun:
    """run_job's bookkeeping before the task function, for one member."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobReturn, _save_config

    from tmgg.jobs.hydra_callbacks import callbacks_for

    config = copy.deepcopy(payload.sweep_config)
    HydraConfig.instance().set_config(config)
    output_dir = str(OmegaConf.select(config, payload.job_dir_key))
    if payload.job_subdir_key is not None:
        output_dir = os.path.join(output_dir, str(OmegaConf.select(config,
                                                                   payload.job_subdir_key)))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn()
    ret.cfg = task_cfg
    ret.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
    ret.working_dir = os.getcwd()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if config.hydra.output_subdir is not None:
        hydra_output = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
        _save_config(task_cfg, "config.yaml", hydra_output)
        _save_config(ret.hydra_cfg, "hydra.yaml", hydra_output)
        _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
    callbacks = callbacks_for(config)
    run = _MemberRun(config=config, task_config=task_cfg, callbacks=callbacks, job_return=ret)
    callbacks.on_job_start(config=config, task_function=payload.task_function)
    return run


def _end_member(run: _MemberRun, value: Any, failed: bool) -> None:
    """run_job's bookkeeping after the task function: the callbacks' on_job_end."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobStatus

    if run.ended:
        return
    run.ended = True
    ret = run.job_return
    ret.return_value = value
    ret.status = JobStatus.FAILED if failed else JobStatus.COMPLETED
    ret.duration_s = time.perf_counter() - run.started  # type: ignore[attr-defined]
    HydraConfig.instance().set_config(run.config)
    run.callbacks.on_job_end(config=run.config, job_return=ret)
    if failed:
        ret.return_value = JobFailure.from_exception(value)


def run_group_payload(payload: GroupPayload) -> list[Any]:
    """Train a fused group; one JobReturn per member, in the payload's order.

    Every member was claimed with the group's one ticket: each member's own records
    take its claim over with it, as a solo job does.
    """
    from tmgg.jobs.claims import set_dispatch_ticket

    set_dispatch_ticket(payload.members[0].claim_ticket)
    try:
        return _run_group(payload)
    finally:
        set_dispatch_ticket(None)  # a warm worker's next task brings its own


def _run_group(payload: GroupPayload) -> list[Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    from tmgg.jobs.sweep import HeldJob, JobSkipped, job_record_start
    from tmgg.jobs.trials import trial_channel

    first = payload.members[0]
    _restore_singletons(first.singleton_state)
    setup_globals()
    import tmgg  # noqa: F401  (tmgg.* resolvers, in case the state lacked them)

    if first.env:
        os.environ.update(first.env)
    from tmgg.task.fused import FusedMember, run_fused_training

    runs = [_start_member(member) for member in payload.members]
    to_train: list[FusedMember] = []
    run_of: dict[int, _MemberRun] = {}
    for run in runs:
        # Each member is begun as a solo job is (its own claim, its RUNNING record), here
        # where a failure fails the member: a callback's would only be a warning.
        try:
            begun = job_record_start(run.config)
        except Exception as error:  # noqa: BLE001 - this member fails, the others train
            _end_member(run, error, failed=True)
            continue
        if isinstance(begun, JobSkipped):  # finished, or claimed by another dispatch
            log.warning("%s", begun)
            _end_member(run, begun, failed=False)
            continue
        member = FusedMember(cfg=run.task_config,
                             output_dir=Path(run.config.hydra.runtime.output_dir))
        if isinstance(begun, HeldJob):  # stops this member alone once its claim is lost
            member.extra["fence"] = begun.check
            # Under its own claim, its outcome event is written the moment its own test
            # ends, not when the group's last member is done and the launcher hears of
            # the group (under the launcher's claim, the launcher records it).
            begun.records_outcome = begun.holds_own_claim
        # A trial of a pruning study reports each validation to its sweeper
        # (tmgg.jobs.trials); the channel is read from the member's own Hydra config.
        HydraConfig.instance().set_config(run.config)
        channel = trial_channel(run.task_config)
        if channel is not None:
            member.extra["trial"] = channel
        run_of[id(member)] = run
        to_train.append(member)

    def member_done(member: FusedMember) -> None:
        run = run_of[id(member)]
        if member.error is not None:
            _end_member(run, member.error, failed=True)
        else:
            _end_member(run, member.result, failed=False)

    handlers = [_member_log_file(run) for run in runs]
    root = logging.getLogger()
    level = root.level
    for handler in handlers:
        root.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        if to_train:
            run_fused_training(to_train, on_member_done=member_done)
    except Exception as error:  # noqa: BLE001 - every unfinished member fails with it
        log.exception("fused group failed")
        for run in runs:
            _end_member(run, error, failed=True)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    for run in runs:  # a member nobody reported (cannot happen; never leave it RUNNING)
        _end_member(run, RuntimeError("fused member ended without a result"), failed=True)
    return [run.job_return for run in runs]


def _member_log_file(run: _MemberRun) -> logging.Handler:
    """The member's job log (``<output_dir>/<job name>.log``, as Hydra's job logging
    writes a solo job's): the group's records and those about this member alone."""
    from tmgg.task.fused import LOGGING_MEMBER

    output_dir = str(run.config.hydra.runtime.output_dir)
    name = str(OmegaConf.select(run.config, "hydra.job.name") or "app")
    handler = logging.FileHandler(Path(output_dir) / f"{name}.log", mode="a")
    handler.setFormatter(logging.Formatter(
        "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    member_dir = str(Path(output_dir))

    def about_this_member(record: logging.LogRecord) -> bool:
        about = LOGGING_MEMBER.get()
        return about is None or about == member_dir

    handler.addFilter(about_this_member)
    return handler


def build_group_payload(jobs: list[Any], task_function: Any,
                        env: dict[str, str] | None = None,
                        claim_ticket: str | None = None) -> bytes:
    """Bytes of a group's payload (members in the given order)."""
    from hydra.core.singleton import Singleton

    from tmgg.run.executor import serialize

    state = Singleton.get_state()
    return serialize(GroupPayload(members=[
        JobPayload(task_function=task_function, sweep_config=job.sweep_config,
                   singleton_state=state, env=env, claim_ticket=claim_ticket)
        for job in jobs]))
