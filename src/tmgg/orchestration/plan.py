"""The sweep plan: every job composed by Hydra and validated before any dispatch.

``expand_grid`` reproduces Hydra's basic sweeper (stage params, then command-line
overrides, a later key replacing an earlier one), and ``compose_job`` uses Hydra's
own ``load_sweep_config`` (DESIGN.md contract 1). A job's task config is resolved
on the launching machine and frozen into the plan: the entity and project a job
logs to are decided here, not where it runs (contract 3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tmgg.config import JobConfigError, validate_job_config


class PlanError(RuntimeError):
    """A sweep that must not be dispatched (names the job and the field)."""


@dataclass
class PlannedJob:
    """One composed, validated job."""

    index: int
    job_id: str
    run_name: str
    stage: str
    overrides: list[str]
    # full config incl. hydra node, task part resolved; None for a job read back from
    # plan.json (compose.recorded_job), which is reported on, never dispatched
    sweep_config: DictConfig | None
    task_config: dict[str, Any]  # resolved task config (what the job function gets)
    is_tmgg_job: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def wandb(self) -> dict[str, Any] | None:
        logger = self.task_config.get("logger") or {}
        if logger.get("name") != "wandb":
            return None
        return {k: logger.get(k) for k in ("entity", "project", "group", "mode")}

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "job_id": self.job_id,
            "run_name": self.run_name,
            "stage": self.stage,
            "overrides": self.overrides,
            "wandb": self.wandb,
            **self.extras,
        }


def is_tmgg_config(cfg: DictConfig) -> bool:
    """Hydra's launcher test apps use these launchers too: tmgg rules apply to tmgg jobs."""
    return OmegaConf.select(cfg, "stage.name") is not None and "job" in cfg


def expand_grid(config: DictConfig, arguments: Sequence[str]) -> list[list[str]]:
    """Job override lists exactly as Hydra's BasicSweeper would build them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    parsed = OverridesParser.create().parse_overrides(lines)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batches[0]]


def freeze_task_config(sweep_config: DictConfig) -> DictConfig:
    """Resolve every task key now (the hydra node stays lazy: it needs job runtime)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(sweep_config)
    frozen = copy.deepcopy(sweep_config)
    with read_write(frozen), open_dict(frozen):
        for key in list(frozen.keys()):
            if key == "hydra":
                continue
            node = frozen._get_node(key)
            if OmegaConf.is_config(node):
                OmegaConf.resolve(node)
            else:
                frozen[key] = OmegaConf.select(sweep_config, str(key))
    return frozen


def compose_job(config_loader: Any, master_config: DictConfig, overrides: Sequence[str],
                index: int) -> PlannedJob:
    """Compose one job with Hydra's loader, freeze and validate it."""
    try:
        sweep_config = config_loader.load_sweep_config(master_config, list(overrides))
    except Exception as error:
        raise PlanError(f"job #{index} ({' '.join(overrides)}): {error}") from error
    with read_write(sweep_config.hydra), open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = index
        sweep_config.hydra.job.id = f"job{index}"
    if not is_tmgg_config(sweep_config):
        return PlannedJob(index=index, job_id=f"job{index}", run_name=f"job{index}",
                          stage="", overrides=list(overrides), sweep_config=sweep_config,
                          task_config={}, is_tmgg_job=False)
    label = f"#{index} ({' '.join(overrides)})"
    try:
        frozen = freeze_task_config(sweep_config)
    except Exception as error:
        raise PlanError(f"job {label}: cannot resolve its config: {error}") from error
    task = {k: v for k, v in OmegaConf.to_container(frozen, resolve=False).items()
            if k != "hydra"}
    run_name = str(task["job"]["run_name"])
    try:
        validate_job_config(OmegaConf.create(task), job=run_name)
    except JobConfigError as error:
        raise PlanError(str(error)) from error
    return PlannedJob(index=index, job_id=str(task["job"]["id"]), run_name=run_name,
                      stage=str(task["stage"]["name"]), overrides=list(overrides),
                      sweep_config=frozen, task_config=task)


def compose_plan(config_loader: Any, master_config: DictConfig,
                 job_overrides: Sequence[Sequence[str]], initial_index: int = 0
                 ) -> list[PlannedJob]:
    """Compose and validate every job; refuse duplicate identities."""
    jobs = [compose_job(config_loader, master_config, overrides, initial_index + i)
            for i, overrides in enumerate(job_overrides)]
    seen: dict[str, PlannedJob] = {}
    names: dict[str, PlannedJob] = {}
    for job in jobs:
        if not job.is_tmgg_job:
            continue
        if job.job_id in seen:
            raise PlanError(f"jobs #{seen[job.job_id].index} and #{job.index} have the same "
                            f"job id {job.job_id}: they compose to the same task config, "
                            "so the sweep lists one job twice")
        if job.run_name in names:
            raise PlanError(f"jobs {names[job.run_name].job_id} and {job.job_id} share the run "
                            f"name {job.run_name}: the stage's run_name template must include "
                            "every swept key")
        seen[job.job_id] = job
        names[job.run_name] = job
    return jobs
