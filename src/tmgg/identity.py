"""Deterministic job identity (DESIGN.md contract 2).

A job id is the stage name plus a digest of the job's *task* overrides, parsed by
Hydra and written canonically, so ``optimizer.lr=1e-3`` and ``optimizer.lr=0.001``
are the same job and the order of overrides does not matter. Keys that only say
where or how a job runs (output folders, W&B mode, thread count) are not part of
the identity: the same training relaunched elsewhere is the same job.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf

# Override keys that do not change what a job computes.
NON_IDENTITY_KEYS = frozenset(
    {
        "experiments_dir",
        "outputs_dir",
        "logger.mode",
        "trainer.num_threads",
        "trainer.resume",
        "logger.base_url",
        "logger.run_generation",
    }
)

DIGEST_LENGTH = 10


def short_float(value: float | int | str) -> str:
    """Write a number in the short exponent form of run names: 0.001 -> '1e-3'.

    Integers up to 999 stay plain (``k8``, ``s1``); 0 is '0'; 1.5e-3 -> '1.5e-3'.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        # Not a number: leave it to config validation to reject with the field name.
        return str(value)
    if number == 0:
        return "0"
    if number.is_integer() and abs(number) < 1000:
        return str(int(number))
    if not math.isfinite(number):
        return str(number)
    mantissa, exponent = f"{number:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def canonical_overrides(overrides: Iterable[str]) -> list[str]:
    """Parse overrides with Hydra's own parser and write each canonically, sorted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = []
    for override in parser.parse_overrides(list(overrides)):
        key = override.get_key_element()
        bare_key = key.lstrip("+~")
        if bare_key in NON_IDENTITY_KEYS or bare_key.startswith("hydra"):
            continue
        if override.is_delete():
            lines.append(f"~{override.key_or_group}")
            continue
        value = override.value()
        lines.append(f"{key}={json.dumps(_plain(value), sort_keys=True)}")
    return sorted(lines)


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value  # floats stay floats: 1.0 is not the int 1, as in the config


def job_id(stage: str, overrides: Iterable[str]) -> str:
    """``<stage>-<digest>``: stable across machines, override order and float spelling."""
    canonical = "\n".join(canonical_overrides(overrides))
    digest = hashlib.sha1(f"{stage}\n{canonical}".encode()).hexdigest()[:DIGEST_LENGTH]
    return f"{stage}-{digest}"


def job_suffix(job_id_value: str) -> str:
    """The digest part of a job id, used to keep output directories unique."""
    return job_id_value.rsplit("-", 1)[-1]


def wandb_run_id(job_id_value: str, generation: int = 0) -> str:
    """The W&B run id of a job: derived from the job id, so a relaunch resumes it.

    ``generation`` (``logger.run_generation``, default 0: the ids runs always had)
    starts a fresh run for the same job, e.g. after its run was deleted on the server,
    which never lets a deleted run's id be used again.
    """
    seed = f"wandb:{job_id_value}" if not generation else f"wandb:{job_id_value}:{generation}"
    return hashlib.sha1(seed.encode()).hexdigest()[:16]


def run_generation(config: Any) -> int:
    """A composed job config's ``logger.run_generation`` (0 when absent)."""
    logger = config.get("logger") if hasattr(config, "get") else None
    value = logger.get("run_generation") if logger is not None else None
    return int(value or 0)


def job_wandb_run_id(config: Any) -> str:
    """The W&B run id of a composed job config (dict or DictConfig)."""
    return wandb_run_id(str(config["job"]["id"]), run_generation(config))


def override_lines(node: Any) -> list[str]:
    """A ``hydra.overrides.task`` node as typed on the command line, read unresolved.

    Hydra's sweeper reads them so: ``logger.group=${stage.name}_b`` is an override
    holding an interpolation, not text for OmegaConf to resolve in the hydra node's
    context (which ``list(node)`` would do).
    """
    if node is None:
        return []
    return [str(line) for line in OmegaConf.to_container(node, resolve=False)]


def task_overrides(config: Any) -> list[str]:
    """A composed config's ``hydra.overrides.task``, as typed (see ``override_lines``)."""
    return override_lines(OmegaConf.select(config, "hydra.overrides.task"))


def _job_id_from_hydra(stage: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise RuntimeError(
            "job.id can only be resolved while Hydra composes a job "
            "(HydraConfig is not set); compose through tmgg-train or tmgg-sweep"
        )
    return job_id(stage, override_lines(HydraConfig.get().overrides.task))


def register_resolvers() -> None:
    """Register the ``tmgg.*`` resolvers (idempotent)."""
    resolvers = {
        "tmgg.short": short_float,
        "tmgg.job_id": _job_id_from_hydra,
        "tmgg.suffix": job_suffix,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
