"""The in-job W&B destination guard (DESIGN.md contract 3).

The plan-time check proves the *config* names the right destination; this callback
proves the *live run* went there. It runs at ``on_fit_start``: after Lightning has
created the W&B run (``_call_setup_hook`` touches ``logger.experiment``) and before
the checkpoint is restored and any optimizer step runs. A run that resolved
anywhere else — a logger built without the pinned values (the stage-1 incident:
the API key's personal entity), a W&B sweep context, a run left over from an
earlier job in a warm worker, another W&B host (``WANDB_BASE_URL``) — is finished
as failed and the job aborts with ``WandbDestinationError``; the ledger records the
job FAILED with that message. A run whose mode is not the job's (disabled although
the config does not say so, offline although it must be online) aborts the same way:
nothing in the environment may silence a run.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from tmgg.task.wandb_destination import destination_problem

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


class WandbDestinationGuard(Callback):
    """Abort before the first training step unless the W&B run is at entity/project."""

    def __init__(self, entity: str, project: str, run_id: str | None = None,
                 base_url: str | None = None, mode: str | None = None) -> None:
        self.entity = entity
        self.project = project
        self.run_id = run_id
        self.base_url = base_url
        self.mode = mode
        self.checked_run: str | None = None

    @classmethod
    def for_job(cls, cfg: DictConfig) -> WandbDestinationGuard:
        """The guard pinned to a composed job config's logger, host, mode and run id."""
        from tmgg.config.identity import job_wandb_run_id
        from tmgg.task.loggers import job_wandb_mode, pinned_base_url

        return cls(str(cfg.logger.entity), str(cfg.logger.project),
                   run_id=job_wandb_run_id(cfg), base_url=pinned_base_url(cfg.logger),
                   mode=job_wandb_mode(cfg))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.check(trainer)

    def check(self, trainer: Any) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._check_run(logger.experiment, int(trainer.global_step))

    def check_run(self, run: Any, global_step: int) -> None:
        """Check one live run (a fused group checks each member's run this way)."""
        self._check_run(run, global_step)

    def _check_run(self, run: Any, global_step: int) -> None:
        live_mode = live_run_mode(run)
        if live_mode == "disabled" and self.mode in (None, "disabled"):
            return  # the config says disabled: nothing is logged anywhere
        problem = mode_problem(live_mode, self.mode)
        if problem is None:
            problem = destination_problem(run.entity, run.project, run.id, self.entity,
                                          self.project, self.run_id,
                                          live_base_url=_live_base_url(run),
                                          base_url=self.base_url)
        if problem is None:
            self.checked_run = f"{run.entity}/{run.project}/{run.id}"
            log.info("W&B run %s is at its pinned destination", self.checked_run)
            return
        if live_mode == "disabled":
            message = f"{problem}; aborted at global step {global_step}, before training"
            log.error(message)
            raise WandbDestinationError(message, live="disabled",
                                        pinned=f"{self.entity}/{self.project}")
        message = (f"{problem}; aborted at global step {global_step}, before the first "
                   f"training step; the stray run {run.id} was finished as failed")
        log.error(message)
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - the abort must not be masked by cleanup
            log.exception("could not finish the stray W&B run %s", run.id)
        raise WandbDestinationError(message, live=f"{run.entity}/{run.project}",
                                    pinned=f"{self.entity}/{self.project}")


def live_run_mode(run: Any) -> str:
    """``online``, ``offline`` or ``disabled``: what a live wandb run really does."""
    if getattr(run, "disabled", False):
        return "disabled"
    return "offline" if getattr(run, "offline", False) else "online"


def mode_problem(live_mode: str, mode: str | None) -> str | None:
    """A live run whose mode is not the one the job resolved to (None when they agree)."""
    if mode is None or live_mode == mode:
        return None
    return (f"W&B run is {live_mode}, job's mode is {mode} (logger.mode; the environment "
            "cannot change it)")


def _live_base_url(run: Any) -> str | None:
    try:
        return str(run.settings.base_url)
    except Exception:  # noqa: BLE001 - a run without settings has no host to compare
        return None
