"""Experiment loggers: W&B with a pinned destination, or CSV with no W&B at all.

The W&B destination (entity, project) comes from the job's composed config and
nowhere else (DESIGN.md contract 3). What wandb 0.31 does with the other sources:

- ``wandb.init(entity=..., project=...)`` arguments beat ``WANDB_ENTITY`` /
  ``WANDB_PROJECT`` and the settings files (``~/.config/wandb/settings``,
  ``./wandb/settings``), *except* in a W&B sweep or launch context
  (``WANDB_SWEEP_ID``, ``WANDB_LAUNCH``), where wandb drops the given entity, project
  and run id and falls back to the environment. So for the moment the run starts,
  the environment is made to agree with the pinned values and the sweep/launch
  variables are removed; disagreeing variables are named in a warning.
- Online, the server may answer with another entity than requested; the in-job
  guard (``tmgg.task.wandb_guard``) compares the live run with the pinned values.
- wandb reads the environment once per process (at ``wandb.setup``); a warm worker
  that set it up in a sweep context is torn down first so the pinned environment
  takes effect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.identity import wandb_run_id
from tmgg.launch.volume_files import off_volume

log = logging.getLogger(__name__)
# Checked against wandb 0.31.0 (how init weighs arguments, environment, sweep/launch
# context and settings files); tests/test_lock.py fails when the lock moves wandb off it.
WANDB_CHECKED_VERSION = "0.31.0"

# Variables that would name the destination if the pinned values were missing.
DESTINATION_VARIABLES = ("WANDB_ENTITY", "WANDB_PROJECT")
# Variables that make wandb.init ignore the entity, project and run id it is given.
CONTEXT_VARIABLES = ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_LAUNCH",
                     "WANDB_LAUNCH_CONFIG_PATH")


def has_wandb_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is online only when a key exists: a fresh machine never fails on it."""
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return "offline" if env_mode == "dryrun" else env_mode
    return "online" if has_wandb_credentials() else "offline"


def environment_conflicts(entity: str, project: str,
                          environ: dict[str, str] | None = None) -> list[str]:
    """``NAME=value`` of every W&B variable that would point a run elsewhere."""
    environ = dict(os.environ if environ is None else environ)
    conflicts = []
    for variable, pinned in zip(DESTINATION_VARIABLES, (entity, project), strict=True):
        value = environ.get(variable)
        if value and value != pinned:
            conflicts.append(f"{variable}={value}")
    conflicts += [f"{variable}={environ[variable]}" for variable in CONTEXT_VARIABLES
                  if environ.get(variable)]
    return conflicts


@contextmanager
def pinned_wandb_environment(entity: str, project: str, job: str = "") -> Iterator[None]:
    """While the W&B run starts, the environment can only name the pinned destination."""
    conflicts = environment_conflicts(entity, project)
    if conflicts:
        log.warning("W&B environment ignored for job %s, pinned to %s/%s: %s", job or "?",
                    entity, project, ", ".join(conflicts))
    saved = {name: os.environ.get(name) for name in DESTINATION_VARIABLES + CONTEXT_VARIABLES}
    os.environ["WANDB_ENTITY"] = entity
    os.environ["WANDB_PROJECT"] = project
    for name in CONTEXT_VARIABLES:
        os.environ.pop(name, None)
    _drop_wandb_context_singleton()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _drop_wandb_context_singleton() -> None:
    """Tear down a wandb set up in a sweep/launch context: it would drop our entity."""
    from wandb.sdk import wandb_setup

    current = getattr(wandb_setup, "_singleton", None)
    settings = getattr(current, "settings_if_loaded", None)
    if settings is not None and (settings.sweep_id or settings.launch):
        import wandb

        log.warning("wandb was set up in a W&B sweep/launch context in this process; "
                    "tearing it down so the pinned destination applies")
        wandb.teardown()


def finish_leftover_run() -> None:
    """A warm worker must never hand the previous job's run to the next job."""
    import wandb

    if wandb.run is not None:
        log.warning("W&B run %s of an earlier job was still active in this process; "
                    "finishing it as failed", wandb.run.id)
        wandb.finish(exit_code=1)


def build_logger(cfg: DictConfig, output_dir: Path) -> Any:
    """The job's logger; for W&B the run is started here, under the pinned environment.

    Run id from the job id with ``resume="allow"`` (a relaunch continues the run),
    name = run name, group = stage, config = the composed job config.
    """
    logger_cfg = cfg.logger
    if logger_cfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    entity, project = str(logger_cfg.entity), str(logger_cfg.project)
    run_name = str(cfg.job.run_name)
    finish_leftover_run()
    # wandb keeps its files open while the run lives: off a Modal Volume, which cannot
    # commit with open files (tmgg.launch.volume_files); output_dir everywhere else.
    save_dir = off_volume(output_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with pinned_wandb_environment(entity, project, job=run_name):
        logger = WandbLogger(
            entity=entity,
            project=project,
            group=str(logger_cfg.get("group") or cfg.stage.name),
            name=run_name,
            id=wandb_run_id(str(cfg.job.id)),
            resume="allow",
            mode=resolve_wandb_mode(str(logger_cfg.mode)),
            save_dir=str(save_dir),
            tags=list(logger_cfg.get("tags") or []),
            config=OmegaConf.to_container(cfg, resolve=True),
            log_model=False,
        )
        _ = logger.experiment  # start the run now, while the environment is pinned
    return logger
