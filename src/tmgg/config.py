"""Where the configs live, and the checks every composed job passes before it runs.

The checks run twice with the same code: at plan time on the launching machine for
every job of a sweep (nothing is dispatched if one fails), and inside the job before
training. Each error names the job and the dotted config field (DESIGN.md contract 6).
Only omegaconf is imported here: this module is on Hydra's start-up path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.project_files import locate_conf_dir

CONF_DIR = locate_conf_dir()

KNOWN_MODELS = ("linear_pe", "filter_bank", "self_attention")
KNOWN_OPTIMIZERS = ("adamw", "adam", "sgd")
KNOWN_SCHEDULERS = ("cosine_warmup", "none")
KNOWN_DATA = ("sbm_partitions", "sbm_single", "er", "regular", "tree")
KNOWN_LOGGERS = ("wandb", "csv")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class JobConfigError(ValueError):
    """A composed job config that must not run; names the job and the field."""

    def __init__(self, job: str, field: str, problem: str) -> None:
        self.job = job
        self.field = field
        self.problem = problem
        super().__init__(f"job {job}: {field}: {problem}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def positive_number(value: Any) -> str | None:
    number = _number(value)
    if number is None:
        return f"expected a positive number, got {value!r}"
    if not math.isfinite(number) or number <= 0:
        return f"must be > 0, got {value!r}"
    return None


def non_negative_number(value: Any) -> str | None:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        return f"expected a number >= 0, got {value!r}"
    return None


def positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer >= 1, got {value!r}"
    if value < 1:
        return f"must be >= 1, got {value!r}"
    return None


def non_negative_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"expected an integer >= 0, got {value!r}"
    return None


def http_url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return f"expected an http(s) URL of a W&B server, got {value!r}"
    return None


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        if value not in options:
            return f"unknown value {value!r}; expected one of {', '.join(options)}"
        return None

    return rule


def non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"is mandatory and must be a non-empty string, got {value!r}"
    return None


def probability_list(value: Any) -> str | None:
    if not isinstance(value, list | tuple) and not OmegaConf.is_list(value):
        return f"expected a list of noise levels in [0, 1], got {value!r}"
    if len(value) == 0:
        return "needs at least one noise level"
    for level in value:
        number = _number(level)
        if number is None or not 0.0 <= number <= 1.0:
            return f"{level!r} is outside [0, 1]"
    return None


def fraction(value: Any) -> str | None:
    number = _number(value)
    if number is None or not 0.0 <= number <= 1.0:
        return f"expected a fraction in [0, 1], got {value!r}"
    return None


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
    job = job or job_label(cfg)
    checks: list[tuple[str, Callable[[Any], str | None]]] = [
        (
            "seed",
            lambda v: (
                None
                if isinstance(v, int) and not isinstance(v, bool)
                else f"expected an integer seed, got {v!r}"
            ),
        ),
        ("model.name", one_of(KNOWN_MODELS)),
        ("model.k", positive_int),
        ("optimizer.name", one_of(KNOWN_OPTIMIZERS)),
        ("optimizer.lr", positive_number),
        ("optimizer.weight_decay", non_negative_number),
        ("scheduler.name", one_of(KNOWN_SCHEDULERS)),
        ("data.name", one_of(KNOWN_DATA)),
        ("data.num_nodes", positive_int),
        ("data.batch_size", positive_int),
        ("data.samples_per_epoch", positive_int),
        ("data.val_samples", positive_int),
        ("data.test_samples", positive_int),
        ("noise.levels", probability_list),
        ("trainer.max_steps", positive_int),
        ("trainer.val_check_interval", positive_int),
        ("trainer.log_every_n_steps", positive_int),
        ("logger.name", one_of(KNOWN_LOGGERS)),
        ("job.run_name", non_empty_string),
        ("job.id", non_empty_string),
    ]
    model = OmegaConf.select(cfg, "model.name")
    if model == "filter_bank":
        checks.append(("model.degree", positive_int))
    if model == "self_attention":
        checks.append(("model.d_k", positive_int))
    if model == "linear_pe":
        checks.append(("model.max_nodes", positive_int))
    if OmegaConf.select(cfg, "optimizer.name") in ("adamw", "adam"):
        checks.append(
            (
                "optimizer.amsgrad",
                lambda v: None if isinstance(v, bool) else f"expected true or false, got {v!r}",
            )
        )
    if OmegaConf.select(cfg, "scheduler.name") == "cosine_warmup":
        checks += [
            ("scheduler.warmup_fraction", fraction),
            ("scheduler.decay_end_fraction", fraction),
        ]
    if OmegaConf.select(cfg, "logger.name") == "wandb":
        checks += [
            ("logger.entity", non_empty_string),
            ("logger.project", non_empty_string),
            ("logger.mode", one_of(WANDB_MODES)),
            ("logger.base_url", http_url),
            ("logger.run_generation", non_negative_int),
        ]
    for field, rule in checks:
        _check_field(cfg, job, field, rule)
    max_nodes = OmegaConf.select(cfg, "model.max_nodes")
    num_nodes = OmegaConf.select(cfg, "data.num_nodes")
    if (
        model == "linear_pe"
        and isinstance(max_nodes, int)
        and isinstance(num_nodes, int)
        and num_nodes > max_nodes
    ):
        raise JobConfigError(
            job, "model.max_nodes", f"{max_nodes} is smaller than data.num_nodes={num_nodes}"
        )


def _check_field(cfg: DictConfig, job: str, field: str, rule: Callable[[Any], str | None]) -> None:
    try:
        value = OmegaConf.select(cfg, field, default=None)
    except Exception as error:  # an interpolation that cannot resolve
        raise JobConfigError(job, field, f"cannot be resolved: {error}") from error
    problem = rule(value)
    if problem:
        raise JobConfigError(job, field, problem)
