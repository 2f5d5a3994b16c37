"""The job executor: the one function that runs a job, wherever it runs.

The local launcher calls ``execute_payload`` in a warm worker process; the Modal
launcher calls it inside a container (DESIGN.md contract 4). A payload is a
cloudpickled ``JobPayload`` — bytes that can cross any transport — and the result
is a cloudpickled ``JobReturn`` whose failure, if any, is a ``JobFailure`` carrying
the remote traceback as text (tracebacks themselves do not pickle).
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle


class JobFailure(Exception):
    """A job's exception, carried back across a process or network boundary."""

    def __init__(self, error_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(error_type, message, remote_traceback)
        self.error_type = error_type
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if not self.remote_traceback:  # e.g. a process that died without a word
            return f"{self.error_type}: {self.message}"
        return f"{self.error_type}: {self.message}\n\nRemote traceback:\n{self.remote_traceback}"

    @classmethod
    def from_exception(cls, error: BaseException) -> JobFailure:
        if isinstance(error, JobFailure):
            return error
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls(type(error).__name__, str(error), text)


@dataclass
class JobPayload:
    """Everything a job needs, sent as bytes: nothing is re-composed remotely."""

    task_function: Any
    sweep_config: Any  # DictConfig with the task part frozen
    singleton_state: dict[Any, Any]
    job_dir_key: str = "hydra.sweep.dir"
    job_subdir_key: str | None = "hydra.sweep.subdir"
    env: dict[str, str] | None = None
    claim_ticket: str | None = None  # the job's process takes its claim over with it


def serialize(obj: Any) -> bytes:
    return cloudpickle.dumps(obj)


def deserialize(blob: bytes) -> Any:
    return cloudpickle.loads(blob)


def _restore_singletons(state: dict[Any, Any]) -> None:
    """Hydra's Singleton.set_state, keeping a warm worker's discovered plugins."""
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton
    from omegaconf.basecontainer import BaseContainer

    plugins = Singleton._instances.get(Plugins)
    Singleton._instances = dict(state["instances"])
    if plugins is not None:
        Singleton._instances[Plugins] = plugins
    else:
        Plugins.instance()
    BaseContainer._resolvers = dict(state["omegaconf_resolvers"])


def run_payload(payload: JobPayload) -> Any:
    """Run one job with Hydra's run_job (output dir, .hydra files, callbacks)."""
    from hydra.core.utils import run_job, setup_globals
    from hydra.types import HydraContext

    from tmgg.jobs.hydra_callbacks import callbacks_for

    _restore_singletons(payload.singleton_state)
    setup_globals()
    import tmgg  # noqa: F401  (tmgg.* resolvers, in case the state lacked them)

    if payload.env:
        os.environ.update(payload.env)
    config = payload.sweep_config
    context = HydraContext(config_loader=None, callbacks=callbacks_for(config))  # type: ignore[arg-type]
    started = time.perf_counter()
    from tmgg.jobs.claims import set_dispatch_ticket

    set_dispatch_ticket(payload.claim_ticket)
    try:
        result = run_job(hydra_context=context, task_function=payload.task_function,
                         config=config, job_dir_key=payload.job_dir_key,
                         job_subdir_key=payload.job_subdir_key)
    finally:
        set_dispatch_ticket(None)  # a warm worker's next job brings its own
    result.duration_s = time.perf_counter() - started  # type: ignore[attr-defined]
    if result.status.name == "FAILED":
        result.return_value = JobFailure.from_exception(result._return_value)
    return result


def execute_payload(blob: bytes) -> bytes:
    """Bytes in, bytes out: the body of the local worker and the Modal function.

    A fused group's payload (``tmgg.run.fused_jobs.GroupPayload``) comes back
    as a list of JobReturns, one per member.
    """
    payload = deserialize(blob)
    if hasattr(payload, "members"):
        from tmgg.run.fused_jobs import run_group_payload

        return serialize(run_group_payload(payload))
    return serialize(run_payload(payload))
