"""Planning that keeps up: what one sweep's compositions share.

Hydra's ``ConfigLoaderImpl`` composes each job from scratch: every
``load_sweep_config`` wraps the loader's repository in a fresh
``CachingConfigRepository`` (a deep copy of the repository and its sources), so
the YAML files, their defaults lists and the ConfigStore's nodes are read again for
every job, about 56 lookups of 19 files per stage-1 job, then builds the job's
defaults tree and merges the files. ``share_config_cache`` gives a loader (for one
sweep, one command) four things, each keeping every job's composition identical to
Hydra's own (tests/test_composer.py compares them node for node):

* ``SharedConfigRepository``: per-load views of one cache that lives as long as the
  loader, so a sweep parses each file once.
* ``_TemplateCompositions``: Hydra composes one job in full per distinct set of
  config-group choices (three for stage 1's 108 jobs); every job is that
  composition with its own value overrides applied by Hydra's own code.
* ``parse_override_lines``: each distinct override line parsed once.
* ``KeptCompositions`` (``keep_compositions_for_the_sweeper``): BasicSweeper's second
  composition of each planned job is the plan's.

``interpolations_parsed_once`` (used while a plan is composed) keeps OmegaConf's
parse of each interpolation string for the next resolution of the same string.

Why the repository cache is safe: Hydra merges a loaded config *into* the job's
config without copying it (``no_deepcopy_set_nodes``) and may replace
``ConfigResult.config``, so a cached result must never be handed out itself. Each
lookup returns a fresh ``ConfigResult`` holding a new copy of the cached config,
rebuilt from a pickle of it taken when the file was parsed (about 4x cheaper than
``copy.deepcopy`` of an OmegaConf tree; these bytes never leave the process); the
cached ones are never reachable from a composed config. Defaults lists are shared:
Hydra deep-copies them before use. The caches assume the config files do not change
while the loader lives. A loader without them is Hydra's own per-load path, the
baseline that tests and ``benchmarks/bench_planning.py`` compare against
(``compose_sweep(..., shared_cache=False)``).
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hydra._internal.config_loader_impl as hydra_loader_impl
from hydra._internal.config_repository import (
    CachingConfigRepository,
    ConfigRepository,
    IConfigRepository,
)
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.types import RunMode
from omegaconf import DictConfig


class _SharedCache:
    """What every view of one shared repository reads: results by search path and name."""

    def __init__(self) -> None:
        self.results: dict[tuple[Any, ...], ConfigResult | None] = {}
        self.pickled: dict[tuple[Any, ...], bytes] = {}  # each result's config, pickled
        self.lookups: dict[tuple[Any, ...], Any] = {}
        self.loads = 0  # delegate loads (file reads and parses), for tests and benchmarks
        self.compositions = 0  # load_configuration calls served (one view each)
        # Per distinct set of group choices (``_TemplateCompositions``): Hydra's
        # composition of it, pickled, and the environment it copied.
        self.templates: dict[tuple[Any, ...], tuple[bytes, tuple[str | None, ...],
                                                     tuple[str, ...]]] = {}
        self.full_compositions = 0  # compositions Hydra made in full, for tests


class SharedConfigRepository(IConfigRepository):
    """A loader's repository whose parsed configs outlive one ``load_configuration``.

    ``ConfigLoaderImpl`` deep-copies its repository once per load; a deep copy of this
    one is a cheap view of the same cache (its own sources, so that a load that
    re-initialises the search path from ``hydra.searchpath`` does not change the
    others). Results are keyed by the view's search path as well as the config name.
    """

    def __init__(self, delegate: ConfigRepository, cache: _SharedCache | None = None) -> None:
        self.delegate = delegate
        self.cache = cache if cache is not None else _SharedCache()
        self._path_key = _search_path_key(delegate)

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedConfigRepository:
        self.cache.compositions += 1
        return SharedConfigRepository(self.delegate, self.cache)

    def initialize_sources(self, config_search_path: ConfigSearchPath) -> None:
        self.delegate = ConfigRepository(config_search_path=config_search_path)
        self._path_key = _search_path_key(self.delegate)

    def load_config(self, config_path: str) -> ConfigResult | None:
        key = (self._path_key, config_path)
        if key not in self.cache.results:
            self.cache.loads += 1
            loaded = self.delegate.load_config(config_path=config_path)
            self.cache.results[key] = loaded
            if loaded is not None:
                self.cache.pickled[key] = pickle.dumps(loaded.config)
        cached = self.cache.results[key]
        if cached is None:
            return None
        result = copy.copy(cached)  # Hydra may set .config on what it is given
        result.config = pickle.loads(self.cache.pickled[key])
        result.header = dict(cached.header)
        return result

    def _memo(self, kind: str, *args: Any) -> Any:
        key = (self._path_key, kind, *args)
        if key not in self.cache.lookups:
            self.cache.lookups[key] = getattr(self.delegate, kind)(*args)
        return self.cache.lookups[key]

    def group_exists(self, config_path: str) -> bool:
        return bool(self._memo("group_exists", config_path))

    def config_exists(self, config_path: str) -> bool:
        return bool(self._memo("config_exists", config_path))

    def get_group_options(self, group_name: str,
                          results_filter: ObjectType | None = ObjectType.CONFIG) -> list[str]:
        return list(self._memo("get_group_options", group_name, results_filter))

    def get_schema_source(self) -> ConfigSource:
        return self.delegate.get_schema_source()

    def get_sources(self) -> list[ConfigSource]:
        return self.delegate.get_sources()


def _search_path_key(repository: ConfigRepository) -> tuple[tuple[str, str, str], ...]:
    return tuple((type(source).__name__, str(source.provider), str(source.path))
                 for source in repository.get_sources())


def share_config_cache(config_loader: Any) -> SharedConfigRepository | None:
    """Make every later composition of this loader share one parse of each config.

    Idempotent; the loader is Hydra's ``ConfigLoaderImpl`` (GlobalHydra's in a
    ``tmgg-train -m`` run, so BasicSweeper's per-job checks and the launcher share
    the plan's cache). Another loader is left alone and None returned.
    """
    repository = getattr(config_loader, "repository", None)
    if isinstance(repository, SharedConfigRepository):
        return repository
    if type(repository) is not ConfigRepository:
        return None
    shared = SharedConfigRepository(repository)
    config_loader.repository = shared
    config_loader._parse_overrides_and_create_caching_repo = _CachedOverrideParsing(
        config_loader)
    config_loader._load_configuration_impl = _TemplateCompositions(config_loader,
                                                                   shared.cache)
    return shared


# -- each distinct override line parsed once --------------------------------------------


def parse_override_lines(lines: list[str]) -> list[Override]:
    """Hydra's ``OverridesParser.parse_overrides``, each distinct line parsed once.

    Hydra's grammar parser (ANTLR in Python) takes about a millisecond a line, and a
    sweep's jobs repeat the same few lines (``model=linear_pe`` in 36 stage-1 jobs,
    the master's hydra overrides in every job). Each call gets its own copies, so
    nothing a caller does to an ``Override`` reaches another. ``shuffle(...)`` is
    random by design and parsed every time; errors are raised every time.
    """
    return [copy.deepcopy(_parsed_override(line)) if "shuffle(" not in line
            else OverridesParser.create().parse_overrides([line])[0] for line in lines]


@functools.lru_cache(maxsize=8192)
def _parsed_override(line: str) -> Override:
    (override,) = OverridesParser.create().parse_overrides([line])
    return override


class _CachedOverrideParsing:
    """A loader's ``_parse_overrides_and_create_caching_repo`` with ``parse_override_lines``.

    The rest is Hydra's: a caching repository over the loader's, the search path
    taken from the primary config and the overrides.
    """

    def __init__(self, config_loader: Any) -> None:
        self.config_loader = config_loader

    def __call__(self, config_name: str | None,
                 overrides: list[str]) -> tuple[list[Override], CachingConfigRepository]:
        parsed = parse_override_lines(overrides)
        caching_repo = CachingConfigRepository(self.config_loader.repository)
        self.config_loader._process_config_searchpath(config_name, parsed, caching_repo)
        return parsed, caching_repo


# -- one Hydra composition per distinct set of config-group choices -------------------
#
# Hydra's ``_load_configuration_impl`` builds each job's defaults tree from the
# overrides that choose config groups (``model=filter_bank``), merges the chosen
# files, applies the value overrides (``optimizer.lr=1e-3``, ``seed=2``) to the
# merged config in their order, and then fills in the hydra node. Of that node only
# ``hydra.overrides.task`` and ``hydra.job.override_dirname`` depend on the value
# overrides; the rest depends on the group choices, the hydra overrides and the
# process (working directory, Hydra's version). A stage-1 sweep has three group-choice
# sets (one per model) for 108 jobs: Hydra composes three jobs in full, each with the
# set's overrides only (its template); every job is then its template's copy with the
# job's value overrides applied by Hydra's own ``_apply_overrides_to_config`` and those
# two hydra fields set as Hydra sets them. A job whose overrides could reach further
# (a value override under ``hydra``, a hydra override after a task one, a sweep) is
# composed by Hydra in full, as is everything outside RUN mode (the master config).


class _TemplateCompositions:
    """A shared loader's ``_load_configuration_impl``: templates plus value overrides."""

    def __init__(self, config_loader: Any, cache: _SharedCache) -> None:
        self.config_loader = config_loader
        self.hydra_compose = config_loader._load_configuration_impl  # Hydra's own
        self.cache = cache

    def __call__(self, config_name: str | None, overrides: list[str], run_mode: RunMode,
                 from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
        split = self._split(config_name, overrides) if run_mode == RunMode.RUN else None
        if split is None:
            self.cache.full_compositions += 1
            return self.hydra_compose(config_name=config_name, overrides=overrides,
                                      run_mode=run_mode, from_shell=from_shell,
                                      validate_sweep_overrides=validate_sweep_overrides)
        template_lines, values, task_overrides = split
        key = (config_name, tuple(template_lines), from_shell, validate_sweep_overrides,
               os.getcwd(), self.config_loader.repository._path_key)
        template = self.cache.templates.get(key)
        if template is None or template[1] != _copied_env(template[2]):
            self.cache.full_compositions += 1
            config = self.hydra_compose(config_name=config_name, overrides=template_lines,
                                        run_mode=run_mode, from_shell=from_shell,
                                        validate_sweep_overrides=validate_sweep_overrides)
            env_keys = tuple(str(k) for k in config.hydra.job.env_copy)
            template = (pickle.dumps(config), _copied_env(env_keys), env_keys)
            self.cache.templates[key] = template
        config = pickle.loads(template[0])
        hydra_loader_impl.ConfigLoaderImpl._apply_overrides_to_config(values, config)
        task = config.hydra.overrides.task
        while len(task):
            task.pop()
        for override in task_overrides:
            task.append(override.input_line)
        dirname = config.hydra.job.config.override_dirname
        config.hydra.job.override_dirname = hydra_loader_impl.get_overrides_dirname(
            overrides=task_overrides, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
        return config

    def _split(self, config_name: str | None,
               overrides: list[str]) -> tuple[list[str], list[Override], list[Override]] | None:
        """(template overrides, value overrides, task overrides), None: compose in full.

        Value overrides are the ones Hydra's ``defaults_list.Overrides`` does not treat
        as group choices (a dict value, or a key that is no config group), judged on
        the repository Hydra would compose with (its search path included).
        """
        parsed, repo = self.config_loader._parse_overrides_and_create_caching_repo(
            config_name, overrides)
        template: list[str] = []
        values: list[Override] = []
        task: list[Override] = []
        for override in parsed:
            if override.is_sweep_override():
                return None
            if override.is_hydra_override():
                if task:
                    return None  # Hydra's order of hydra and task overrides matters
                template.append(override.input_line)
                continue
            task.append(override)
            if isinstance(override.value(), dict) or not repo.group_exists(
                    override.key_or_group):
                if override.key_or_group.startswith("hydra"):
                    return None  # could reach the hydra node
                values.append(override)
            else:
                template.append(override.input_line)
        return template, values, task


def _copied_env(keys: tuple[str, ...]) -> tuple[str | None, ...]:
    """The environment values ``hydra.job.env_copy`` copies into a composed config."""
    return tuple(os.environ.get(key) for key in keys)


class KeptCompositions:
    """``load_sweep_config`` that keeps each answer for the next identical request.

    In ``tmgg-train -m`` Hydra's BasicSweeper composes every job a second time only to
    check that it composes (``Sweeper.validate_batch_is_legal``), right after tmgg's
    plan composed and validated it with the same loader, master config and overrides.
    The plan's call keeps a pickle of the fresh composition (taken before the plan
    changes anything in it); the sweeper's identical call gets it back, unpickled, and
    drops it. Any other call composes as usual.
    """

    def __init__(self, load_sweep_config: Any) -> None:
        self.load_sweep_config = load_sweep_config
        self.kept: dict[tuple[int, tuple[str, ...]], bytes] = {}

    def __call__(self, master_config: Any, sweep_overrides: list[str]) -> Any:
        key = (id(master_config), tuple(sweep_overrides))
        kept = self.kept.pop(key, None)
        if kept is not None:
            return pickle.loads(kept)
        config = self.load_sweep_config(master_config, sweep_overrides)
        self.kept[key] = pickle.dumps(config)
        return config


def keep_compositions_for_the_sweeper(config_loader: Any) -> None:
    """Serve BasicSweeper's re-composition of each planned job from the plan's (idempotent)."""
    if not isinstance(config_loader.load_sweep_config, KeptCompositions):
        config_loader.load_sweep_config = KeptCompositions(config_loader.load_sweep_config)


# -- each distinct interpolation parsed once while a sweep is planned -------------------


class _KeptParses:
    """OmegaConf's interpolation parser, keeping each tree for the next identical string.

    OmegaConf parses an interpolation (``${tmgg.short:${optimizer.lr}}``) with its
    ANTLR grammar every time it resolves one, a millisecond or so in Python, and every
    job of a sweep resolves the same few dozen strings. A parse tree is only read
    while resolving (OmegaConf itself resolves nested interpolations while an outer
    tree is being visited), so one tree serves every resolution of its string.
    """

    def __init__(self, parse: Any) -> None:
        self.parse = parse
        self.trees: dict[tuple[str, str, str], Any] = {}

    def __call__(self, value: str, parser_rule: str = "configValue",
                 lexer_mode: str = "DEFAULT_MODE") -> Any:
        key = (value, parser_rule, lexer_mode)
        tree = self.trees.get(key)
        if tree is None:
            tree = self.parse(value, parser_rule, lexer_mode)  # errors are never kept
            if len(self.trees) < 65536:
                self.trees[key] = tree
        return tree


@contextmanager
def interpolations_parsed_once() -> Iterator[None]:
    """For the duration (one sweep's planning), OmegaConf parses each interpolation once.

    Re-entrant; OmegaConf's own parser is back afterwards.
    """
    import omegaconf.base

    if isinstance(omegaconf.base.parse, _KeptParses):
        yield
        return
    original = omegaconf.base.parse
    omegaconf.base.parse = _KeptParses(original)
    try:
        yield
    finally:
        omegaconf.base.parse = original


# -- when a recorded plan may stand in for composing again ----------------------------

# Overrides that never enter a job's task config: the launcher's choice and settings
# (DESIGN.md contract 2) and the run mode that `tmgg-train -m` adds itself. So
# `tmgg-sweep report stage=s1` may read the plan `tmgg-train -m stage=s1
# hydra/launcher=modal` recorded.
_IGNORED_KEYS = ("hydra/launcher", "hydra.launcher", "hydra.mode")


def composition_inputs_digest() -> str:
    """A digest of everything composition reads besides the overrides.

    The conf/ tree, tmgg's own code (its resolvers decide job ids and names; its
    launcher plugins register configs) and the hydra-core and omegaconf versions.
    Reading and hashing them takes milliseconds; any change means compose again.
    """
    import hashlib
    from importlib import metadata
    from pathlib import Path

    import tmgg
    from tmgg.config import CONF_DIR

    digest = hashlib.sha256()
    for name in ("hydra-core", "omegaconf"):
        digest.update(f"{name}=={metadata.version(name)}\n".encode())
    package = Path(tmgg.__file__).parent
    roots = [("conf", Path(CONF_DIR)), ("tmgg", package),
             ("hydra_plugins", package.parent / "hydra_plugins" / "tmgg_launchers")]
    for label, root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()
                           and p.suffix in (".yaml", ".yml", ".py")):
            digest.update(f"{label}/{path.relative_to(root).as_posix()}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def composition_key(overrides: list[str]) -> dict[str, Any]:
    """What a plan was composed from: its overrides (``_IGNORED_KEYS`` aside), inputs digest.

    Recorded in plan.json; a command may use that plan's jobs instead of composing
    only when its own key is equal (``recorded_plan_matches``).
    """
    kept = [line for line in overrides if not line.lstrip("+~").startswith(_IGNORED_KEYS)]
    return {"overrides": kept, "inputs_digest": composition_inputs_digest()}


def master_overrides(master_config: Any) -> list[str]:
    """Every override a master config was composed with (hydra ones first, as Hydra)."""
    from omegaconf import OmegaConf

    lines = OmegaConf.to_container(master_config.hydra.overrides.hydra)
    task = OmegaConf.to_container(master_config.hydra.overrides.task)
    assert isinstance(lines, list) and isinstance(task, list)
    return [str(line) for line in [*lines, *task]]


def recorded_plan_matches(plan: dict[str, Any] | None, master_config: Any) -> bool:
    """True when plan.json holds exactly the jobs composing now would give.

    Safe means: the plan records the composition key of the same overrides (launcher
    choice and settings aside) and the same conf/, code and library versions; it holds
    every job of that sweep (not a sweep over several stages, whose plan.json files
    each hold one stage's jobs); and every planned job carries its composed config.
    """
    if not plan or not plan.get("jobs") or len(plan["jobs"]) != plan.get("sweep_jobs"):
        return False
    if plan.get("composition") != composition_key(master_overrides(master_config)):
        return False
    return all(isinstance(job.get("config"), dict) for job in plan["jobs"])
