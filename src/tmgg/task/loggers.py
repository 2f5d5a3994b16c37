"""Experiment loggers: W&B with a pinned destination, or CSV with no W&B at all."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.identity import wandb_run_id


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


def build_logger(cfg: DictConfig, output_dir: Path) -> Any:
    logger_cfg = cfg.logger
    if logger_cfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    entity, project = str(logger_cfg.entity), str(logger_cfg.project)
    for variable, pinned in (("WANDB_ENTITY", entity), ("WANDB_PROJECT", project)):
        value = os.environ.get(variable)
        if value and value != pinned:
            warnings.warn(
                f"{variable}={value!r} is ignored: job {cfg.job.run_name} is pinned to "
                f"{entity}/{project}",
                stacklevel=2,
            )
    mode = resolve_wandb_mode(str(logger_cfg.mode))
    return WandbLogger(
        entity=entity,
        project=project,
        group=str(logger_cfg.group) if logger_cfg.get("group") else None,
        name=str(cfg.job.run_name),
        id=wandb_run_id(str(cfg.job.id)),
        resume="allow",
        mode=mode,
        save_dir=str(output_dir),
        tags=list(logger_cfg.get("tags") or []),
        config=OmegaConf.to_container(cfg, resolve=True),
        log_model=False,
    )
