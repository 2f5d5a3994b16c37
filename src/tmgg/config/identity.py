"""Deterministic job identity (DESIGN.md contract 2): a job is what it computes.

A job id is ``<stage>-<digest>`` of the job's composed task config: model, optimizer,
scheduler, data, noise, trainer, logger, stage and seed, resolved and written as
canonical JSON (sorted keys; a value the schema declares a real number written as a
float, so ``1e-3``, ``0.001`` and ``0``, ``0.0`` are one job each). Keys that only
say where or how a job runs (output folders, W&B mode, thread count, resume switch,
launcher settings under ``hydra``, the run-name label, the cost estimate) are left
out: the same training relaunched elsewhere is the same job.
Editing a stage or a config group therefore gives new ids, new output folders and
new W&B runs; the records of the earlier config stay in the ledger, superseded.

Hydra resolves ``job.id`` wherever it composes a job (on the launching machine for
tmgg's launchers, in the job's process for ``basic`` and submitit), so the id is
computed from the composed config alone, by the ``tmgg.job_id`` resolver.

Records made before identity covered the config carry the earlier id, a digest of
the job's override set (``legacy_job_id``). Such a record still counts as its job,
with its id, output folder and W&B run id, while its recorded config is the job's
composed config; once the config changes the job gets its config id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tmgg.config.schema import canonical_numbers, number_fields

# Config paths that do not change what a job computes (a path covers its subtree).
NON_IDENTITY_KEYS = frozenset(
    {
        "hydra",
        "job",
        "experiments_dir",
        "outputs_dir",
        "logger.mode",
        "trainer.num_threads",
        "trainer.resume",
        "logger.base_url",
        "logger.run_generation",
        "stage.run_name",
        "stage.gpu_seconds_per_job",
    }
)

# Keys added to the config after jobs were recorded, with the value that reproduces
# the behaviour from before they existed: at that value a key is left out of the
# identity, so a new option with a neutral default supersedes no recorded job.
IDENTITY_DEFAULTS: dict[str, Any] = {
    # The earlier system's variant of the task (issue 14), off by default.
    "data.self_loops": False,
    "data.test_split": "disjoint",
    "model.symmetrize": True,
    "objective": {"name": "bce", "loss_diagonal": False, "metrics_diagonal": False},
    "trainer.test_checkpoint": "best",
}

# What the override-set identity of earlier records ignored. Frozen: changing it
# would change every legacy id and orphan the records that carry one.
LEGACY_NON_IDENTITY_KEYS = frozenset(
    {"experiments_dir", "outputs_dir", "logger.mode", "trainer.num_threads", "trainer.resume"}
)

# Keys tmgg computes from the job's config (conf/train.yaml holds these expressions):
# the job's identity and the name and folder derived from it. Set by hand, any of them
# would let one job pass for another, so a config that changes one is refused.
COMPUTED_KEYS: dict[str, tuple[str, str]] = {
    "job.id": ("${tmgg.job_id:${stage.name}}",
               "the job's identity, computed from its task config (tmgg.job_id)"),
    "job.run_name": ("${stage.run_name}",
                     "computed from the stage's run-name template (set stage.run_name)"),
    "hydra.sweep.subdir": ("${job.run_name}-${tmgg.suffix:${job.id}}",
                           "the job's output folder, computed from its run name and id"),
    "hydra.run.dir": ("${outputs_dir}/${stage.name}/${job.run_name}-${tmgg.suffix:${job.id}}",
                      "the job's output folder, computed from its run name and id"),
}
SWEEP_COMPUTED_KEYS = ("job.id", "job.run_name", "hydra.sweep.subdir")
RUN_COMPUTED_KEYS = ("job.id", "job.run_name", "hydra.run.dir")
_ABSENT = object()

DIGEST_LENGTH = 10
_HYDRA_RESOLVER = "${hydra:"


class IdentityError(RuntimeError):
    """The identity of a job cannot be computed from its config."""


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


# -- computed keys are tmgg's own --------------------------------------------------------
def _written(config: DictConfig, path: str) -> Any:
    """The value at ``path`` as written (an interpolation stays its text), or _ABSENT."""
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, DictConfig):
            return _ABSENT
        node = node._get_node(key, validate_access=False, throw_on_missing_key=False)
        if node is None:
            return _ABSENT
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) \
        else node._value()


def computed_key_problems(config: DictConfig, keys: Iterable[str] = SWEEP_COMPUTED_KEYS
                          ) -> list[tuple[str, str]]:
    """``(field, problem)`` for each computed key of a composed, unresolved job config
    that is not tmgg's own expression: an override (``job.id=...``), a config file that
    sets it, or its removal."""
    problems = []
    for key in keys:
        expression, what = COMPUTED_KEYS[key]
        written = _written(config, key)
        if written == expression:
            continue
        found = "removed" if written is _ABSENT else f"set to {written!r}"
        problems.append((key, f"is {what} and cannot be set; here it is {found}, "
                              f"drop that override or config value"))
    return problems


# -- identity of a composed config ---------------------------------------------------
_COMPUTING = threading.local()


@contextmanager
def _guard() -> Iterator[None]:
    """Refuse re-entry: a task key that interpolates ``job.id`` would recurse forever."""
    if getattr(_COMPUTING, "active", False):
        raise IdentityError("job.id depends on itself: a task key interpolates job.id "
                            "or the job's output directory")
    _COMPUTING.active = True
    try:
        yield
    finally:
        _COMPUTING.active = False


def identity_config(config: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The part of a task config that says what the job computes, as plain values.

    ``config`` is a composed config (interpolations are resolved here) or a plain
    dict such as a record's ``config``. An interpolation of Hydra's runtime
    (``${hydra:runtime.output_dir}``: where, not what; it differs between the plan and
    the job's process) or one that cannot be resolved while the id is computed
    (``${job.id}``) stays as its text.
    """
    source: Any = config
    if isinstance(config, DictConfig) and not _mentions_hydra(config):
        try:  # the common case, resolved in one go; the walk below prunes nested keys
            source = {str(key): _resolved(config, key) for key in config
                      if str(key) not in NON_IDENTITY_KEYS}
        except Exception:  # noqa: BLE001 - some value resolves only later: walk key by key
            source = config
    plain = _plain_tree(source, "")
    assert isinstance(plain, dict)
    return canonical_numbers(plain)


def _mentions_hydra(config: DictConfig) -> bool:
    """Whether a task value, as written, interpolates Hydra's runtime."""
    for key in config:
        if str(key) in NON_IDENTITY_KEYS:
            continue
        node = config._get_node(key)
        raw = (OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node)
               else node._value())
        if _HYDRA_RESOLVER in str(raw):
            return True
    return False


def _resolved(config: DictConfig, key: Any) -> Any:
    value = config[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _plain_tree(node: Any, path: str) -> Any:
    if isinstance(node, DictConfig | dict):
        tree = {}
        for key in node:
            child_path = f"{path}.{key}" if path else str(key)
            if child_path in NON_IDENTITY_KEYS:
                continue
            value = _plain_tree(_child(node, key), child_path)
            if child_path in IDENTITY_DEFAULTS and value == IDENTITY_DEFAULTS[child_path]:
                continue
            tree[str(key)] = value
        return tree
    if isinstance(node, ListConfig | list | tuple):
        return [_plain_tree(_child(node, index), path) for index in range(len(node))]
    return node


def _child(container: Any, key: Any) -> Any:
    """One child, resolved: a plain value, or a container to walk further."""
    if not isinstance(container, DictConfig | ListConfig):
        return container[key]
    if OmegaConf.is_missing(container, key):
        return "???"
    node = container._get_node(key)
    if not OmegaConf.is_interpolation(container, key):
        if OmegaConf.is_config(node):
            return None if node._is_none() else node
        return container[key]
    if _HYDRA_RESOLVER in str(node._value()):
        return node._value()
    try:
        value = container[key]
    except Exception:  # noqa: BLE001 - unresolvable now (hydra runtime, job.id): its text
        return container._get_node(key)._value()
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def canonical_json(value: Any) -> str:
    """One spelling for one config: sorted keys, no spaces, floats as Python writes them."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def config_job_id(stage: str, identity: dict[str, Any]) -> str:
    """``<stage>-<digest of the identity config>``."""
    digest = hashlib.sha1(f"config:{stage}\n{canonical_json(identity)}".encode())
    return f"{stage}-{digest.hexdigest()[:DIGEST_LENGTH]}"


def job_id_for(config: DictConfig | dict[str, Any], stage: str | None = None) -> str:
    """The id of the job a composed config describes (what ``job.id`` resolves to).

    The config id, unless the stage's ledger holds a record under the job's legacy
    (override-set) id whose recorded config is this one: that job keeps its id.
    """
    with _guard():
        identity = identity_config(config)
        if stage is None:
            stage = str((identity.get("stage") or {}).get("name"))
        legacy = _legacy_record_id(config, stage, identity)
        return legacy or config_job_id(stage, identity)


# -- records of the override-set identity --------------------------------------------
def canonical_overrides(overrides: Iterable[str]) -> list[str]:
    """Parse overrides with Hydra's own parser and write each canonically, sorted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = []
    for override in parser.parse_overrides(list(overrides)):
        key = override.get_key_element()
        bare_key = key.lstrip("+~")
        if bare_key in LEGACY_NON_IDENTITY_KEYS or bare_key.startswith("hydra"):
            continue
        if override.is_delete():
            lines.append(f"~{override.key_or_group}")
            continue
        value = _plain(override.value())
        if bare_key in number_fields():  # optimizer.weight_decay=0 is =0.0
            value = _as_float(value)
        lines.append(f"{key}={json.dumps(value, sort_keys=True)}")
    return sorted(lines)


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value  # floats stay floats: 1.0 is not the int 1, as in the config


def _as_float(value: object) -> object:
    """An integer (or a list's integers) as a float; anything else as it is."""
    if isinstance(value, list):
        return [_as_float(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@functools.lru_cache(maxsize=4096)
def _legacy_job_id(stage: str, overrides: tuple[str, ...]) -> str:
    canonical = "\n".join(canonical_overrides(overrides))
    digest = hashlib.sha1(f"{stage}\n{canonical}".encode()).hexdigest()[:DIGEST_LENGTH]
    return f"{stage}-{digest}"


def legacy_job_id(stage: str, overrides: Iterable[str]) -> str:
    """The earlier identity: ``<stage>-<digest of the canonical override set>``.

    Also the grid point of a job: jobs of one stage with the same override set are
    the same point of the grid, whatever configs they composed to.
    """
    return _legacy_job_id(stage, tuple(overrides))


def _legacy_record_id(config: Any, stage: str, identity: dict[str, Any]) -> str | None:
    """The legacy id of this job if its record there was made with this very config."""
    if "/" in stage or stage.startswith("."):
        return None
    jobs_dir = _experiments_dir(config) / stage / "jobs"
    overrides = _job_overrides(config) if jobs_dir.is_dir() else None
    if overrides is None:
        return None
    candidate = legacy_job_id(stage, tuple(overrides))
    path = jobs_dir / f"{candidate}.json"
    recorded = _recorded_identity(path)
    return candidate if recorded is not None and recorded == canonical_json(identity) else None


def _job_overrides(config: Any) -> list[str] | None:
    """The job's ``hydra.overrides.task``: from its config, else from the running job."""
    if isinstance(config, DictConfig) and "hydra" in config:
        return task_overrides(config)
    from hydra.core.hydra_config import HydraConfig

    if isinstance(config, DictConfig) and HydraConfig.initialized():
        return override_lines(HydraConfig.get().overrides.task)
    return None


def _experiments_dir(config: Any) -> Path:
    value = (OmegaConf.select(config, "experiments_dir") if isinstance(config, DictConfig)
             else config.get("experiments_dir"))
    path = Path(str(value if value is not None else "experiments"))
    return path if path.is_absolute() else Path.cwd() / path


_RECORD_CACHE: dict[Path, tuple[tuple[int, int], str | None]] = {}


def _recorded_identity(path: Path) -> str | None:
    """Canonical identity of the config a job record holds (cached by mtime and size)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _RECORD_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        config = json.loads(path.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    value = canonical_json(identity_config(config)) if isinstance(config, dict) else None
    _RECORD_CACHE[path] = (stamp, value)
    return value


# -- names derived from the id -------------------------------------------------------
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


def _job_id_resolver(stage: str, *, _root_: DictConfig) -> str:
    return job_id_for(_root_, str(stage))


def register_resolvers() -> None:
    """Register the ``tmgg.*`` resolvers (idempotent)."""
    resolvers = {
        "tmgg.short": short_float,
        "tmgg.job_id": _job_id_resolver,
        "tmgg.suffix": job_suffix,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
