"""Experiment loggers: W&B with a pinned destination, or CSV with no W&B at all.

The W&B destination (entity, project), host (``logger.base_url``) and mode come from
the job's composed config and nowhere else (DESIGN.md contract 3). What wandb 0.31
does with the other sources:

- ``wandb.init(entity=..., project=..., mode=..., settings=Settings(base_url=...))``
  beats ``WANDB_ENTITY`` / ``WANDB_PROJECT`` / ``WANDB_MODE`` / ``WANDB_BASE_URL`` and
  the settings files (``$WANDB_CONFIG_DIR/settings`` or ``~/.config/wandb/settings``,
  ``./wandb/settings``), *except* in a W&B sweep or launch context
  (``WANDB_SWEEP_ID``, ``WANDB_LAUNCH``), where wandb drops the given entity, project
  and run id and falls back to the environment. So for the moment the run starts,
  the environment is made to agree with the pinned values and the sweep/launch
  variables are removed; disagreeing variables and settings-file entries are named
  in a warning.
- The mode: ``disabled`` only when the config says so. ``auto`` follows an
  environment asking for ``offline`` (the run files can be synced later), else is
  online when a key for the pinned host exists; an environment mode contradicting an
  explicit ``online``/``offline`` (or asking ``auto`` to disable) is named and ignored.
- Online, the server may answer with another entity than requested; the in-job
  guard (``tmgg.task.wandb_guard``) compares the live run with the pinned values.
  A run that cannot be created (no access, a deleted run's id) stops the job before
  training with ``WandbRunError``: it never trains unlogged.
- wandb reads the environment once per process (at ``wandb.setup``); a warm worker
  that set it up in a sweep context is torn down first so the pinned environment
  takes effect.
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from tmgg.config.identity import job_wandb_run_id, run_generation
from tmgg.task.scratch import off_volume

log = logging.getLogger(__name__)
# Checked against wandb 0.31.0 (how init weighs arguments, environment, sweep/launch
# context and settings files); tests/test_lock.py fails when the lock moves wandb off it.
WANDB_CHECKED_VERSION = "0.31.0"

# The public W&B service: the host a stage logs to unless it declares another.
DEFAULT_BASE_URL = "https://api.wandb.ai"
#: The summary key of a W&B run whose job its sweeper pruned (the step it stopped at);
#: also the key of a pruned job's metrics that records it PRUNED (tmgg.jobs.sweep).
PRUNED_AT_KEY = "pruned_at_step"
# Variables that would name the destination if the pinned values were missing.
DESTINATION_VARIABLES = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL")
# Variables that make wandb.init ignore the entity, project and run id it is given
# (a W&B sweep or launch context), or that name another run, group or resume rule.
# All are removed while the run starts.
CONTEXT_VARIABLES = ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_LAUNCH",
                     "WANDB_LAUNCH_CONFIG_PATH", "WANDB_RUN_ID", "WANDB_RUN_GROUP",
                     "WANDB_NAME", "WANDB_RESUME")
# Settings-file keys that would redirect or silence a run.
SETTINGS_FILE_KEYS = ("base_url", "entity", "project", "mode")
# wandb's spellings of the modes (``dryrun`` is old offline, ``run`` old online).
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


class WandbRunError(RuntimeError):
    """The job's W&B run could not be started where and how the job is pinned."""


def normalize_base_url(url: str) -> str:
    return str(url).strip().rstrip("/")


def pinned_base_url(logger_cfg: Mapping[str, Any] | DictConfig) -> str:
    """The W&B host a job logs to: the config's ``logger.base_url``, else the public one."""
    value = logger_cfg.get("base_url") if logger_cfg is not None else None
    return normalize_base_url(str(value)) if value else DEFAULT_BASE_URL


@dataclass(frozen=True)
class WandbKey:
    """An API key for a W&B host and where it was found (never printed)."""

    api_key: str = field(repr=False)
    source: str


def same_service_hosts(base_url: str) -> list[str]:
    """The pinned host first, then the other names of the same W&B deployment.

    wandb 0.31's ``wandb login`` stores a key under its own default host
    (``https://api.forge.coreweave.com``), a proxy of ``https://api.wandb.ai``: a key
    stored under either is a key for both (``wandb.sdk.lib.urls.FORGE_HOSTS``).
    """
    from wandb.sdk.lib import urls

    hosts = [normalize_base_url(base_url)]
    forge = urls.forge_host(base_url)
    if forge is not None:
        hosts += [f"https://api.{forge}", urls.forge_upstream_url(f"https://api.{forge}")]
    return list(dict.fromkeys(hosts))


def find_wandb_api_key(base_url: str = DEFAULT_BASE_URL,
                       environ: Mapping[str, str] | None = None) -> WandbKey | None:
    """The key wandb would use for the pinned host, found the way wandb finds it.

    ``WANDB_API_KEY``, else wandb's own ``.netrc`` lookup (``$NETRC`` or ``~/.netrc``)
    for the host and for the other names of the same deployment (a 0.31 ``wandb
    login`` key is stored under ``api.forge.coreweave.com``).
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return WandbKey(str(environ["WANDB_API_KEY"]), "WANDB_API_KEY")
    from wandb.sdk.lib.wbauth import wbnetrc

    for host in same_service_hosts(base_url):
        try:
            found = wbnetrc.read_netrc_auth_with_source(host=_host_url(host))
        except Exception as error:  # noqa: BLE001 - a malformed entry is no key
            log.warning("W&B key lookup for %s: %s", host, error)
            continue
        if found is not None:
            key = getattr(found.auth, "api_key", None)
            if key:
                return WandbKey(str(key), f"{found.source} (machine {urlparse(host).netloc})")
    return None


def _host_url(url: str) -> Any:
    from wandb.sdk.lib.wbauth.host_url import HostUrl

    return HostUrl(url)


def netrc_path() -> Path:
    """The netrc file wandb reads (its own choice: ``$NETRC``, else ``~/.netrc``)."""
    from wandb.sdk.lib.wbauth import wbnetrc

    return Path(wbnetrc._get_netrc_file_path())


def has_wandb_credentials(base_url: str = DEFAULT_BASE_URL) -> bool:
    """A key for the pinned W&B host, found as wandb finds it (``find_wandb_api_key``)."""
    return find_wandb_api_key(base_url) is not None


# (host, reason) pairs already announced: ``auto`` going offline is said once a process.
_ANNOUNCED_OFFLINE: set[tuple[str, str]] = set()


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to this process's terminal streams (Hydra's console handler)."""
    import sys

    return (isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def _log_off_console(level: int, message: str) -> None:
    """``log.log(level, message)`` to every handler but the console ones: the console
    already has the banner, and a log line there would say it twice."""
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None,
                            "announce_auto_offline")
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if not _is_console(handler) and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


def announce_auto_offline(base_url: str, reason: str) -> None:
    """Say once, loudly, that ``logger.mode=auto`` runs offline: one banner on stderr,
    and the same message in the log files (never a second time on the console)."""
    import sys

    if (base_url, reason) in _ANNOUNCED_OFFLINE:
        return
    _ANNOUNCED_OFFLINE.add((base_url, reason))
    message = (f"W&B OFFLINE: logger.mode=auto logs offline, not to {base_url}: {reason}. "
               "Runs are written to the jobs' output dirs; upload them with `tmgg-sweep sync "
               "<overrides>`, or set logger.mode=online to fail instead.")
    _log_off_console(logging.WARNING, message)
    print(f"\n*** {message} ***\n", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModeDecision:
    """The mode a job's run uses, and the environment settings that were ignored."""

    mode: str
    ignored: tuple[str, ...] = ()


def decide_wandb_mode(mode: str, base_url: str = DEFAULT_BASE_URL,
                      environ: Mapping[str, str] | None = None) -> ModeDecision:
    """The config's mode; ``auto`` may follow an environment asking for offline/online.

    Nothing in the environment silences a run: ``WANDB_MODE=disabled`` is ignored
    unless the config itself says ``disabled``.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("WANDB_MODE") or ""
    asked = _MODE_ALIASES.get(raw, raw)
    if mode != "auto":
        ignored = () if not raw or asked == mode else (f"WANDB_MODE={raw}",)
        return ModeDecision(mode, ignored)
    if asked in ("offline", "online"):
        if asked == "offline":
            announce_auto_offline(base_url, f"the environment asks for it (WANDB_MODE={raw})")
        return ModeDecision(asked)
    found = find_wandb_api_key(base_url, environ)
    if found is None:
        hosts = ", ".join(urlparse(host).netloc for host in same_service_hosts(base_url))
        announce_auto_offline(base_url, f"no W&B API key: WANDB_API_KEY is not set and "
                                        f"{netrc_path()} has no entry for {hosts}")
    resolved = "online" if found is not None else "offline"
    return ModeDecision(resolved, (f"WANDB_MODE={raw}",) if raw else ())


def resolve_wandb_mode(mode: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """The mode a job with config mode ``mode`` uses in this environment."""
    return decide_wandb_mode(mode, base_url).mode


def job_wandb_mode(cfg: Mapping[str, Any] | DictConfig) -> str | None:
    """The W&B mode a composed job uses here (None for a job without W&B)."""
    logger_cfg = cfg.get("logger") or {}
    if logger_cfg.get("name") != "wandb":
        return None
    return resolve_wandb_mode(str(logger_cfg.get("mode") or "auto"),
                              pinned_base_url(logger_cfg))


def settings_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The settings files wandb reads at set-up: the user's and the workspace's."""
    environ = os.environ if environ is None else environ
    config_dir = environ.get("WANDB_CONFIG_DIR")
    system = (Path(config_dir).expanduser() if config_dir
              else Path.home() / ".config" / "wandb") / "settings"
    workspace = Path(environ.get("WANDB_DIR") or os.getcwd()) / "wandb" / "settings"
    return [system, workspace]


def settings_file_conflicts(pinned: Mapping[str, str],
                            environ: Mapping[str, str] | None = None) -> list[str]:
    """``<file>: key=value`` of every settings-file entry that disagrees with the pin."""
    conflicts = []
    for path in settings_files(environ):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        if not parser.has_section("default"):
            continue
        for key in SETTINGS_FILE_KEYS:
            value = parser.get("default", key, fallback=None)
            want = pinned.get(key)
            if value is None or want is None:
                continue
            if key == "base_url":
                value, want = normalize_base_url(value), normalize_base_url(want)
            if value != want:
                conflicts.append(f"{path}: {key}={value}")
    return conflicts


def environment_conflicts(entity: str, project: str,
                          environ: Mapping[str, str] | None = None,
                          base_url: str | None = None) -> list[str]:
    """``NAME=value`` of every W&B variable that would point a run elsewhere."""
    environ = dict(os.environ if environ is None else environ)
    conflicts = []
    pins = (entity, project, base_url)
    for variable, pinned in zip(DESTINATION_VARIABLES, pins, strict=True):
        value = environ.get(variable)
        if pinned is None or not value:
            continue
        if variable == "WANDB_BASE_URL":
            value, pinned = normalize_base_url(value), normalize_base_url(pinned)
        if value != pinned:
            conflicts.append(f"{variable}={environ[variable]}")
    conflicts += [f"{variable}={environ[variable]}" for variable in CONTEXT_VARIABLES
                  if environ.get(variable)]
    return conflicts


@contextmanager
def pinned_wandb_environment(entity: str, project: str, job: str = "",
                             base_url: str | None = None,
                             mode: ModeDecision | None = None) -> Iterator[None]:
    """While the W&B run starts, the environment can only name the pinned destination,
    host and mode."""
    conflicts = environment_conflicts(entity, project, base_url=base_url)
    conflicts += list(mode.ignored) if mode is not None else []
    pinned = {"entity": entity, "project": project}
    if base_url is not None:
        pinned["base_url"] = base_url
    if mode is not None:
        pinned["mode"] = mode.mode
    conflicts += settings_file_conflicts(pinned)
    if conflicts:
        where = f"{entity}/{project}" + (f" on {base_url}" if base_url else "")
        how = f" (mode {mode.mode})" if mode is not None else ""
        log.warning("W&B environment ignored for job %s, pinned to %s%s: %s", job or "?",
                    where, how, ", ".join(conflicts))
    names = DESTINATION_VARIABLES + CONTEXT_VARIABLES + ("WANDB_MODE",)
    saved = {name: os.environ.get(name) for name in names}
    os.environ["WANDB_ENTITY"] = entity
    os.environ["WANDB_PROJECT"] = project
    if base_url is not None:
        os.environ["WANDB_BASE_URL"] = base_url
    if mode is not None:
        os.environ["WANDB_MODE"] = mode.mode
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


def mark_run_pruned(logger: Any, step: int) -> None:
    """A pruned job's W&B run says so (summary ``pruned_at_step``, tag ``pruned``)
    before it finishes; any other logger is left alone."""
    if logger is None or logger.__class__.__name__ != "WandbLogger":
        return
    run = logger.experiment
    run.summary[PRUNED_AT_KEY] = step
    run.tags = (*tuple(run.tags or ()), "pruned")


def finish_leftover_run() -> None:
    """A warm worker must never hand the previous job's run to the next job."""
    import wandb

    if wandb.run is not None:
        log.warning("W&B run %s of an earlier job was still active in this process; "
                    "finishing it as failed", wandb.run.id)
        wandb.finish(exit_code=1)


@contextmanager
def package_list_read_once() -> Iterator[None]:
    """Runs started inside read the installed packages' list once between them.

    wandb reads every installed distribution's metadata at each run start, for the
    run's requirements.txt (``wandb.util.working_set``; 0.3 s a run here, 16 s of a
    36-member fused group's start). A group starts all its members' runs in one
    process, whose packages cannot change in between: the first start reads the list
    and the others get the same list, so each run's requirements.txt is what it would
    have been. Outside the block wandb reads it as before.
    """
    import wandb.util

    original = getattr(wandb.util, "working_set", None)
    if original is None:  # a wandb without it: nothing to share
        yield
        return
    packages: list[Any] | None = None

    def working_set() -> Iterator[Any]:
        nonlocal packages
        if packages is None:
            packages = list(original())
        return iter(packages)

    wandb.util.working_set = working_set
    try:
        yield
    finally:
        wandb.util.working_set = original


def build_logger(cfg: DictConfig, output_dir: Path, concurrent: bool = False) -> Any:
    """The job's logger; for W&B the run is started here, under the pinned environment.

    Run id from the job id and ``logger.run_generation`` with ``resume="allow"`` (a
    relaunch continues the run), name = run name, group = stage, config = the
    composed job config, host = ``logger.base_url``, mode as ``decide_wandb_mode``.
    ``concurrent``: one of several runs alive in this process at once (the members of
    a fused group, wandb's ``reinit="create_new"``); the caller finishes each run itself.
    """
    logger_cfg = cfg.logger
    if logger_cfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="csv", version="")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    entity, project = str(logger_cfg.entity), str(logger_cfg.project)
    base_url = pinned_base_url(logger_cfg)
    run_name = str(cfg.job.run_name)
    run_id = job_wandb_run_id(cfg)
    mode = decide_wandb_mode(str(logger_cfg.mode), base_url)
    if not concurrent:
        finish_leftover_run()
    extra = {"reinit": "create_new"} if concurrent else {}
    # wandb keeps its files open while the run lives: off a Modal Volume, which cannot
    # commit with open files (tmgg.task.scratch); output_dir everywhere else.
    save_dir = off_volume(output_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with pinned_wandb_environment(entity, project, job=run_name, base_url=base_url,
                                  mode=mode):
        logger = WandbLogger(
            entity=entity,
            project=project,
            group=str(logger_cfg.get("group") or cfg.stage.name),
            name=run_name,
            id=run_id,
            resume="allow",
            mode=mode.mode,
            settings=wandb.Settings(base_url=base_url, **_key_under_another_name(
                base_url, mode.mode)),
            save_dir=str(save_dir),
            tags=list(logger_cfg.get("tags") or []),
            config=OmegaConf.to_container(cfg, resolve=True),
            log_model=False,
            **extra,
        )
        try:
            _ = logger.experiment  # start the run now, while the environment is pinned
        except Exception as error:
            raise WandbRunError(run_start_failure(
                error, job=run_name, path=f"{entity}/{project}/{run_id}", base_url=base_url,
                mode=mode.mode, generation=run_generation(cfg))) from error
    return logger


def _key_under_another_name(base_url: str, mode: str) -> dict[str, str]:
    """``{"api_key": ...}`` when the only key for the host is stored under another name
    of the same deployment (a 0.31 ``wandb login``): wandb would not find it itself."""
    if mode != "online":
        return {}
    found = find_wandb_api_key(base_url)
    pinned_netloc = urlparse(normalize_base_url(base_url)).netloc
    if found is None or found.source == "WANDB_API_KEY" or \
            f"(machine {pinned_netloc})" in found.source:
        return {}
    return {"api_key": found.api_key}


DELETED_RUN_MESSAGE = "was previously created and deleted"


def run_start_failure(error: BaseException, job: str, path: str, base_url: str, mode: str,
                      generation: int) -> str:
    """Why a job's W&B run could not start, and what to do about it."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    if DELETED_RUN_MESSAGE in str(error):
        return (f"job {job}: the W&B server {base_url} refuses run id {path}: a run with "
                "this id was deleted there, and W&B never reuses a deleted run's id. To "
                "start a fresh run for this job, relaunch it with "
                f"logger.run_generation={generation + 1} (folded into the W&B run id; the "
                f"job id and its outputs stay the same). The job stopped before training. "
                f"({text})")
    if "permission denied" in str(error).lower() or "PERMISSION_ERROR" in str(error):
        return (f"job {job}: the W&B server {base_url} refuses run {path}: permission "
                "denied - the API key's user may not write to that entity or project "
                "(not a member, a view-only member, or a restricted project). The job "
                f"stopped before training rather than run unlogged. ({text})")
    return (f"job {job}: the W&B run {path} could not be started on {base_url} "
            f"(mode {mode}); the job stopped before training rather than run unlogged. "
            f"{text}")
