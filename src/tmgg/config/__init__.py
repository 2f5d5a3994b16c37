"""Where the configs live, and the check every composed job passes before it runs.

The check runs twice with the same code: at plan time on the launching machine for
every job of a sweep (nothing is dispatched if one fails), and inside the job before
training. It validates the whole task config against the one declared schema in
``tmgg.config.schema``; each error names the job and the dotted config field
(DESIGN.md contract 8). Only omegaconf is imported here: this module is on Hydra's
start-up path.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from tmgg.config.project_files import locate_conf_dir
from tmgg.config.schema import JobConfigError, check_task_config

CONF_DIR = locate_conf_dir()

__all__ = ["CONF_DIR", "JobConfigError", "job_label", "validate_job_config"]


def job_label(cfg: DictConfig) -> str:
    """The best available name of a job for error messages."""
    for key in ("job.run_name", "job.id"):
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - a label must never raise
            value = None
        if value:
            return str(value)
    return "<unnamed job>"


def validate_job_config(cfg: DictConfig, job: str | None = None) -> None:
    """Reject a composed job config that cannot run as intended (before any dispatch)."""
    check_task_config(cfg, job or job_label(cfg))
