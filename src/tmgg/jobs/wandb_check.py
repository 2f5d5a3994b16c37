"""Plan-time check of every job's W&B destination (DESIGN.md contract 3).

Runs on the launching machine before anything is dispatched:

1. every job that logs to W&B has a non-empty ``logger.entity`` and ``logger.project``;
2. they equal the stage's declared destination — the values in
   ``conf/stage/<stage>.yaml`` (or the logger group's defaults when the stage sets
   none) — unless the user overrode a field for the *whole sweep* on the command line
   (``logger.entity=other``), which then applies to every job alike. A destination
   that differs between jobs of one sweep is refused;
3. when a job will log online, the API key can write to the entity on the pinned
   host (``logger.base_url``): the key's own entity or one of its teams
   (``wandb.Api().viewer``), asked once per host and process; a refusal names the
   entity, the host and the key's user.

4. where the workers log with another key than this shell's (a Modal Secret), that
   key is asked too, where the workers run (``check_workers_key``, handed a way to ask
   by the launcher): a key that cannot write to the entity is refused before dispatch,
   with both keys' users named.

Any failure raises ``PlanError`` naming the job and the field. Only omegaconf and
the standard library are imported at module level (Hydra start-up path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.config import CONF_DIR
from tmgg.config.identity import task_overrides
from tmgg.jobs.plan import PlanError, PlannedJob

log = logging.getLogger(__name__)

FIELDS = ("entity", "project")

# What the default API key may write to, per host, looked up once per process.
_ACCESS_CACHE: dict[str, KeyAccess] = {}


@dataclass(frozen=True)
class Expected:
    """The destination every W&B job of the sweep must have, and where it comes from."""

    values: dict[str, str | None]
    sources: dict[str, str]


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _declared_in(path: Path, key: str) -> str | None:
    """A literal value at ``key`` of a config file, or None when absent/interpolated."""
    if not path.is_file():
        return None
    try:
        node = OmegaConf.load(path)
        value = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable file declares nothing
        return None
    if value is None or _is_interpolation(value):
        return None
    return str(value)


def declared_destination(master_config: DictConfig, conf_dir: Path = CONF_DIR
                         ) -> dict[str, tuple[str | None, str]]:
    """``field -> (value, source)`` as the stage file (else the logger file) declares it."""
    choices = OmegaConf.select(master_config, "hydra.runtime.choices") or {}
    stage = choices.get("stage") or OmegaConf.select(master_config, "stage.name")
    logger = choices.get("logger") or "wandb"
    stage_file = conf_dir / "stage" / f"{stage}.yaml"
    logger_file = conf_dir / "logger" / f"{logger}.yaml"
    declared: dict[str, tuple[str | None, str]] = {}
    for field in FIELDS:
        value = _declared_in(stage_file, f"logger.{field}")
        if value is not None:
            declared[field] = (value, f"conf/stage/{stage}.yaml")
            continue
        declared[field] = (_declared_in(logger_file, field), f"conf/logger/{logger}.yaml")
    return declared


def whole_sweep_overrides(master_config: DictConfig) -> dict[str, str]:
    """``field -> override line`` for destination fields the user set for the whole sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = task_overrides(master_config)
    found: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group
        for field in FIELDS:
            if key == f"logger.{field}" and not override.is_sweep_override():
                found[field] = override.input_line
    return found


def expected_destination(master_config: DictConfig, conf_dir: Path = CONF_DIR) -> Expected:
    """The sweep's destination: the stage's, or the user's whole-sweep override."""
    declared = declared_destination(master_config, conf_dir)
    overridden = whole_sweep_overrides(master_config)
    values: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for field in FIELDS:
        composed = OmegaConf.select(master_config, f"logger.{field}", default=None)
        if field in overridden:
            values[field] = None if composed is None else str(composed)
            sources[field] = f"the command-line override {overridden[field]}"
            continue
        value, source = declared[field]
        if value is None and composed is not None:
            value, source = str(composed), "the composed sweep config"
        values[field] = value
        sources[field] = source
    return Expected(values=values, sources=sources)


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_job_destinations(jobs: Sequence[PlannedJob], expected: Expected) -> None:
    """Fields present and equal to the sweep's destination, for every W&B job."""
    for job in jobs:
        if not job.is_tmgg_job or job.wandb is None:
            continue
        for field in FIELDS:
            value = job.wandb.get(field)
            if not _non_empty(value):
                raise PlanError(f"job {job.run_name}: logger.{field}: the W&B {field} is "
                                f"mandatory and must be a non-empty string, got {value!r}")
            want = expected.values.get(field)
            if want is not None and value != want:
                raise PlanError(
                    f"job {job.run_name}: logger.{field}: {value!r} is not the sweep's "
                    f"destination {want!r} (from {expected.sources[field]}); a stage logs to "
                    f"one destination - override logger.{field} for the whole sweep, not "
                    "per job")


@dataclass(frozen=True)
class KeyAccess:
    """Who an API key belongs to on a W&B host, and the entities it can write to."""

    user: str
    writable: frozenset[str]


def key_access(api: Any) -> KeyAccess:
    """The key's user and its writable entities: its own and its teams'."""
    viewer = api.viewer
    if viewer is None:
        raise ValueError("the API key has no W&B user")
    names = {getattr(viewer, "entity", None), getattr(viewer, "username", None)}
    names.update(getattr(viewer, "teams", None) or [])
    user = getattr(viewer, "username", None) or getattr(viewer, "entity", None) or "?"
    return KeyAccess(str(user), frozenset(name for name in names if name))


def project_is_read_only(api: Any, entity: str, project: str) -> bool | None:
    """wandb's own question: is ``entity/project`` read-only for the key's user (a
    view-only member, a restricted project)? None: the project is not visible (absent
    yet, or hidden from the user)."""
    from wandb.sdk.artifacts._gqlutils import is_project_read_only

    return is_project_read_only(api._service_api, entity, project)


def write_refusal(api: Any, entity: str, project: str, base_url: str) -> str | None:
    """Why the key behind ``api`` cannot write to ``entity/project`` (None: it can)."""
    access = key_access(api)
    if entity not in access.writable:
        return (f"the W&B API key of user {access.user!r} cannot write to entity {entity!r} "
                f"on {base_url}; it can write to "
                f"{', '.join(sorted(access.writable)) or 'nothing'}")
    if project_is_read_only(api, entity, project):
        return (f"the W&B API key of user {access.user!r} may only read {entity}/{project} "
                f"on {base_url} (a view-only member, or a restricted project)")
    return None


def _default_api(base_url: str) -> Any:
    """``wandb.Api`` on the host with the key wandb finds for it (any of its names).

    Waits 60 s for a host that does not answer, or wandb's own ``WANDB_HTTP_TIMEOUT``
    where that is set (the tests set it: an unreachable host is refused sooner).
    """
    import wandb
    from wandb import env as wandb_env

    from tmgg.task.loggers import find_wandb_api_key

    found = find_wandb_api_key(base_url)
    return wandb.Api(overrides={"base_url": base_url}, timeout=wandb_env.get_http_timeout(60),
                     api_key=found.api_key if found else None)


def _default_access(base_url: str) -> KeyAccess:
    import os

    key = base_url + "|" + os.environ.get("WANDB_API_KEY", "")
    if key not in _ACCESS_CACHE:
        _ACCESS_CACHE[key] = key_access(_default_api(base_url))
    return _ACCESS_CACHE[key]


def check_online_access(jobs: Sequence[PlannedJob]) -> None:
    """Online jobs only: the API key can write to each entity and project on the pinned
    host (one viewer lookup per host, one read-only question per project)."""
    online: dict[tuple[str, str, str], PlannedJob] = {}
    for job in jobs:
        if job.is_tmgg_job and job.wandb is not None and job.wandb["mode"] == "online":
            online.setdefault((str(job.wandb["base_url"]), str(job.wandb["entity"]),
                               str(job.wandb["project"])), job)
    for (base_url, entity, project), job in online.items():
        try:
            access = _default_access(base_url)
            read_only = (entity in access.writable
                         and project_is_read_only(_default_api(base_url), entity, project))
        except Exception as error:  # noqa: BLE001 - any failure means we cannot prove access
            raise PlanError(f"job {job.run_name}: logger.entity: cannot check that the W&B "
                            f"API key may write to {entity!r} on {base_url} (online mode): "
                            f"{type(error).__name__}: {error}") from error
        if entity not in access.writable:
            raise PlanError(
                f"job {job.run_name}: logger.entity: the W&B API key of user "
                f"{access.user!r} cannot write to entity {entity!r} on {base_url}; it can "
                f"write to {', '.join(sorted(access.writable)) or 'nothing'}")
        if read_only:
            raise PlanError(
                f"job {job.run_name}: logger.project: the W&B API key of user "
                f"{access.user!r} may only read {entity}/{project} on {base_url} (a "
                "view-only member, or a restricted project)")


def check_wandb_destinations(jobs: Sequence[PlannedJob], master_config: DictConfig,
                             conf_dir: Path = CONF_DIR) -> None:
    """Every W&B job's destination is present, the stage's, and (online) writable."""
    if not any(job.is_tmgg_job and job.wandb is not None for job in jobs):
        return
    check_job_destinations(jobs, expected_destination(master_config, conf_dir))
    check_online_access(jobs)


def check_workers_key(jobs: Sequence[PlannedJob],
                      ask: Callable[[str, str, str], dict[str, Any]], where: str) -> list[str]:
    """The workers' own W&B key may write to each online job's entity and project (one
    question per destination, ``ask(base_url, entity, project)`` answered where the
    workers run).

    Refuses with both identities named when the workers' key cannot write there or
    cannot be checked; returns a note for each host where the two keys' default
    entities differ (a run that loses its entity lands in the workers' default entity:
    ``tmgg-sweep reconcile --workers-entity``).
    """
    online: dict[tuple[str, str, str], PlannedJob] = {}
    for job in jobs:
        if job.is_tmgg_job and job.wandb is not None and job.wandb["mode"] == "online":
            online.setdefault((str(job.wandb["base_url"]), str(job.wandb["entity"]),
                               str(job.wandb["project"])), job)
    notes = []
    for (base_url, entity, project), job in online.items():
        workers = ask(base_url, entity, project)
        try:
            shell = _default_access(base_url)
            shell_says = (f"this shell's key belongs to {shell.user!r}, which "
                          f"{'can' if entity in shell.writable else 'cannot'} write there")
        except Exception as error:  # noqa: BLE001 - the workers' answer decides
            shell, shell_says = None, f"this shell's key could not be checked ({error})"
        if workers.get("error"):
            raise PlanError(f"job {job.run_name}: logger.entity: cannot check that the "
                            f"workers' W&B key ({where}) may write to {entity!r} on "
                            f"{base_url}: {workers['error']}; {shell_says}. Nothing was "
                            "dispatched")
        if not workers.get("can_write"):
            raise PlanError(
                f"job {job.run_name}: logger.entity: the workers' W&B key ({where}) belongs "
                f"to user {workers.get('user')!r}, which cannot write to {entity}/{project} "
                f"on {base_url} (it can write to entity "
                f"{', '.join(workers.get('writable') or []) or 'nothing'}); {shell_says}. "
                f"Put a key that can write there in {where}. Nothing was dispatched")
        default = workers.get("default_entity")
        if shell is not None and default and workers.get("user") != shell.user:
            notes.append(f"the workers' W&B key ({where}) belongs to {workers.get('user')!r} "
                         f"(default entity {default!r}), this shell's to {shell.user!r}: "
                         f"reconcile with --workers-entity {default}")
    for note in notes:
        log.warning(note)
    return notes
