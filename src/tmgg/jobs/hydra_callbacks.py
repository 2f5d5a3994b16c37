"""Hydra callbacks that keep the ledger for every launcher.

``LedgerCallback`` is declared in ``conf/train.yaml`` under ``hydra.callbacks``, so
Hydra runs it whichever launcher dispatches the jobs — ours, ``basic`` or submitit:

- ``on_multirun_start`` (launching machine): compose and validate every job of the
  sweep, record the plan; an invalid job stops the sweep before any dispatch.
- ``on_run_start`` (a single run): the same checks, before Hydra creates its output
  directory.
- ``on_job_start`` / ``on_job_end`` (where the job runs): the job writes its own
  record — RUNNING, then FINISHED or FAILED with metrics or error — by atomic rename.

``LocalWorkersCallback`` runs the launcher's ``before_plan`` hook at multirun start
(the local launcher starts its fork server there).

Hydra turns an exception raised in a callback into a warning and launches anyway, so
every step here that a sweep depends on runs under ``refusing``: any failure stops the
sweep with tmgg's message before anything is dispatched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def callbacks_for(config: DictConfig) -> Any:
    """Hydra's Callbacks object for a job config (what run_job calls)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import JobReturn  # noqa: F401  (import order for hydra)

    return Callbacks(config)


def _refuse(error: Exception, what: str = "sweep refused, nothing dispatched") -> None:
    """Stop the sweep before any dispatch: Hydra turns a callback's exception into a
    warning and launches anyway, but SystemExit is not an Exception."""
    print(f"{what}: {error}", file=sys.stderr)
    raise SystemExit(2) from error


@contextlib.contextmanager
def refusing(what: str = "sweep refused, nothing dispatched",
             step: str | None = None) -> Iterator[None]:
    """Run a callback's step so that any failure stops the sweep with tmgg's message.

    Hydra catches an exception raised in a callback, logs it as a warning and goes on
    to launch: a check that crashed would count as passed. Here a ``PlanError`` is
    refused with its own message, any other exception with ``what`` and the ``step``
    that failed, naming the error's type.
    """
    from tmgg.jobs.plan import PlanError

    try:
        yield
    except PlanError as error:
        _refuse(error, what)
    except Exception as error:  # noqa: BLE001 - Hydra would only warn, then dispatch
        where = f"{step}: " if step else ""
        _refuse(error, f"{what} ({where}{type(error).__name__})")


class LedgerCallback(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tmgg.jobs.sweep import record_plan_for_multirun

        with refusing(step="its plan could not be recorded"):
            record_plan_for_multirun(config)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run is checked like a sweep's jobs, before its output dir exists."""
        if not self.enabled:
            return
        from tmgg.jobs.plan import check_run

        with refusing("run refused, nothing ran"):
            check_run(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Early, and safe to skip: the task function (``tmgg.cli.app.train``) begins the
        job again (idempotent) where a failure fails the job with tmgg's message."""
        if not self.enabled:
            return
        from tmgg.jobs.sweep import job_record_start

        job_record_start(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tmgg.jobs.sweep import job_record_end

        job_record_end(config, job_return)


class LocalWorkersCallback(Callback):
    """Runs the configured tmgg launcher's ``before_plan`` as soon as the multirun starts.

    For ``hydra/launcher=local`` that starts the fork server: Hydra composes every job
    twice before the launcher's ``setup`` (the ledger's plan, then BasicSweeper's own
    check of each job), about a second for a 12-job stage, and started here the
    server's imports (torch, lightning: ≈3 s of one core) run beside that work, not
    after it. For ``=modal`` it refuses bad settings or missing credentials before
    anything is composed. Listed before ``ledger`` in ``conf/train.yaml``; does nothing
    for launchers that are not tmgg's.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tmgg.jobs.launcher_hooks import run_before_plan

        with refusing(step="the launcher's checks before the plan failed"):
            run_before_plan(config)
