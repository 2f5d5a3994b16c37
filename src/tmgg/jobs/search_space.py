"""The search space of an adaptive stage (``hydra/sweeper=tmgg_optuna``, docs/adaptive.md).

A stage declares it in ``hydra.sweeper.params`` in hydra-optuna-sweeper's syntax, parsed
by Hydra's own override grammar:

- ``interval(1e-4, 3e-1)``: a float; ``tag(log, interval(...))`` samples it on a log
  scale, ``tag(int, interval(4, 20))`` as an integer;
- ``range(4, 20)``: an integer (both ends included, as in hydra-optuna-sweeper), with a
  step as third argument; float ends give a float with that step;
- ``choice(a, b, c)``: one of the values;
- a plain value: fixed for every trial;
- a comma list ``1,2,3``: not searched; every trial runs one job per value (the
  stage's seeds) and its value is the mean over those jobs.

This module imports no optuna at module level: the plan refuses a bad space without it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

ADAPTIVE_SWEEPER = "tmgg_optuna"
SWEEPER_TARGET = "hydra_plugins.tmgg_sweepers.optuna_sweeper.TmggOptunaSweeper"


class SearchSpaceError(ValueError):
    """A search space tmgg cannot sample (names the parameter)."""


@dataclass(frozen=True)
class Dimension:
    """One searched key and the distribution its values are drawn from."""

    key: str
    kind: str  # "float", "int" or "categorical"
    text: str  # as the stage wrote it
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution (imports optuna)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            assert self.low is not None and self.high is not None
            return IntDistribution(int(self.low), int(self.high), log=self.log,
                                   step=int(self.step or 1))
        assert self.low is not None and self.high is not None
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=None if self.step is None else float(self.step))

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        scale = "log " if self.log else ""
        step = f", step {self.step}" if self.step not in (None, 1) else ""
        return f"{scale}{self.kind} in [{self.low}, {self.high}]{step}"


@dataclass
class SearchSpace:
    """What a trial is: the searched dimensions, the fixed overrides every job gets, and
    the repeats (one override list per job of a trial, e.g. one per seed)."""

    dimensions: list[Dimension]
    fixed: list[str] = field(default_factory=list)
    repeats: list[list[str]] = field(default_factory=lambda: [[]])

    @property
    def keys(self) -> list[str]:
        return [dimension.key for dimension in self.dimensions]

    def distributions(self) -> dict[str, Any]:
        return {d.key: d.distribution() for d in self.dimensions}

    def trial_overrides(self, params: Mapping[str, Any]) -> list[list[str]]:
        """The override lists of a trial's jobs, one per repeat."""
        searched = [override_line(d.key, params[d.key]) for d in self.dimensions]
        return [[*self.fixed, *searched, *repeat] for repeat in self.repeats]

    def trial_key(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The trial's identity among the stage's trials: its searched values."""
        return tuple(override_line(d.key, params[d.key]) for d in self.dimensions)

    def read_overrides(self, overrides: Sequence[str]) -> tuple[dict[str, Any], str] | None:
        """A job's searched values and its repeat (as text) from its override lines;
        None for a job that is not a trial of this space (a key missing or a value
        outside its distribution)."""
        given: dict[str, str] = {}
        for line in overrides:
            key, sep, value = line.partition("=")
            if sep:
                given[key.lstrip("+~")] = value
        params: dict[str, Any] = {}
        for dimension in self.dimensions:
            if dimension.key not in given:
                return None
            value = _typed_value(dimension.key, given[dimension.key])
            if not _within(dimension, value):
                return None
            params[dimension.key] = value
        repeat_keys = sorted({line.split("=", 1)[0] for rep in self.repeats for line in rep})
        repeat = ",".join(f"{key}={given.get(key)}" for key in repeat_keys)
        return params, repeat

    def repeat_texts(self) -> list[str]:
        repeat_keys = sorted({line.split("=", 1)[0] for rep in self.repeats for line in rep})
        texts = []
        for repeat in self.repeats:
            given = dict(line.split("=", 1) for line in repeat)
            texts.append(",".join(f"{key}={given.get(key)}" for key in repeat_keys))
        return texts


def override_line(key: str, value: Any) -> str:
    """``key=value`` as Hydra's override grammar reads the value back unchanged."""
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"


def is_adaptive(config: DictConfig) -> bool:
    """Whether the sweep's sweeper is tmgg's Optuna sweeper."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    if "hydra/sweeper" in choices and str(choices["hydra/sweeper"]) == ADAPTIVE_SWEEPER:
        return True
    return OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER_TARGET


def _typed_value(key: str, text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={text}").value()


def _within(dimension: Dimension, value: Any) -> bool:
    if dimension.kind == "categorical":
        return value in dimension.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    assert dimension.low is not None and dimension.high is not None
    return bool(dimension.low <= value <= dimension.high)


def parse_space(params: Mapping[str, Any] | None, arguments: Sequence[str] = (),
                where: str = "hydra.sweeper.params") -> SearchSpace:
    """The search space of the stage's ``params`` and the command line's overrides (a
    later key replaces an earlier one, as with Hydra's basic sweeper). Raises
    ``SearchSpaceError`` naming the parameter whose value cannot be sampled."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    lines: dict[str, tuple[str, str]] = {}
    for key, value in (params or {}).items():
        text = _yaml_value_text(value)
        lines[str(key)] = (f"{key}={text}", f"{where}.{key}")
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        lines[key] = (argument, f"the command-line override {argument!r}")
    dimensions: list[Dimension] = []
    fixed: list[str] = []
    repeat_axes: list[list[str]] = []
    for key, (line, named) in lines.items():
        try:
            override = parser.parse_override(line)
        except HydraException as error:
            raise SearchSpaceError(f"{named}: cannot parse {line.split('=', 1)[1]!r} "
                                   f"({_first_line(error)})") from None
        if override.is_hydra_override():
            fixed.append(line)
            continue
        value = override.value()
        text = line.split("=", 1)[1]
        if isinstance(value, ChoiceSweep) and value.simple_form:
            if value.tags:
                raise SearchSpaceError(f"{named}: tags apply to interval() and range() only")
            repeat_axes.append([override_line(key, item) for item in value.list])
        elif isinstance(value, ChoiceSweep):
            choices = tuple(value.list)
            if not choices or any(isinstance(c, list | dict) for c in choices):
                raise SearchSpaceError(f"{named}: choice() needs plain values, got {text!r}")
            dimensions.append(Dimension(key, "categorical", text, choices=choices))
        elif isinstance(value, IntervalSweep):
            dimensions.append(_interval(key, named, text, value))
        elif isinstance(value, RangeSweep):
            dimensions.append(_range(key, named, text, value))
        elif override.is_sweep_override():
            raise SearchSpaceError(f"{named}: {text!r} cannot be sampled (use interval(), "
                                   "range(), choice(), a value or a comma list)")
        else:
            fixed.append(line)
    repeats = [list(combo) for combo in itertools.product(*repeat_axes)] or [[]]
    if not dimensions:
        raise SearchSpaceError(f"{where}: no searched parameter (interval(), range() or "
                               "choice()): an adaptive stage needs at least one")
    return SearchSpace(dimensions, fixed, repeats)


def _yaml_value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(_yaml_value_text, value))
    return str(value)


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _number(named: str, value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SearchSpaceError(f"{named}: {what} must be a finite number, got {value!r}")
    return value


def _interval(key: str, named: str, text: str, value: Any) -> Dimension:
    unknown = set(value.tags) - {"log", "int"}
    if unknown:
        raise SearchSpaceError(f"{named}: unknown tag(s) {sorted(unknown)} (log, int)")
    low = _number(named, value.start, "the interval's start")
    high = _number(named, value.end, "the interval's end")
    log = "log" in value.tags
    as_int = "int" in value.tags
    _check_bounds(named, low, high, log)
    if as_int:
        return Dimension(key, "int", text, low=int(low), high=int(high), log=log)
    return Dimension(key, "float", text, low=float(low), high=float(high), log=log)


def _range(key: str, named: str, text: str, value: Any) -> Dimension:
    if value.shuffle:
        raise SearchSpaceError(f"{named}: shuffle() cannot be sampled; use range() or choice()")
    unknown = set(value.tags) - {"log"}
    if unknown:
        raise SearchSpaceError(f"{named}: unknown tag(s) {sorted(unknown)} for range() (log)")
    low = _number(named, value.start, "the range's start")
    high = _number(named, value.stop, "the range's stop")
    step = _number(named, value.step if value.step is not None else 1, "the range's step")
    log = "log" in value.tags
    _check_bounds(named, low, high, log)
    if step <= 0:
        raise SearchSpaceError(f"{named}: the range's step must be positive, got {step}")
    if log and step != 1:
        raise SearchSpaceError(f"{named}: a log range cannot have a step")
    if all(isinstance(v, int) for v in (low, high, step)):
        return Dimension(key, "int", text, low=low, high=high, log=log,
                         step=None if step == 1 else step)
    return Dimension(key, "float", text, low=float(low), high=float(high), log=log,
                     step=None if log else float(step))


def _check_bounds(named: str, low: float, high: float, log: bool) -> None:
    if low >= high:
        raise SearchSpaceError(f"{named}: its start {low} must be below its end {high}")
    if log and low <= 0:
        raise SearchSpaceError(f"{named}: a log scale needs a positive start, got {low}")


#: hydra.sweeper.pruner's values (tmgg.launch.adaptive.make_pruner builds each).
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")


def sweeper_settings(config: DictConfig) -> dict[str, Any]:
    """The sweeper's settings as plain values (``hydra.sweeper`` less its params)."""
    node = OmegaConf.select(config, "hydra.sweeper")
    settings = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    assert isinstance(settings, dict)
    settings.pop("params", None)
    return settings


def stage_space(config: DictConfig, arguments: Sequence[str]) -> SearchSpace:
    """The adaptive stage's space, its settings checked; ``SearchSpaceError`` otherwise."""
    settings = sweeper_settings(config)
    n_trials = settings.get("n_trials")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise SearchSpaceError(f"hydra.sweeper.n_trials: a positive integer, got {n_trials!r}")
    n_jobs = settings.get("n_jobs")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1:
        raise SearchSpaceError(f"hydra.sweeper.n_jobs: a positive integer, got {n_jobs!r}")
    if settings.get("direction") not in ("minimize", "maximize"):
        raise SearchSpaceError("hydra.sweeper.direction: minimize or maximize, got "
                               f"{settings.get('direction')!r}")
    if settings.get("sampler") not in ("tpe", "random"):
        raise SearchSpaceError(f"hydra.sweeper.sampler: tpe or random, got "
                               f"{settings.get('sampler')!r}")
    if settings.get("pruner") not in PRUNERS:
        raise SearchSpaceError(f"hydra.sweeper.pruner: one of {', '.join(PRUNERS)}, "
                               f"got {settings.get('pruner')!r}")
    for name, least in (("pruner_min_resource", 1), ("pruner_max_resource", 1),
                        ("pruner_reduction_factor", 2)):
        value = settings.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise SearchSpaceError(f"hydra.sweeper.{name}: an integer >= {least} (or null), "
                                   f"got {value!r}")
    # The launcher's ``fuse`` key itself is checked with the launcher's other settings
    # (tmgg.jobs.fusion); reading it here keeps this module out of fusion's imports.
    fuse = str(OmegaConf.select(config, "hydra.launcher.fuse", default="off"))
    if settings.get("fuse_trials") and fuse != "auto":
        raise SearchSpaceError("hydra.sweeper.fuse_trials: true needs a launcher that "
                               "fuses jobs (hydra/launcher=local or modal with "
                               "hydra.launcher.fuse=auto)")
    params = OmegaConf.select(config, "hydra.sweeper.params")
    plain = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    assert isinstance(plain, dict)
    return parse_space(plain, arguments)


def probe_params(space: SearchSpace) -> dict[str, Any]:
    """Every dimension at its low end (or first choice): the plan's probe trial."""
    return {d.key: d.choices[0] if d.kind == "categorical" else d.low
            for d in space.dimensions}


def space_bounds(space: SearchSpace) -> list[tuple[str | None, dict[str, Any]]]:
    """The probe, then for each dimension each of its other ends (its high end, its
    other choices) with the rest at the probe's: ``(the dimension changed, params)``."""
    probe = probe_params(space)
    out: list[tuple[str | None, dict[str, Any]]] = [(None, probe)]
    for dimension in space.dimensions:
        ends = (dimension.choices[1:] if dimension.kind == "categorical"
                else [dimension.high] if dimension.high != dimension.low else [])
        out += [(dimension.key, {**probe, dimension.key: end}) for end in ends]
    return out


def check_space_bounds(config_loader: Any, config: DictConfig, space: SearchSpace) -> None:
    """Refuse a space whose ends give a job config tmgg refuses (``PlanError`` naming
    the parameter and the job's problem), before anything is dispatched. One job (the
    first repeat) per end: the values in between are told FAIL to Optuna if they are
    refused (``tmgg.launch.adaptive``), the study goes on."""
    from tmgg.jobs.plan import PlanError, compose_plan

    for changed, params in space_bounds(space):
        try:
            compose_plan(config_loader, config, space.trial_overrides(params)[:1])
        except PlanError as error:
            where = (f"hydra.sweeper.params.{changed}={params[changed]}" if changed
                     else "the space's low ends (" + ", ".join(
                         f"{k}={v}" for k, v in params.items()) + ")")
            raise PlanError(f"stage {config.stage.name}: {where} can be sampled but its "
                            f"job is refused: {error}") from None

