"""``hydra/launcher=modal``'s settings and the checks made before anything is sent.

``ModalSettings`` is ``hydra.launcher`` checked field by field (each error names its
field); the credential check reads the environment and ``~/.modal.toml`` only, never
the network; ``check_settings`` and ``check_wandb_secret`` are the refusals that
``modal_dispatch.preflight`` makes before the plan is recorded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.jobs.fusion import fusion_settings
from tmgg.jobs.plan import PlanError, PlannedJob
from tmgg.launch.cost import LauncherSettingError, normalize_gpu

TRANSPORTS = ("modal", "local")
MODAL_TOKEN_HELP = (
    "Modal credentials were not found (no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET in the "
    "environment and no token in {path}). Run `modal token new` to create them, or use "
    "hydra.launcher.transport=local to run the same dispatch on this machine. Nothing "
    "was dispatched.")


class ModalCredentialsError(PlanError):
    """transport=modal without Modal credentials: refused before any network call."""


# -- settings ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModalSettings:
    """``hydra.launcher`` of ``hydra/launcher=modal``, checked (each error names its field)."""

    transport: str = "modal"
    gpu: str | None = "T4"
    cpu: float = 2.0
    memory_mb: int = 4096
    timeout_s: int = 3600
    max_retries: int = 2
    initial_delay: float = 5.0
    backoff_coefficient: float = 2.0
    max_delay: float = 60.0
    max_containers: int | None = 20
    app_name: str = "tmgg"
    wandb_secret: str | None = "wandb"
    volume: str = "tmgg-outputs"
    detach: bool = False
    max_cost_usd: float | None = 25.0
    progress: bool = True
    local_containers: int | None = None
    local_volume_dir: str | None = None
    local_calls: bool = False
    local_volume_snapshots: bool = True
    fuse: str = "auto"
    fuse_max_members: int = 64

    @classmethod
    def from_params(cls, params: dict[str, Any] | DictConfig) -> ModalSettings:
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)  # type: ignore[assignment]
        values = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                  for k, v in dict(params).items() if k != "_target_"}
        retries = values.pop("retries", None) or {}
        if isinstance(retries, int) and not isinstance(retries, bool):
            retries = {"max_retries": retries}
        if not isinstance(retries, dict):
            raise LauncherSettingError("hydra.launcher.retries",
                                       f"expected a mapping or an integer, got {retries!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LauncherSettingError(f"hydra.launcher.{unknown[0]}", "unknown setting")
        for key, value in retries.items():
            if key not in ("max_retries", "initial_delay", "backoff_coefficient", "max_delay"):
                raise LauncherSettingError(f"hydra.launcher.retries.{key}", "unknown setting")
            values[key] = value
        settings = cls(**values)
        settings.check()
        return dataclasses.replace(settings, gpu=normalize_gpu(settings.gpu))

    def check(self) -> None:
        def require(field: str, ok: bool, problem: str) -> None:
            if not ok:
                raise LauncherSettingError(f"hydra.launcher.{field}", problem)

        def number(value: Any) -> bool:
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(float(value)))

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require("transport", self.transport in TRANSPORTS,
                f"expected one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        normalize_gpu(self.gpu)
        require("cpu", number(self.cpu) and self.cpu >= 0.125,
                f"expected a number of cores >= 0.125, got {self.cpu!r}")
        require("memory_mb", integer(self.memory_mb) and self.memory_mb >= 128,
                f"expected an integer >= 128 (MiB), got {self.memory_mb!r}")
        require("timeout_s", integer(self.timeout_s) and 10 <= self.timeout_s <= 86400,
                f"expected whole seconds from 10 to 86400 (Modal's limits), got {self.timeout_s!r}")
        require("retries.max_retries", integer(self.max_retries) and 0 <= self.max_retries <= 10,
                f"expected an integer from 0 to 10, got {self.max_retries!r}")
        require("retries.initial_delay", number(self.initial_delay)
                and 0 <= self.initial_delay <= 60,
                f"expected seconds from 0 to 60, got {self.initial_delay!r}")
        require("retries.backoff_coefficient", number(self.backoff_coefficient)
                and 1 <= self.backoff_coefficient <= 10,
                f"expected a number from 1.0 to 10.0, got {self.backoff_coefficient!r}")
        require("retries.max_delay", number(self.max_delay) and 1 <= self.max_delay <= 60,
                f"expected seconds from 1 to 60, got {self.max_delay!r}")
        require("max_containers", self.max_containers is None
                or (integer(self.max_containers) and self.max_containers >= 1),
                f"expected an integer >= 1 or null, got {self.max_containers!r}")
        for flag in ("local_calls", "local_volume_snapshots"):
            require(flag, isinstance(getattr(self, flag), bool),
                    f"expected true or false, got {getattr(self, flag)!r}")
        require("local_containers", self.local_containers is None
                or (integer(self.local_containers) and self.local_containers >= 1),
                f"expected an integer >= 1 or null, got {self.local_containers!r}")
        for field in ("app_name", "volume"):
            value = getattr(self, field)
            require(field, isinstance(value, str) and bool(re.fullmatch(r"[\w.-]+", value)),
                    f"expected a Modal name (letters, digits, '-', '_', '.'), got {value!r}")
        require("wandb_secret", self.wandb_secret is None or (
            isinstance(self.wandb_secret, str) and bool(self.wandb_secret.strip())),
                f"expected a Modal Secret name or null, got {self.wandb_secret!r}")
        require("max_cost_usd", self.max_cost_usd is None
                or (number(self.max_cost_usd) and self.max_cost_usd >= 0),
                f"expected a number >= 0 or null, got {self.max_cost_usd!r}")
        # The local launcher's rule, word for word (names hydra.launcher.fuse...).
        fusion_settings({"fuse": self.fuse, "fuse_max_members": self.fuse_max_members})

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based), as modal.Retries computes it."""
        return min(self.max_delay, self.initial_delay * self.backoff_coefficient ** (attempt - 1))

    def local_size(self, jobs: int) -> int:
        cores = os.cpu_count() or 1
        size = self.local_containers or min(self.max_containers or cores, cores)
        return max(1, min(size, jobs))

    def container_threads(self) -> int:
        """torch threads of a job: the container's cores (one per local container)."""
        return 1 if self.transport == "local" else max(1, int(self.cpu))

    def function_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Function.with_options`` for this sweep."""
        import modal

        options: dict[str, Any] = {
            "cpu": float(self.cpu),
            "memory": int(self.memory_mb),
            "timeout": int(self.timeout_s),
            "retries": modal.Retries(max_retries=int(self.max_retries),
                                     backoff_coefficient=float(self.backoff_coefficient),
                                     initial_delay=float(self.initial_delay),
                                     max_delay=float(self.max_delay)),
        }
        if self.gpu:
            options["gpu"] = self.gpu
        if self.max_containers:
            options["max_containers"] = int(self.max_containers)
        return options

    def container_spec(self) -> dict[str, Any]:
        """What a local container needs to build the same Modal function."""
        env = {}
        if self.local_volume_dir:
            from tmgg.launch.modal.app import (
                LOCAL_COMMIT_LOG_ENV,
                LOCAL_SCRATCH_ENV,
                LOCAL_VOLUME_DIR_ENV,
            )

            volume = Path(self.local_volume_dir).resolve()
            env[LOCAL_COMMIT_LOG_ENV] = str(volume / ".volume-commits.jsonl")
            env[LOCAL_VOLUME_DIR_ENV] = str(volume)
            # Off the volume, as a container's own disk is on Modal.
            env[LOCAL_SCRATCH_ENV] = str(volume.parent / f".{volume.name}-container-disks")
            if self.local_volume_snapshots:  # each container on its own view of it
                from tmgg.launch.snapshot_volume import SNAPSHOTS_ENV

                env[SNAPSHOTS_ENV] = snapshot_views_dir(volume)
        return {"app_name": self.app_name, "volume": self.volume,
                "wandb_secret": self.wandb_secret, "timeout_s": self.timeout_s, "env": env}


def trial_store_spec(settings: ModalSettings, ledger_root: Path) -> str:
    """Where a pruning trial's job in a container reports and reads its decisions
    (``tmgg.jobs.trials.TRIAL_CHANNEL_ENV``): the app's ``modal.Dict`` on Modal; with
    the local transport a directory standing in for it beside the ledger (its
    containers are processes of this machine; the volume's view of the ledger is not
    the launcher's)."""
    if settings.transport == "modal":
        return f"modal-dict:{settings.app_name}-trials"
    return f"dir:{Path(ledger_root).resolve() / 'trials' / 'relay'}"


def snapshot_views_dir(volume: Path) -> str:
    """Where local containers keep their views of the stand-in volume (beside it)."""
    return str(volume.parent / f".{volume.name}-container-views")


# -- credentials -------------------------------------------------------------------


def modal_config_path() -> Path:
    return Path(os.environ.get("MODAL_CONFIG_PATH") or os.path.expanduser("~/.modal.toml"))


def modal_credentials_available() -> bool:
    """A token in the environment or in ~/.modal.toml; reads files only, no network."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    try:
        text = modal_config_path().read_text()
    except OSError:
        return False
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: a token line is enough of a sign
        return bool(re.search(r"^\s*token_id\s*=\s*\S", text, re.M)
                    and re.search(r"^\s*token_secret\s*=\s*\S", text, re.M))
    try:
        profiles = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return any(isinstance(p, dict) and p.get("token_id") and p.get("token_secret")
               for p in profiles.values())


def require_credentials() -> None:
    if not modal_credentials_available():
        raise ModalCredentialsError(MODAL_TOKEN_HELP.format(path=modal_config_path()))


# -- checks before dispatch --------------------------------------------------------


def check_settings(params: dict[str, Any] | DictConfig) -> ModalSettings:
    """The launcher's settings, checked; for transport=modal, credentials too.

    Runs when Hydra sets the launcher up, before the sweeper composes the jobs again,
    so a bad GPU name or missing credentials fail fast; reads no network.
    """
    settings = ModalSettings.from_params(params)
    if settings.transport == "modal":
        require_credentials()
    return settings


def check_wandb_secret(settings: ModalSettings, jobs: Sequence[PlannedJob]) -> None:
    """Refuse W&B jobs on Modal without a secret: they would silently log offline there."""
    if settings.transport != "modal" or settings.wandb_secret:
        return
    for job in jobs:
        if not job.is_tmgg_job:
            continue
        logger = job.task_config.get("logger") or {}
        if logger.get("name") == "wandb" and logger.get("mode") in ("auto", "online"):
            raise LauncherSettingError(
                "hydra.launcher.wandb_secret",
                f"job {job.run_name} logs to W&B (logger.mode={logger.get('mode')}) but no "
                "Modal Secret is set, so its container has no WANDB_API_KEY; create one with "
                "`modal secret create wandb WANDB_API_KEY=...` and name it here, or use "
                "logger=csv or logger.mode=offline")


def require_wandb_secret(settings: ModalSettings) -> None:
    """transport=modal: the named Secret exists and holds WANDB_API_KEY (one lookup).

    Every container mounts it, so without this check a missing Secret surfaces as
    Modal's NotFoundError when the app starts, after the plan was recorded.
    """
    if settings.transport != "modal" or not settings.wandb_secret:
        return
    import modal

    name = settings.wandb_secret
    try:
        modal.Secret.from_name(name, required_keys=["WANDB_API_KEY"]).hydrate()
    except (modal.exception.NotFoundError, modal.exception.InvalidError) as error:
        raise LauncherSettingError(
            "hydra.launcher.wandb_secret",
            f"Modal could not give the containers Secret {name!r} with WANDB_API_KEY "
            f"({error}). Create it with `modal secret create {name} WANDB_API_KEY=...` "
            "(your key: https://wandb.ai/authorize), name another one here, or set "
            "hydra.launcher.wandb_secret=null if no job logs to W&B online. Nothing was "
            "dispatched") from error
