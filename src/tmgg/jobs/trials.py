"""The pruning channel between a trial's job and its sweeper (docs/adaptive.md).

A job of an adaptive stage whose sweeper prunes (``hydra.sweeper.pruner`` not
``none``) reports its validation metric at every validation as a ``reported`` event
in the stage's ledger (durable, appended like every event), then waits for the
sweeper's decision for that step: a file ``trials/<job_id>.<step>.decision`` beside
the ledger holding ``continue`` or ``prune``. On ``prune`` the job stops training at
once (this validation is its last), is tested as usual, marks its W&B run pruned
(summary ``pruned_at_step``, tag ``pruned``) and is recorded ``PRUNED`` with the
step. No optuna import here: the job side is a file append and a file read.

The channel needs the job to see the ledger's directory (the local launcher, SLURM on
a shared file system); a job that gets no decision within ``decision_timeout_s`` (its
sweeper gone) trains on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from tmgg.jobs.ledger import Ledger
from tmgg.jobs.records import utc_now

log = logging.getLogger(__name__)

PRUNED_AT_KEY = "pruned_at_step"
REPORTED_EVENT = "reported"
TRIALS_DIR = "trials"
CONTINUE = "continue"
PRUNE = "prune"


def decision_path(ledger_root: Path, job_id: str, step: int) -> Path:
    return ledger_root / TRIALS_DIR / f"{job_id}.{step}.decision"


def write_decision(ledger_root: Path, job_id: str, step: int, decision: str) -> None:
    """The sweeper's answer to one report, written whole (rename)."""
    path = decision_path(ledger_root, job_id, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(decision)
    os.replace(temporary, path)


def reported_values(ledger: Ledger) -> dict[str, dict[int, float]]:
    """Every job's reported metric by step, from the ledger."""
    values: dict[str, dict[int, float]] = {}
    for event in ledger.events():
        if event.get("event") == REPORTED_EVENT and isinstance(event.get("value"), int | float):
            values.setdefault(str(event["job_id"]), {})[int(event["step"])] = float(
                event["value"])
    return values


def pruning_settings() -> dict[str, Any] | None:
    """The sweeper's pruning settings when this job is a trial of a pruning study,
    else None (read from the job's Hydra config: no optuna, no file)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices") or {}
    if "hydra/sweeper" not in choices or str(choices["hydra/sweeper"]) != "tmgg_optuna":
        return None
    sweeper = OmegaConf.select(hydra_cfg, "sweeper")
    if sweeper is None or str(sweeper.get("pruner") or "none") == "none":
        return None
    return {"metric": str(sweeper.get("metric") or "val/loss"),
            "timeout_s": float(sweeper.get("decision_timeout_s") or 120.0)}


def trial_reporter(task: dict[str, Any] | Any) -> Any:
    """The Lightning callback of a pruning trial's job, or None for any other job."""
    settings = pruning_settings()
    if settings is None:
        return None
    from lightning.pytorch.callbacks import Callback

    from tmgg.jobs.sweep import ledger_for

    ledger = ledger_for(task)
    job_id = str(task["job"]["id"])
    run_name = str(task["job"]["run_name"])

    class TrialReporter(Callback):
        """Report at each validation; stop when the sweeper prunes the trial."""

        pruned_at: int | None = None

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking or self.pruned_at is not None:
                return
            value = trainer.callback_metrics.get(settings["metric"])
            if value is None:
                return
            step = int(trainer.global_step)
            number = float(value)
            ledger.append({"event": REPORTED_EVENT, "time": utc_now(), "job_id": job_id,
                           "run_name": run_name, "step": step, "metric": settings["metric"],
                           "value": number if math.isfinite(number) else None})
            if wait_for_decision(ledger.root, job_id, step, settings["timeout_s"]) != PRUNE:
                return
            self.pruned_at = step
            trainer.should_stop = True
            log.info("%s pruned by its sweeper at step %d", run_name, step)
            mark_wandb_pruned(trainer, step)

    return TrialReporter()


def wait_for_decision(ledger_root: Path, job_id: str, step: int, timeout_s: float) -> str:
    """The sweeper's decision for this report; ``continue`` when none comes in time."""
    path = decision_path(ledger_root, job_id, step)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            if time.monotonic() > deadline:
                log.warning("no pruning decision for %s at step %d within %.0f s; trains on",
                            job_id, step, timeout_s)
                return CONTINUE
            time.sleep(0.02)


def mark_wandb_pruned(trainer: Any, step: int) -> None:
    """The job's W&B run says it was pruned (summary key and tag) before it finishes."""
    logger = trainer.logger
    if logger is None or logger.__class__.__name__ != "WandbLogger":
        return
    run = logger.experiment
    run.summary[PRUNED_AT_KEY] = step
    run.tags = (*tuple(run.tags or ()), "pruned")
