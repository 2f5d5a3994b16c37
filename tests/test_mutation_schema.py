"""The task-config schema's rules and walk (tmgg.config.schema), pinned down where
mutation testing found them unexamined (issue 25): the exact refusal each rule gives
(what the user reads after ``job <run>: <field>:``), what the walk refuses first, and
the cross-field checks' bounds.

Fast and in-process: one smoke job is composed once for the module (real Hydra
composition through ``compose_sweep``) and then changed key by key. Part of ``make
mutate``'s selection; tests/test_config_schema.py covers the same refusals end to end.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from tmgg.config.schema import (
    JobConfigError,
    boolean,
    canonical_numbers,
    check_task_config,
    compositions_count,
    devices,
    directory,
    fraction,
    http_url,
    integer_at_least,
    list_of,
    non_empty_string,
    non_negative_number,
    number_fields,
    number_in,
    one_of,
    optional,
    positive_number,
    safe_name,
    seed,
    wandb_tag,
)


@functools.cache
def _composed_smoke_task() -> dict[str, Any]:
    """Composed once per process (mutmut forks its runs from one that already has it)."""
    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(["stage=smoke", "model=linear_pe", "seed=1", "logger=csv"])
    (job,) = sweep.jobs
    return job.task_config


@pytest.fixture
def smoke_task() -> dict[str, Any]:
    return copy.deepcopy(_composed_smoke_task())


def checked(task: dict[str, Any], **changes: Any) -> JobConfigError | None:
    """The refusal of ``task`` with dotted ``changes`` (None: accepted)."""
    config = OmegaConf.create(copy.deepcopy(task))
    for dotted, value in changes.items():
        OmegaConf.update(config, dotted.replace("__", "."), value, force_add=True)
    try:
        check_task_config(config, "j1")
    except JobConfigError as error:
        return error
    return None


def test_number_rules_say_what_they_expected() -> None:
    assert positive_number(0.5) is None and positive_number(3) is None
    assert positive_number("1") == "expected a positive number, got '1'"
    assert positive_number(True) == "expected a positive number, got True"
    assert positive_number(0) == "must be > 0, got 0"
    assert positive_number(float("inf")) == "must be > 0, got inf"
    assert non_negative_number(0) is None and non_negative_number(2.5) is None
    for bad in (-0.1, float("nan"), "x", None):
        assert non_negative_number(bad) == f"expected a number >= 0, got {bad!r}"
    at_least_two = integer_at_least(2)
    assert at_least_two(2) is None and at_least_two(10**9) is None
    assert at_least_two(1) == "must be an integer >= 2, got 1"
    assert at_least_two(2.0) == "expected an integer >= 2, got 2.0"
    assert at_least_two(False) == "expected an integer >= 2, got False"
    bounded = integer_at_least(1, 3)
    assert bounded(3) is None and bounded(1) is None
    assert bounded(4) == "must be an integer from 1 to 3, got 4"
    assert seed(2**32 - 1) is None and seed(0) is None
    assert seed(2**32) == "must be an integer from 0 to 4294967295, got 4294967296"
    assert fraction(0.0) is None and fraction(1) is None
    assert fraction(1.01) == "expected a number in [0.0, 1.0], got 1.01"
    half_open = number_in(0.0, 1.0, high_open=True)
    assert half_open(0.999) is None
    assert half_open(1.0) == "expected a number in [0.0, 1.0), got 1.0"
    assert half_open(-0.1) is not None and half_open(None) is not None


def test_value_rules_say_what_they_expected() -> None:
    colours = one_of(("red", 32, "32"))
    assert colours("red") is None and colours(32) is None
    assert colours("blue") == "unknown value 'blue'; expected one of red, 32"
    assert colours(True) is not None
    assert boolean(False) is None and boolean(1) == "expected true or false, got 1"
    assert non_empty_string("a") is None
    assert non_empty_string(" ") == "is mandatory and must be a non-empty string, got ' '"
    assert non_empty_string(None) is not None
    maybe = optional(positive_number)
    assert maybe(None) is None and maybe(1) is None
    assert maybe(0) == "must be > 0, got 0 (null is allowed too)"
    assert safe_name("run_1.a=b-c") is None
    assert safe_name("") == "expected a non-empty name, got ''"
    assert safe_name("a" * 129) == "is 129 characters long; at most 128 are allowed"
    assert safe_name("a" * 128) is None
    assert safe_name("a/b") == ("'a/b' is not a safe name: it becomes a file or directory "
                                "name, so use letters, digits and _ . = - only (no path "
                                "separators, no '..')")
    assert safe_name("a..b") is not None
    assert directory("out") is None and directory(" ") == "expected a directory path, got ' '"
    assert directory("a\0b") == "a path cannot contain a NUL character"
    assert wandb_tag("t" * 64) is None and wandb_tag("") is not None
    assert wandb_tag("t" * 65) == f"expected a tag of 1 to 64 characters, got {'t' * 65!r}"
    assert http_url("http://h") is None and http_url("https://h") is None
    assert http_url("ftp://h") == "expected an http(s) URL of a W&B server, got 'ftp://h'"
    for ok in ("auto", -1, 1, 4, [0], [0, 2]):
        assert devices(ok) is None
    for bad in (0, -2, [], [0, 0], [-1], "gpu"):
        assert devices(bad) == (f"expected a number of devices >= 1, -1 (all), 'auto' or a "
                                f"list of device indices, got {bad!r}")


def test_list_rules_check_length_then_each_item() -> None:
    two_to_three = list_of(positive_number, min_length=2, max_length=3)
    assert two_to_three([1, 2]) is None and two_to_three([1, 2, 3]) is None
    assert two_to_three((1, 2)) == "expected a list, got (1, 2)"
    assert two_to_three([1]) == "expected 2 to 3 items, got 1"
    assert two_to_three([1, 2, 3, 4]) == "expected 2 to 3 items, got 4"
    assert two_to_three([1, 0]) == "item 1: must be > 0, got 0"
    assert list_of(positive_number, min_length=1)([]) == "expected at least 1 items, got 0"
    assert list_of(positive_number)([]) is None


def test_the_composed_smoke_job_passes_and_each_bad_key_is_named(
        smoke_task: dict[str, Any]) -> None:
    assert checked(smoke_task) is None
    error = checked(smoke_task, seed=-1)
    assert isinstance(error, JobConfigError)
    assert (error.job, error.field) == ("j1", "seed")
    assert str(error) == "job j1: seed: must be an integer from 0 to 4294967295, got -1"
    unknown = checked(smoke_task, model__dropout=0.1)
    assert unknown is not None and unknown.field == "model.dropout"
    assert unknown.problem.startswith("unknown option (declared here: ")
    top = checked(smoke_task, wandb_project="x")
    assert top is not None and top.field == "wandb_project"
    option = checked(smoke_task, model__name="no_such_model")
    assert option is not None and option.field == "model.name"
    assert option.problem.startswith("unknown value 'no_such_model'; expected one of ")
    not_a_group = checked(smoke_task, model=3)
    assert not_a_group is not None and not_a_group.problem == \
        "expected a config group option, got 3"
    not_a_mapping = checked(smoke_task, trainer=5)
    assert not_a_mapping is not None and not_a_mapping.field == "trainer"
    assert not_a_mapping.problem.startswith("expected a mapping of ")


def test_a_missing_or_unresolvable_key_is_named(smoke_task: dict[str, Any]) -> None:
    without_seed = {k: v for k, v in smoke_task.items() if k != "seed"}
    missing = checked(without_seed)
    assert missing is not None and (missing.field, missing.problem) == (
        "seed", "is mandatory but missing from the config")
    unresolved = checked(smoke_task, seed="${oc.env:TMGG_NO_SUCH_VARIABLE}")
    assert unresolved is not None and unresolved.field == "seed"
    assert unresolved.problem.startswith("cannot be resolved: ")
    hydra_is_skipped = OmegaConf.create({**copy.deepcopy(smoke_task), "hydra": {"x": 1}})
    check_task_config(hydra_is_skipped, "j1")


def test_a_wandb_job_without_entity_is_told_how_to_name_one(smoke_task: dict[str, Any]) -> None:
    logger = {"name": "wandb", "entity": "", "project": "p", "group": "g", "tags": [],
              "mode": "offline", "base_url": "https://api.wandb.ai", "run_generation": 0}
    error = checked({**smoke_task, "logger": logger})
    assert error is not None and error.field == "logger.entity"
    assert error.problem == ("is mandatory and must be a non-empty string, got ''; name the "
                             "W&B team with logger.entity=<team>, or log without W&B: "
                             "logger=csv")


def test_cross_field_checks(smoke_task: dict[str, Any]) -> None:
    n = smoke_task["data"]["num_nodes"]
    small = checked(smoke_task, model__max_nodes=n - 1)
    assert small is not None and (small.field, small.problem) == (
        "model.max_nodes", f"{n - 1} is smaller than data.num_nodes={n}")
    assert checked(smoke_task, model__max_nodes=n) is None
    late = checked(smoke_task, scheduler__warmup_fraction=0.9, scheduler__decay_end_fraction=0.5)
    assert late is not None and late.problem == (
        "0.9 is after scheduler.decay_end_fraction=0.5: the decay would end before the warm-up")
    assert checked(smoke_task, scheduler__warmup_fraction=0.5,
                   scheduler__decay_end_fraction=0.5) is None


def test_composition_counts() -> None:
    assert compositions_count(4, 1, 4, 1, 4) == 8  # 2**(n-1) ordered compositions
    assert compositions_count(4, 2, 2, 1, 3) == 3  # 1+3, 2+2, 3+1
    assert compositions_count(5, 2, 2, 2, 3) == 2
    assert compositions_count(4, 3, 2, 1, 4) == 0 and compositions_count(4, 1, 4, 3, 2) == 0
    assert compositions_count(6, 1, 1, 1, 6) == 1 and compositions_count(6, 1, 1, 1, 5) == 0


def test_numbers_declared_real_are_written_as_floats(smoke_task: dict[str, Any]) -> None:
    canonical = canonical_numbers({**smoke_task, "optimizer": {**smoke_task["optimizer"],
                                                               "weight_decay": 0}})
    assert canonical["optimizer"]["weight_decay"] == 0.0
    assert isinstance(canonical["optimizer"]["weight_decay"], float)
    assert isinstance(canonical["seed"], int)  # an integer key stays an integer
    assert canonical_numbers({"unknown": 1}) == {"unknown": 1}
    assert "optimizer.lr" in number_fields() and "seed" not in number_fields()
    assert isinstance(OmegaConf.create(canonical), DictConfig)
