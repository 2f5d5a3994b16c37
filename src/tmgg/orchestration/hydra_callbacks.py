"""Hydra callbacks that keep the ledger for every launcher.

``LedgerCallback`` is declared in ``conf/train.yaml`` under ``hydra.callbacks``, so
Hydra runs it whichever launcher dispatches the jobs — ours, ``basic`` or submitit:

- ``on_multirun_start`` (launching machine): compose and validate every job of the
  sweep, record the plan; an invalid job stops the sweep before any dispatch.
- ``on_job_start`` / ``on_job_end`` (where the job runs): the job writes its own
  record — RUNNING, then FINISHED or FAILED with metrics or error — by atomic rename.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def callbacks_for(config: DictConfig) -> Any:
    """Hydra's Callbacks object for a job config (what run_job calls)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import JobReturn  # noqa: F401  (import order for hydra)

    return Callbacks(config)


class LedgerCallback(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tmgg.orchestration.plan import PlanError
        from tmgg.orchestration.sweep import record_plan_for_multirun

        try:
            record_plan_for_multirun(config)
        except PlanError as error:
            # Hydra turns a callback's exception into a warning and launches anyway;
            # SystemExit is not an Exception, so it stops the sweep before any dispatch.
            print(f"sweep refused, nothing dispatched: {error}", file=sys.stderr)
            raise SystemExit(2) from error

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tmgg.orchestration.sweep import job_record_start

        job_record_start(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from tmgg.orchestration.sweep import job_record_end

        job_record_end(config, job_return)
