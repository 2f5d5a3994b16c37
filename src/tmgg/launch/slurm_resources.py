"""SLURM resources of a submitit sweep: the time-limit resolver and the plan's view.

The time-limit resolver ``tmgg.slurm_minutes``, which the launcher presets in
``conf/hydra/launcher/`` (``slurm``, ``submitit_local_tmgg``) use to derive a job's time
limit from the trainer budget, lives in ``tmgg.config.slurm_time``: ``import tmgg``
registers it, below every launcher. ``describe_launcher`` gives ``tmgg-sweep plan`` the
resources every job will request, read from the same composed config the launcher is
built from, so the plan shows what sbatch will get without submitting anything.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.config.slurm_time import slurm_minutes  # noqa: F401  (importable from here)

SUBMITIT_TARGET_PREFIXES = ("hydra_plugins.hydra_submitit_launcher.",
                            "hydra_plugins.tmgg_launchers.submitit_launchers.")

# Input environment variables of sbatch that override the #SBATCH lines submitit
# writes (sbatch(1): environment variables override options in the batch script).
SBATCH_ENV = {"partition": "SBATCH_PARTITION", "account": "SBATCH_ACCOUNT",
              "qos": "SBATCH_QOS", "time_limit": "SBATCH_TIMELIMIT"}

# The keys of hydra.launcher the plan shows, in display order.
_RESOURCE_KEYS = ("partition", "account", "qos", "nodes", "tasks_per_node", "gpus_per_node",
                  "cpus_per_task", "mem_gb", "timeout_min", "max_num_timeout",
                  "signal_delay_s", "array_parallelism", "name", "submitit_folder")


def format_minutes(minutes: int) -> str:
    """SLURM's [D-]HH:MM:SS form of a time limit in minutes."""
    days, rest = divmod(int(minutes), 24 * 60)
    hours, mins = divmod(rest, 60)
    clock = f"{hours:02d}:{mins:02d}:00"
    return f"{days}-{clock}" if days else clock


def is_submitit_launcher(master_config: DictConfig) -> bool:
    target = OmegaConf.select(master_config, "hydra.launcher._target_", default=None)
    return isinstance(target, str) and target.startswith(SUBMITIT_TARGET_PREFIXES)


def _resource_rules() -> dict[str, Any]:
    from tmgg.config.schema import (
        integer_at_least,
        non_negative_int,
        optional,
        positive_int,
        positive_number,
    )

    return {"timeout_min": positive_int, "nodes": positive_int, "tasks_per_node": positive_int,
            "gpus_per_node": optional(non_negative_int), "cpus_per_task": optional(positive_int),
            "mem_gb": optional(positive_number), "max_num_timeout": non_negative_int,
            "signal_delay_s": non_negative_int,
            "array_parallelism": optional(integer_at_least(1))}


def check_submitit_settings(master_config: DictConfig) -> None:
    """Refuse resources sbatch (or submitit's local executor) would only reject after the
    plan is recorded: a zero time limit, no nodes, negative GPUs, zero memory."""
    if not is_submitit_launcher(master_config):
        return
    from tmgg.launch.cost import LauncherSettingError

    launcher = master_config.hydra.launcher
    for key, rule in _resource_rules().items():
        if key not in launcher:
            continue
        try:
            value = OmegaConf.select(launcher, key, throw_on_resolution_failure=True)
        except Exception as error:
            raise LauncherSettingError(f"hydra.launcher.{key}", f"cannot resolve: {error}") \
                from error
        problem = rule(value)
        if problem:
            raise LauncherSettingError(f"hydra.launcher.{key}", problem)
    from tmgg.jobs.fusion import fusion_settings

    fusion_settings(master_config)  # fuse, fuse_max_members: the local launcher's rules


def describe_launcher(master_config: DictConfig, largest_group: int = 1) -> dict[str, Any]:
    """Resources each job of the sweep requests, or {} for a launcher that is not submitit.

    Every job of a submitit sweep gets the same resources: the launcher is built once
    from the master config (a swept ``trainer.max_steps`` does not change the time
    limit; the stage's value does). ``env_overrides`` lists sbatch input variables of
    this shell that will replace a configured value. ``largest_group``: the most jobs
    in one fused group (one array task); the array's time limit covers it
    (``tmgg.launch.submitit_tasks.task_minutes``), shown as ``task_time_limit``.
    """
    if not is_submitit_launcher(master_config):
        return {}
    check_submitit_settings(master_config)
    launcher = master_config.hydra.launcher
    target = str(launcher._target_)
    executor = "slurm" if target.endswith("SlurmLauncher") else "local"
    resources: dict[str, Any] = {"executor": executor}
    for key in _RESOURCE_KEYS:
        if key in launcher:
            try:
                resources[key] = OmegaConf.select(launcher, key, throw_on_resolution_failure=True)
            except Exception as error:
                raise ValueError(f"hydra.launcher.{key}: cannot resolve: {error}") from error
    if "timeout_min" in resources:
        resources["time_limit"] = format_minutes(int(resources["timeout_min"]))
        if largest_group > 1:
            from tmgg.launch.cost import group_time_factor

            minutes = max(1, math.ceil(int(resources["timeout_min"])
                                       * group_time_factor(largest_group)))
            resources["task_time_limit"] = format_minutes(minutes)
    if executor == "slurm":
        overrides = {}
        for key, variable in SBATCH_ENV.items():
            value = os.environ.get(variable)
            configured = resources.get(key)
            if value and str(value) != str(configured):
                overrides[variable] = value
        if overrides:
            resources["env_overrides"] = overrides
    return resources


def format_resources(resources: dict[str, Any]) -> str:
    """One line for the plan: ``slurm: partition=gpu gpus=1 cpus=4 mem=8GB time=00:10:00``."""
    if not resources:
        return ""
    unset = "(cluster default)" if resources["executor"] == "slurm" else "-"

    def show(value: Any) -> str:
        return unset if value is None else str(value)

    parts = [f"{resources['executor']}:"]
    if resources["executor"] == "slurm":
        parts += [f"partition={show(resources.get('partition'))}",
                  f"account={show(resources.get('account'))}"]
        if resources.get("qos"):
            parts.append(f"qos={resources['qos']}")
    parts += [f"gpus={show(resources.get('gpus_per_node'))}",
              f"cpus={show(resources.get('cpus_per_task'))}",
              "mem=" + (unset if resources.get("mem_gb") is None else f"{resources['mem_gb']}GB"),
              f"time={resources.get('time_limit', '?')}"]
    if "task_time_limit" in resources:
        parts.append(f"(a fused group's array task: time={resources['task_time_limit']})")
    if "max_num_timeout" in resources:
        parts.append(f"requeues={resources['max_num_timeout']}")
    for variable, value in (resources.get("env_overrides") or {}).items():
        parts.append(f"[{variable}={value} overrides the config]")
    return " ".join(parts)


# What decides a W&B job's identity where it runs: the key, the entity a run falls back
# to, the host, and where wandb looks a key up (``.netrc``, ``wandb login``).
_WANDB_IDENTITY = re.compile(
    r"\b(WANDB_API_KEY|WANDB_ENTITY|WANDB_BASE_URL|NETRC)\b|\.netrc\b|\bwandb\s+login\b")


def check_workers_wandb_environment(master_config: DictConfig, jobs: Sequence[Any]) -> None:
    """Refuse a submitit sweep whose W&B jobs would log with a key nobody checked.

    The plan-time check uses this shell's ``WANDB_API_KEY``. A submitit job inherits the
    environment of the shell that submits it (submitit's local executor starts it with
    this process's environment; sbatch exports the whole environment unless told
    otherwise), so the checked key is the workers' key unless the launcher config or
    sbatch's own input variable changes what the workers get: a ``setup`` line that
    sets or logs in a W&B key, entity, host or netrc, or an ``--export`` (in
    ``additional_parameters``, ``srun_args`` or ``SBATCH_EXPORT``) that withholds this
    shell's environment or sets one of those. Those keys cannot be checked from here
    before dispatch, so such a sweep is refused, naming the job and the field.
    """
    if not is_submitit_launcher(master_config):
        return
    job = next((job for job in jobs if getattr(job, "is_tmgg_job", False) and job.wandb
                and job.wandb.get("config_mode") in ("online", "auto")), None)
    if job is None:
        return
    from tmgg.launch.cost import LauncherSettingError

    launcher = OmegaConf.to_container(master_config.hydra.launcher, resolve=False)
    assert isinstance(launcher, dict)
    unchecked = ("the plan checked this shell's W&B key, and a key set for the workers "
                 "cannot be checked before dispatch. Export the key (and WANDB_ENTITY) in "
                 "this shell instead, or log with logger.mode=offline")
    where = f"job {job.run_name} logs to W&B (logger.mode={job.wandb['config_mode']})"
    for number, line in enumerate(launcher.get("setup") or []):
        found = _WANDB_IDENTITY.search(str(line))
        if found:
            raise LauncherSettingError(
                f"hydra.launcher.setup[{number}]",
                f"{where}, but this line changes the workers' {found.group(0)}: {unchecked}")
    exports = [("hydra.launcher.additional_parameters.export",
                (launcher.get("additional_parameters") or {}).get("export")),
               ("SBATCH_EXPORT (this shell's sbatch variable)", os.environ.get("SBATCH_EXPORT"))]
    srun_export = re.search(r"--export[= ](\S+)", " ".join(map(str, launcher.get("srun_args")
                                                             or [])))
    if srun_export:
        exports.append(("hydra.launcher.srun_args", srun_export.group(1)))
    for field, value in exports:
        problem = _export_problem(value)
        if problem:
            raise LauncherSettingError(field, f"{where}, but {problem}: {unchecked}")


def _export_problem(value: Any) -> str | None:
    """Why an sbatch/srun ``--export`` value gives the workers another W&B identity
    than this shell's (None when they get this shell's)."""
    if value is None:
        return None
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    names = {item.split("=", 1)[0] for item in items}
    for item in items:
        name = item.split("=", 1)[0]
        if "=" in item and _WANDB_IDENTITY.search(name):
            return f"--export={value} sets the workers' {name}"
    if "ALL" not in names and "WANDB_API_KEY" not in names:
        return f"--export={value} does not pass this shell's WANDB_API_KEY to the workers"
    return None


class SubmititHooks:
    """The submitit launchers' refusals, run before the plan is recorded (they are
    hydra-submitit-launcher's classes, not ``TmggLauncher``)."""

    @staticmethod
    def before_plan(config: DictConfig) -> None:
        """Nothing to check before the jobs are composed."""

    @staticmethod
    def preflight(config: DictConfig, jobs: Any) -> None:
        check_submitit_settings(config)
        check_workers_wandb_environment(config, jobs)

    @staticmethod
    def check(config: DictConfig, jobs: Any) -> None:
        check_submitit_settings(config)
        check_workers_wandb_environment(config, jobs)


def register_submitit_hooks() -> None:
    """Hand ``SubmititHooks`` to the state machine for every submitit launcher class."""
    from tmgg.jobs.launcher_hooks import register_launcher

    for prefix in SUBMITIT_TARGET_PREFIXES:
        register_launcher(prefix, SubmititHooks)
