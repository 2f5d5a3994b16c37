"""The one declared schema of a composed job's task config (everything but ``hydra``).

Every key of every config group option has a rule here, and the walk in
``check_task_config`` refuses a key the schema does not declare and a declared key
that is missing: adding an option to ``conf/`` without its rule fails every plan
that uses it (and ``tests/test_config_schema.py``), so no option goes unchecked.
Groups chosen by ``name`` (model, optimizer, data, ...) declare each option's keys.
After the per-key rules, cross-field checks refuse combinations that cannot run as
intended (a data set too small for disjoint splits, a schedule that ends before its
warm-up). Each error names the job and the dotted field (``JobConfigError``).

Pure Python and omegaconf: Hydra imports this at start-up (through tmgg.config).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

Rule = Callable[[Any], "str | None"]


class JobConfigError(ValueError):
    """A composed job config that must not run; names the job and the field."""

    def __init__(self, job: str, field: str, problem: str) -> None:
        self.job = job
        self.field = field
        self.problem = problem
        super().__init__(f"job {job}: {field}: {problem}")


# -- rules: a value in, None or what is wrong with it out -------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def declares_a_number(rule: Rule) -> Rule:
    """Mark ``rule`` as one for a real number, which accepts ``0`` and ``0.0`` alike: the
    job's identity writes such a value as a float (``canonical_numbers``)."""
    rule.declared_type = float  # type: ignore[attr-defined]
    return rule


@declares_a_number
def positive_number(value: Any) -> str | None:
    number = _number(value)
    if number is None:
        return f"expected a positive number, got {value!r}"
    if not math.isfinite(number) or number <= 0:
        return f"must be > 0, got {value!r}"
    return None


@declares_a_number
def non_negative_number(value: Any) -> str | None:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        return f"expected a number >= 0, got {value!r}"
    return None


def integer_at_least(minimum: int, maximum: int | None = None) -> Rule:
    def rule(value: Any) -> str | None:
        span = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        if not _is_int(value):
            return f"expected an integer {span}, got {value!r}"
        if value < minimum or (maximum is not None and value > maximum):
            return f"must be an integer {span}, got {value!r}"
        return None

    return rule


positive_int = integer_at_least(1)
non_negative_int = integer_at_least(0)


def number_in(low: float, high: float, *, high_open: bool = False) -> Rule:
    @declares_a_number
    def rule(value: Any) -> str | None:
        number = _number(value)
        inside = number is not None and low <= number and (
            number < high if high_open else number <= high)
        if not inside:
            return f"expected a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}"
        return None

    return rule


fraction = number_in(0.0, 1.0)


def one_of(options: tuple[Any, ...]) -> Rule:
    def rule(value: Any) -> str | None:
        if isinstance(value, bool) or value not in options:
            spellings = dict.fromkeys(str(option) for option in options)
            return f"unknown value {value!r}; expected one of {', '.join(spellings)}"
        return None

    return rule


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"is mandatory and must be a non-empty string, got {value!r}"
    return None


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    def nullable(value: Any) -> str | None:
        problem = None if value is None else rule(value)
        return f"{problem} (null is allowed too)" if problem else None

    nullable.inner_rule = rule  # type: ignore[attr-defined]
    return nullable


# Names that become file and directory names: letters, digits and _ . = -
SAFE_NAME = re.compile(r"[A-Za-z0-9_.=-]+")
MAX_NAME_LENGTH = 128


def safe_name(value: Any) -> str | None:
    """A name that is used as a path component: no separators, no '..', a sane length."""
    if not isinstance(value, str) or not value:
        return f"expected a non-empty name, got {value!r}"
    if len(value) > MAX_NAME_LENGTH:
        return f"is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed"
    if not SAFE_NAME.fullmatch(value) or ".." in value:
        return (f"{value!r} is not a safe name: it becomes a file or directory name, so use "
                "letters, digits and _ . = - only (no path separators, no '..')")
    return None


def directory(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"expected a directory path, got {value!r}"
    if "\0" in value:
        return "a path cannot contain a NUL character"
    return None


def list_of(item: Rule, *, min_length: int = 0, max_length: int | None = None) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        if len(value) < min_length or (max_length is not None and len(value) > max_length):
            span = (f"at least {min_length}" if max_length is None
                    else f"{min_length} to {max_length}")
            return f"expected {span} items, got {len(value)}"
        for index, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {index}: {problem}"
        return None

    rule.item_rule = item  # type: ignore[attr-defined]
    return rule


def seed(value: Any) -> str | None:
    # numpy (and Lightning's seed_everything) take 0 .. 2**32 - 1; Lightning replaces an
    # out-of-range seed with a random one, with only a warning.
    return integer_at_least(0, 2**32 - 1)(value)


def wandb_tag(value: Any) -> str | None:
    # wandb.init refuses an empty tag or one longer than 64 characters.
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        return f"expected a tag of 1 to 64 characters, got {value!r}"
    return None


def http_url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return f"expected an http(s) URL of a W&B server, got {value!r}"
    return None


# Lightning's own spellings (lightning.fabric.plugins.precision.precision); the
# transformer-engine ones need a package tmgg does not install.
PRECISIONS = ("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16",
              "16-true", "bf16-true", "64-true", "64", 64)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def devices(value: Any) -> str | None:
    if value == "auto" or value == -1 or (_is_int(value) and value >= 1):
        return None
    if (isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value)
            and len(set(value)) == len(value)):
        return None
    return (f"expected a number of devices >= 1, -1 (all), 'auto' or a list of device "
            f"indices, got {value!r}")


# -- the schema --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """A config group whose ``name`` picks the option; each option declares its keys."""

    options: Mapping[str, Mapping[str, Any]]


class FreeForm:
    """A namespace of the user's own: any keys and values; tmgg reads none of them."""


@dataclass(frozen=True)
class Omittable:
    """A key that may be absent; when present, its rule applies."""

    rule: Any


Node = Rule | Mapping[str, Any] | Options | FreeForm | Omittable

ADAM = {"lr": positive_number, "weight_decay": non_negative_number,
        "betas": list_of(number_in(0.0, 1.0, high_open=True), min_length=2, max_length=2),
        "eps": non_negative_number, "amsgrad": boolean}
SPLITS = {"num_train_graphs": positive_int, "num_val_graphs": positive_int,
          "num_test_graphs": positive_int}
SAMPLING = {"samples_per_epoch": positive_int, "val_samples": positive_int,
            "test_samples": positive_int, "batch_size": positive_int}
# The earlier system's variant of the task (issue 14); the defaults are SPEC.md's.
VARIANT = {"self_loops": boolean}
SYMMETRIZE = {"symmetrize": boolean}
TEST_SPLITS = ("disjoint", "outside_train")

# Extension point: a new key in conf/ needs its rule here (and a new option its entry).
SCHEMA: dict[str, Node] = {
    "seed": seed,
    "experiments_dir": directory,
    "outputs_dir": directory,
    # stage before job: job.id and job.run_name are made from stage.name.
    "stage": {"name": safe_name, "run_name": safe_name,
              "gpu_seconds_per_job": optional(positive_number)},
    "job": {"id": safe_name, "run_name": safe_name},
    "model": Options({
        "linear_pe": {"k": positive_int, "max_nodes": positive_int, **SYMMETRIZE},
        "filter_bank": {"k": positive_int, "degree": positive_int, **SYMMETRIZE},
        "self_attention": {"k": positive_int, "d_k": positive_int, **SYMMETRIZE},
    }),
    "optimizer": Options({
        "adamw": ADAM,
        "adam": ADAM,
        "sgd": {"lr": positive_number, "weight_decay": non_negative_number,
                "momentum": non_negative_number, "nesterov": boolean},
    }),
    "scheduler": Options({
        "cosine_warmup": {"warmup_fraction": fraction, "decay_end_fraction": fraction},
        "none": {},
    }),
    "data": Options({
        "sbm_partitions": {"num_nodes": positive_int, "min_blocks": positive_int,
                           "max_blocks": positive_int, "min_block_size": positive_int,
                           "max_block_size": positive_int, **SPLITS, **SAMPLING, **VARIANT,
                           "test_split": one_of(TEST_SPLITS)},
        "sbm_single": {"num_nodes": positive_int,
                       "block_sizes": list_of(positive_int, min_length=1),
                       "p_in": fraction, "p_out": fraction, "graph_seed": non_negative_int,
                       **SAMPLING, **VARIANT},
        "er": {"num_nodes": positive_int, "p": fraction, **SPLITS, **SAMPLING, **VARIANT},
        "regular": {"num_nodes": positive_int, "degree": non_negative_int, **SPLITS,
                    **SAMPLING, **VARIANT},
        "tree": {"num_nodes": integer_at_least(2), **SPLITS, **SAMPLING, **VARIANT},
    }),
    "noise": Options({
        "edge_flip": {"levels": list_of(fraction, min_length=1)},
    }),
    "objective": Options({
        "bce": {"loss_diagonal": boolean, "metrics_diagonal": boolean},
    }),
    "trainer": {
        "max_steps": positive_int,
        "val_check_interval": positive_int,
        "gradient_clip_val": non_negative_number,  # 0 turns clipping off
        "accelerator": one_of(ACCELERATORS),
        "devices": devices,
        "precision": one_of(PRECISIONS),
        "log_every_n_steps": positive_int,
        "checkpoint": boolean,
        "resume": boolean,
        "test_checkpoint": one_of(("best", "last")),
        "num_threads": optional(positive_int),
    },
    "logger": Options({
        # A stage pins its W&B destination for every logger; the CSV logger ignores it.
        "csv": {"entity": Omittable(optional(non_empty_string)),
                "project": Omittable(optional(non_empty_string)),
                "group": Omittable(optional(non_empty_string))},
        "wandb": {"entity": non_empty_string, "project": non_empty_string,
                  "group": optional(non_empty_string),
                  "mode": one_of(("auto", "online", "offline", "disabled")),
                  "tags": list_of(wandb_tag),
                  # The pinned W&B host and the run-id generation (branch wandb12):
                  # omittable until conf/logger/wandb.yaml declares them everywhere.
                  "base_url": Omittable(http_url),
                  "run_generation": Omittable(non_negative_int)},
    }),
    # Values of the user's own (say ``+extra.notes_dir=${hydra:runtime.output_dir}/n``):
    # part of the job's config and identity, read by no tmgg code.
    "extra": Omittable(FreeForm()),
}


# -- numbers by their declared type --------------------------------------------------------


def _is_number_rule(rule: Any) -> bool:
    while isinstance(rule, Omittable) or hasattr(rule, "inner_rule"):
        rule = rule.rule if isinstance(rule, Omittable) else rule.inner_rule
    return getattr(rule, "declared_type", None) is float


def _canonical_value(value: Any, rule: Any) -> Any:
    if isinstance(rule, Omittable):
        rule = rule.rule
    while hasattr(rule, "inner_rule"):
        rule = rule.inner_rule
    if isinstance(rule, Options) and isinstance(value, dict):
        option = rule.options.get(value.get("name"))  # type: ignore[arg-type]
        return _canonical_mapping(value, option) if option is not None else value
    if isinstance(rule, Mapping) and isinstance(value, dict):
        return _canonical_mapping(value, rule)
    if hasattr(rule, "item_rule") and isinstance(value, list):
        return [_canonical_value(item, rule.item_rule) for item in value]
    if _is_number_rule(rule) and _is_int(value):
        return float(value)
    return value


def _canonical_mapping(config: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _canonical_value(value, schema.get(key)) for key, value in config.items()}


def canonical_numbers(config: Mapping[str, Any]) -> dict[str, Any]:
    """A plain task config with each value the schema declares a real number written as a
    float: ``optimizer.weight_decay=0`` and ``=0.0`` are one job (one id, one output
    folder, one W&B run). Integer keys need nothing: their rules refuse ``1.0``. Keys the
    schema does not know are left as they are (validation names them)."""
    return _canonical_mapping(config, SCHEMA)


@functools.lru_cache(maxsize=1)
def number_fields() -> frozenset[str]:
    """Dotted keys (``optimizer.lr``) declared a real number by every option that has them:
    what a command-line override of a number can be canonical by, before the option of
    its group is known."""
    found: dict[str, set[bool]] = {}

    def walk(schema: Any, prefix: str) -> None:
        if isinstance(schema, Options):
            for option in schema.options.values():
                walk(option, prefix)
            return
        if isinstance(schema, Mapping):
            for key, rule in schema.items():
                walk(rule, f"{prefix}{key}.")
            return
        rule = schema.rule if isinstance(schema, Omittable) else schema
        item = getattr(rule, "item_rule", None)
        found.setdefault(prefix.rstrip("."), set()).add(
            _is_number_rule(item if item is not None else rule))

    walk(SCHEMA, "")
    return frozenset(path for path, kinds in found.items() if kinds == {True})


# -- the walk ----------------------------------------------------------------------------


def check_task_config(cfg: DictConfig, job: str) -> None:
    """Refuse the first key that is undeclared, missing, unresolvable or against its rule,
    then the first cross-field conflict; ``hydra`` is the launcher's, checked there."""
    try:
        _check_mapping(cfg, SCHEMA, "", job, skip=frozenset({"hydra"}))
    except JobConfigError as error:
        if error.field == "logger.entity":  # the first W&B question a newcomer meets
            raise JobConfigError(job, error.field, f"{error.problem}; name the W&B team "
                                 "with logger.entity=<team>, or log without W&B: "
                                 "logger=csv") from error
        raise
    values = {str(key): _plain(cfg[key]) for key in cfg if str(key) != "hydra"}
    for cross_check in CROSS_CHECKS:
        found = cross_check(values)
        if found:
            raise JobConfigError(job, *found)


def _check_mapping(node: Any, schema: Mapping[str, Any], prefix: str, job: str,
                   skip: frozenset[str] = frozenset()) -> None:
    if not isinstance(node, DictConfig):
        raise JobConfigError(job, prefix.rstrip(".") or "<config>",
                             f"expected a mapping of {', '.join(schema) or 'no keys'}, "
                             f"got {_plain(node)!r}")
    present = [str(key) for key in node if str(key) not in skip]
    for key in present:
        if key not in schema:
            declared = ", ".join(sorted(schema)) or "none"
            raise JobConfigError(job, f"{prefix}{key}",
                                 f"unknown option (declared here: {declared})")
    for key, rule in schema.items():
        field = f"{prefix}{key}"
        if isinstance(rule, Omittable):
            if key not in present:
                continue
            rule = rule.rule
        elif key not in present:
            raise JobConfigError(job, field, "is mandatory but missing from the config")
        value = _resolved(node, key, field, job)
        if isinstance(rule, FreeForm):
            continue
        if isinstance(rule, Options):
            _check_options(value, rule, field, job)
        elif isinstance(rule, Mapping):
            _check_mapping(value, rule, f"{field}.", job)
        else:
            try:
                plain = _plain(value)
            except Exception as error:  # an interpolation inside a list that fails
                raise JobConfigError(job, field, f"cannot be resolved: {error}") from error
            problem = rule(plain)
            if problem:
                raise JobConfigError(job, field, problem)


def _check_options(value: Any, group: Options, field: str, job: str) -> None:
    if not isinstance(value, DictConfig):
        raise JobConfigError(job, field, f"expected a config group option, got {_plain(value)!r}")
    name = _resolved(value, "name", f"{field}.name", job) if "name" in value else None
    if name not in group.options:
        raise JobConfigError(job, f"{field}.name", f"unknown value {name!r}; expected one of "
                             f"{', '.join(group.options)}")
    _check_mapping(value, {"name": lambda _: None, **group.options[name]}, f"{field}.", job)


def _resolved(node: DictConfig, key: str, field: str, job: str) -> Any:
    try:
        return node[key]
    except Exception as error:  # a missing ??? value, or an interpolation that fails
        raise JobConfigError(job, field, f"cannot be resolved: {error}") from error


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


# -- cross-field checks: (field, problem) or None ------------------------------------------


def compositions_count(n: int, min_blocks: int, max_blocks: int, min_size: int,
                       max_size: int) -> int:
    """Ordered compositions of n into min..max blocks of min..max size (as data.py draws)."""
    if min_size > max_size or min_blocks > max_blocks:
        return 0
    # ways[s]: compositions of s into the current number of blocks.
    ways = [1] + [0] * n
    total = 0
    for blocks in range(1, max_blocks + 1):
        nxt = [0] * (n + 1)
        for s, count in enumerate(ways):
            if count:
                for size in range(min_size, min(max_size, n - s) + 1):
                    nxt[s + size] += count
        ways = nxt
        if blocks >= min_blocks:
            total += ways[n]
    return total


def _data_feasible(cfg: dict[str, Any]) -> tuple[str, str] | None:
    data = cfg["data"]
    name, n = data["name"], data["num_nodes"]
    if name == "sbm_partitions":
        if data["min_blocks"] > data["max_blocks"]:
            return "data.min_blocks", f"{data['min_blocks']} exceeds data.max_blocks=" \
                                      f"{data['max_blocks']}"
        if data["min_block_size"] > data["max_block_size"]:
            return "data.min_block_size", f"{data['min_block_size']} exceeds " \
                                          f"data.max_block_size={data['max_block_size']}"
        available = compositions_count(n, data["min_blocks"], data["max_blocks"],
                                       data["min_block_size"], data["max_block_size"])
        needed = sum(data[key] for key in SPLITS)
        if data["test_split"] == "outside_train":  # test may share validation's
            needed = data["num_train_graphs"] + max(data["num_val_graphs"],
                                                    data["num_test_graphs"])
        if needed > available:
            return ("data.num_train_graphs",
                    f"train + val + test graphs = {needed}, but num_nodes={n} has only "
                    f"{available} compositions into {data['min_blocks']}-{data['max_blocks']} "
                    f"blocks of size {data['min_block_size']}-{data['max_block_size']}, and "
                    "the three splits must be disjoint")
    if name == "sbm_single" and sum(data["block_sizes"]) != n:
        return ("data.block_sizes", f"{data['block_sizes']} sums to {sum(data['block_sizes'])}, "
                f"but data.num_nodes is {n}")
    if name == "regular" and (data["degree"] >= n or (n * data["degree"]) % 2):
        return ("data.degree", f"{data['degree']}-regular graphs on num_nodes={n} nodes do "
                "not exist (need degree < num_nodes and an even num_nodes*degree)")
    return None


def _model_fits_data(cfg: dict[str, Any]) -> tuple[str, str] | None:
    model, n = cfg["model"], cfg["data"]["num_nodes"]
    if model["name"] == "linear_pe" and n > model["max_nodes"]:
        return "model.max_nodes", f"{model['max_nodes']} is smaller than data.num_nodes={n}"
    return None


def _schedule_in_order(cfg: dict[str, Any]) -> tuple[str, str] | None:
    scheduler = cfg["scheduler"]
    if (scheduler["name"] == "cosine_warmup"
            and scheduler["warmup_fraction"] > scheduler["decay_end_fraction"]):
        return ("scheduler.warmup_fraction", f"{scheduler['warmup_fraction']} is after "
                f"scheduler.decay_end_fraction={scheduler['decay_end_fraction']}: the decay "
                "would end before the warm-up")
    return None


def _nesterov_has_momentum(cfg: dict[str, Any]) -> tuple[str, str] | None:
    optimizer = cfg["optimizer"]
    if optimizer["name"] == "sgd" and optimizer["nesterov"] and optimizer["momentum"] <= 0:
        return "optimizer.nesterov", "Nesterov momentum needs optimizer.momentum > 0"
    return None


CROSS_CHECKS: tuple[Callable[[dict[str, Any]], tuple[str, str] | None], ...] = (
    _data_feasible, _model_fits_data, _schedule_in_order, _nesterov_has_momentum)
