"""The in-job W&B destination guard (DESIGN.md contract 3).

The plan-time check proves the *config* names the right destination; this callback
proves the *live run* went there. It runs at ``on_fit_start``: after Lightning has
created the W&B run (``_call_setup_hook`` touches ``logger.experiment``) and before
the checkpoint is restored and any optimizer step runs. A run that resolved
anywhere else — a logger built without the pinned values (the stage-1 incident:
the API key's personal entity), a W&B sweep context, a run left over from an
earlier job in a warm worker — is finished as failed and the job aborts with
``WandbDestinationError``; the ledger records the job FAILED with that message.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
# Checked against wandb 0.31.0 (when the run exists in on_fit_start, its entity/project/
# id attributes); tests/test_lock.py fails when the lock moves wandb off it.
WANDB_CHECKED_VERSION = "0.31.0"


class WandbDestinationError(RuntimeError):
    """The live W&B run is not where the job is pinned to log."""

    def __init__(self, message: str, live: str, pinned: str) -> None:
        super().__init__(message)
        self.live = live
        self.pinned = pinned


def destination_problem(live_entity: str | None, live_project: str | None,
                        live_id: str | None, entity: str, project: str,
                        run_id: str | None = None) -> str | None:
    """What is wrong with a live run's destination and id, or None (pure, for tests)."""
    live = f"{live_entity or '<no entity>'}/{live_project or '<no project>'}"
    if (live_entity or "") != entity or (live_project or "") != project:
        return f"W&B run resolved to {live}, job is pinned to {entity}/{project}"
    if run_id is not None and live_id != run_id:
        return (f"W&B run {live}/{live_id} is not this job's run {entity}/{project}/{run_id} "
                "(wandb chose another id: a W&B sweep or launch context, or a run of another "
                "job still active in this process)")
    return None


class WandbDestinationGuard(Callback):
    """Abort before the first training step unless the W&B run is at entity/project."""

    def __init__(self, entity: str, project: str, run_id: str | None = None) -> None:
        self.entity = entity
        self.project = project
        self.run_id = run_id
        self.checked_run: str | None = None

    @classmethod
    def for_job(cls, cfg: DictConfig) -> WandbDestinationGuard:
        """The guard pinned to a composed job config's logger and run id."""
        from tmgg.identity import wandb_run_id

        return cls(str(cfg.logger.entity), str(cfg.logger.project),
                   run_id=wandb_run_id(str(cfg.job.id)))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.check(trainer)

    def check(self, trainer: Any) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._check_run(logger.experiment, int(trainer.global_step))

    def _check_run(self, run: Any, global_step: int) -> None:
        if getattr(run, "disabled", False):
            return  # mode=disabled: nothing is logged anywhere
        problem = destination_problem(run.entity, run.project, run.id, self.entity,
                                      self.project, self.run_id)
        if problem is None:
            self.checked_run = f"{run.entity}/{run.project}/{run.id}"
            log.info("W&B run %s is at its pinned destination", self.checked_run)
            return
        message = (f"{problem}; aborted at global step {global_step}, before the first "
                   f"training step; the stray run {run.id} was finished as failed")
        log.error(message)
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - the abort must not be masked by cleanup
            log.exception("could not finish the stray W&B run %s", run.id)
        raise WandbDestinationError(message, live=f"{run.entity}/{run.project}",
                                    pinned=f"{self.entity}/{self.project}")
