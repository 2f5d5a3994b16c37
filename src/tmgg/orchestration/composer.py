"""One parse of each config file for every job of a sweep.

Hydra's ``ConfigLoaderImpl`` composes each job from scratch: every
``load_sweep_config`` wraps the loader's repository in a fresh
``CachingConfigRepository`` (a deep copy of the repository and its sources), so
the YAML files, their defaults lists and the ConfigStore's nodes are read again for
every job, about 56 lookups of 19 files per stage-1 job. ``SharedConfigRepository``
is the repository a loader wraps instead: per-load views of one cache that lives as
long as the loader, so a sweep parses each file once and every job is still composed
by Hydra's own ``load_sweep_config`` (DESIGN.md contract 1).

Why this is safe: Hydra merges a loaded config *into* the job's config without
copying it (``no_deepcopy_set_nodes``) and may replace ``ConfigResult.config``, so a
cached result must never be handed out itself. Each lookup returns a fresh
``ConfigResult`` holding a new copy of the cached config, rebuilt from a pickle of it
taken when the file was parsed (about 4x cheaper than ``copy.deepcopy`` of an
OmegaConf tree; these bytes never leave the process); the cached ones are never
reachable from a composed config. Defaults lists are shared: Hydra deep-copies them
before use. The cache assumes the config files do not change while the loader lives
(one sweep, one command). A loader without it is Hydra's own per-load path, the
baseline that tests and ``benchmarks/bench_planning.py`` compare against
(``compose_sweep(..., shared_cache=False)``).
"""

from __future__ import annotations

import copy
import functools
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
from hydra._internal.defaults_list import DefaultsList
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.default_element import ResultDefault
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.plugins.config_source import ConfigResult, ConfigSource


class _SharedCache:
    """What every view of one shared repository reads: results by search path and name."""

    def __init__(self) -> None:
        self.results: dict[tuple[Any, ...], ConfigResult | None] = {}
        self.pickled: dict[tuple[Any, ...], bytes] = {}  # each result's config, pickled
        self.lookups: dict[tuple[Any, ...], Any] = {}
        self.loads = 0  # delegate loads (file reads and parses), for tests and benchmarks
        self.compositions = 0  # load_configuration calls served (one view each)
        # Per distinct set of config-group choices (see ``_cached_defaults_list``):
        # Hydra's defaults list, and the config composed from it, pickled.
        self.defaults_lists: dict[tuple[Any, ...], DefaultsList] = {}
        self.composed: dict[int, tuple[list[ResultDefault], bytes]] = {}
        self.defaults_trees = 0  # defaults trees built (cache misses), for tests


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
    _install_defaults_list_cache()
    config_loader._compose_config_from_defaults_list = _CachedComposition(
        config_loader._compose_config_from_defaults_list, shared.cache)
    config_loader._parse_overrides_and_create_caching_repo = _CachedOverrideParsing(
        config_loader)
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


# -- one defaults tree and one merge per distinct set of config-group choices ---------
#
# Hydra's ``_load_configuration_impl`` builds each job's defaults tree from the
# overrides that choose config groups (``model=filter_bank``), merges the chosen
# files into one config, and only then applies the plain value overrides
# (``optimizer.lr=1e-3``, ``seed=2``) and fills in the hydra node (overrides,
# choices, override_dirname, ...). The first two steps depend on nothing else: the
# config files, the primary config's name, the group-choosing overrides and the run
# mode. A stage-1 sweep has three such sets (one per model) for 108 jobs, so both
# steps are done three times and every other job gets a copy of their result; all
# the rest of Hydra's per-job work (value overrides, hydra node) still runs as is.


def _group_choice_key(repo: IConfigRepository, config_name: str | None,
                      overrides: list[Any], prepend_hydra: bool,
                      skip_missing: bool) -> tuple[Any, ...] | None:
    """What a defaults list depends on, or None when the repository is not shared.

    An override counts as a value override exactly when Hydra's ``Overrides`` puts it
    in ``config_overrides`` (a dict value, or a key that is not a config group); every
    other override (group choices, appends, deletions, sweeps) is part of the key.
    """
    shared = getattr(repo, "delegate", None)
    if not isinstance(repo, CachingConfigRepository) or not isinstance(
            shared, SharedConfigRepository):
        return None
    choices = tuple(override.input_line for override in overrides
                    if override.is_sweep_override() or not _is_value_override(repo, override))
    return (shared._path_key, config_name, choices, prepend_hydra, skip_missing)


def _is_value_override(repo: IConfigRepository, override: Any) -> bool:
    """Hydra's own test (``defaults_list.Overrides``): not a group choice."""
    return isinstance(override.value(), dict) or not repo.group_exists(override.key_or_group)


def _cached_defaults_list(repo: IConfigRepository, config_name: str | None,
                          overrides_list: list[Any], prepend_hydra: bool,
                          skip_missing: bool) -> DefaultsList:
    """Hydra's ``create_defaults_list``, built once per group-choice set of a shared loader.

    A later job with the same group choices gets the same defaults (and tree, and
    known choices) with its own value overrides, in its own order, as Hydra would
    give them. Errors are never cached: a failing set is built (and fails) each time.
    """
    key = _group_choice_key(repo, config_name, overrides_list, prepend_hydra, skip_missing)
    if key is None:
        return _HYDRA_CREATE_DEFAULTS_LIST(repo=repo, config_name=config_name,
                                           overrides_list=overrides_list,
                                           prepend_hydra=prepend_hydra,
                                           skip_missing=skip_missing)
    shared: SharedConfigRepository = repo.delegate  # type: ignore[attr-defined]
    built = shared.cache.defaults_lists.get(key)
    if built is None:
        shared.cache.defaults_trees += 1
        built = _HYDRA_CREATE_DEFAULTS_LIST(repo=repo, config_name=config_name,
                                            overrides_list=overrides_list,
                                            prepend_hydra=prepend_hydra,
                                            skip_missing=skip_missing)
        shared.cache.defaults_lists[key] = built
    values = [override for override in overrides_list
              if not override.is_sweep_override() and _is_value_override(repo, override)]
    return DefaultsList(defaults=built.defaults, defaults_tree=built.defaults_tree,
                        config_overrides=values, overrides=built.overrides)


_HYDRA_CREATE_DEFAULTS_LIST = hydra_loader_impl.create_defaults_list


def _install_defaults_list_cache() -> None:
    """Route ``ConfigLoaderImpl``'s defaults lists through ``_cached_defaults_list``.

    Idempotent. A loader whose repository is not shared gets Hydra's own function:
    only loaders given to ``share_config_cache`` see a difference (speed).
    """
    hydra_loader_impl.create_defaults_list = _cached_defaults_list  # type: ignore[assignment]


class _CachedComposition:
    """A loader's ``_compose_config_from_defaults_list``, merged once per defaults list.

    Keyed by the defaults list object ``_cached_defaults_list`` shares between the
    jobs of one group-choice set; each call gets a fresh copy (Hydra then changes the
    config it is given), unpickled from the merge of the first.
    """

    def __init__(self, compose: Any, cache: _SharedCache) -> None:
        self.compose = compose
        self.cache = cache

    def __call__(self, defaults: list[ResultDefault], repo: IConfigRepository) -> Any:
        kept = self.cache.composed.get(id(defaults))
        if kept is not None and kept[0] is defaults:
            return pickle.loads(kept[1])
        config = self.compose(defaults=defaults, repo=repo)
        if any(defaults is built.defaults for built in self.cache.defaults_lists.values()):
            # the list object stays alive in the cache, so its id is never reused
            self.cache.composed[id(defaults)] = (defaults, pickle.dumps(config))
        return config


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
