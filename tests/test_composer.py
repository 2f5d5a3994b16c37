"""Planning that keeps up: one parse of each config per sweep, same configs as Hydra's.

The shared repository must change nothing but speed: every job's composed config,
hydra node included, equals the one Hydra's own uncached loader composes, and no
object of the cache ever ends up inside a composed config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tmgg.jobs.compose import (
    compose_jobs,
    compose_sweep,
    hydra_session,
    load_master_config,
    recorded_or_composed_sweep,
)
from tmgg.jobs.composer import (
    SharedConfigRepository,
    composition_inputs_digest,
    keep_compositions_for_the_sweeper,
    share_config_cache,
)
from tmgg.jobs.plan import PlannedJob, expand_grid
from tmgg.jobs.sweep import record_plan


def _composed(job: PlannedJob) -> dict[str, Any]:
    """Everything a job's composition holds: the full config unresolved, and its flags."""
    config = job.sweep_config
    assert config is not None
    return {
        "sweep_config": OmegaConf.to_container(config, resolve=False),
        "flags": (OmegaConf.is_struct(config), OmegaConf.is_readonly(config),
                  OmegaConf.is_readonly(config.hydra)),
        "task_config": job.task_config,
        "overrides": job.overrides,
        "job_id": job.job_id,
        "run_name": job.run_name,
    }


def _assert_same_jobs(fast: list[PlannedJob], baseline: list[PlannedJob]) -> None:
    assert len(fast) == len(baseline)
    for cached, plain in zip(fast, baseline, strict=True):
        assert _composed(cached) == _composed(plain), plain.run_name


def _structure(node: Any, path: str = "") -> list[tuple[Any, ...]]:
    """Every node of a config tree as written: path, class, metadata, raw leaf value.

    Stricter than comparing containers: node types, element and key types, flags and
    optional all count. The resolver cache is left out: ``load_sweep_config`` copies
    the master's (``${now:...}`` of the time each session composed its master).
    """
    meta = node._metadata
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)
              if f.name != "resolver_cache"}
    fields["flags"] = dict(fields.get("flags") or {})
    row: list[tuple[Any, ...]] = [(path, type(node).__name__, sorted(fields.items(), key=str))]
    if OmegaConf.is_dict(node) and not node._is_none() and not node._is_missing() \
            and not node._is_interpolation():
        for key in node:
            row += _structure(node._get_node(key), f"{path}.{key}")
    elif OmegaConf.is_list(node) and not node._is_none() and not node._is_missing() \
            and not node._is_interpolation():
        for index in range(len(node)):
            row += _structure(node._get_node(index), f"{path}[{index}]")
    else:
        row.append((path, "value", repr(node._value())))
    return row


def _raw_compositions(master_overrides: list[str], jobs: list[list[str]] | None,
                      shared: bool) -> tuple[list[Any], int | None]:
    """What ``load_sweep_config`` gives for each job (or each job of the master's grid),
    as ``_structure`` rows or the error it raised; with the count of full compositions."""
    with hydra_session(shared_cache=shared) as loader:
        master = load_master_config(loader, master_overrides)
        if jobs is None:
            jobs = expand_grid(master, [o for o in master_overrides
                                        if not o.startswith("hydra")])
        results: list[Any] = []
        for job in jobs:
            try:
                results.append(_structure(loader.load_sweep_config(master, job)))
            except Exception as error:  # noqa: BLE001 - the same error counts as the same
                results.append((type(error).__name__, str(error)))
        cache = getattr(loader.repository, "cache", None)
        return results, None if cache is None else cache.full_compositions


def _sweep_with_raw_compositions(overrides: list[str], shared: bool
                                 ) -> tuple[list[PlannedJob], list[Any], int | None]:
    """``compose_sweep``'s jobs, with what ``load_sweep_config`` gave for each of them as
    ``_structure`` rows (taken before the plan numbers and freezes it) and the count of
    full compositions: one pass over the grid yields both, as ``_raw_compositions`` and
    ``compose_sweep`` would each on their own."""
    with hydra_session(shared_cache=shared) as loader:
        load = loader.load_sweep_config
        raw: list[Any] = []

        def load_and_record(master_config: Any, sweep_overrides: list[str]) -> Any:
            config = load(master_config, sweep_overrides)
            raw.append(_structure(config))
            return config

        loader.load_sweep_config = load_and_record
        master = load_master_config(loader, overrides)
        jobs = compose_jobs(loader, master, overrides).jobs
        cache = getattr(loader.repository, "cache", None)
        return jobs, raw, None if cache is None else cache.full_compositions


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "count", "group_choices"),
                         [("stage1", 108, 3), ("stage2", 216, 3 * 4)])
def test_every_stage_job_composes_as_with_hydras_uncached_loader(
        stage: str, count: int, group_choices: int) -> None:
    """Every job of stages 1 and 2: Hydra's composition node for node, and the plan."""
    fast, shared, full = _sweep_with_raw_compositions([f"stage={stage}"], shared=True)
    plain, baseline, _ = _sweep_with_raw_compositions([f"stage={stage}"], shared=False)
    assert len(baseline) == count
    assert full == 1 + group_choices  # the master, then one per model (and data)
    for index, (ours, hydras) in enumerate(zip(shared, baseline, strict=True)):
        assert ours == hydras, f"job #{index}"
    _assert_same_jobs(fast, plain)


# Group choices and values interleaved, appends, deletions, a dict value on a group,
# hydra overrides before and after task ones, a value override Hydra refuses.
UNUSUAL_JOBS = [
    ["model=filter_bank", "optimizer.lr=1e-3", "seed=3"],
    ["optimizer.lr=5e-4", "model=self_attention", "model.k=16"],
    ["model=linear_pe", "+extra.note=hello", "optimizer=adam", "optimizer.lr=2e-3"],
    ["seed=4"],
    ["~logger.group", "model=linear_pe"],
    ["model={k: 4}", "seed=5"],
    ["hydra.job.name=renamed", "seed=2", "model=filter_bank"],
    ["seed=2", "hydra.job.name=renamed"],
    ["model.no_such_key=3"],
    ["model=no_such_model"],
    ["trainer.max_steps='not a number'", "model=filter_bank"],
]


def test_unusual_jobs_compose_node_for_node_as_hydra_composes_them() -> None:
    master = ["stage=smoke", "hydra.job.config.override_dirname.kv_sep=:",
              "hydra.job.config.override_dirname.exclude_keys=[seed]"]
    ours, full = _raw_compositions(master, UNUSUAL_JOBS, shared=True)
    hydras, _ = _raw_compositions(master, UNUSUAL_JOBS, shared=False)
    for job, mine, theirs in zip(UNUSUAL_JOBS, ours, hydras, strict=True):
        assert mine == theirs, job
    assert sum(isinstance(result, tuple) for result in hydras) == 2  # the two refused
    assert full is not None and full <= len(UNUSUAL_JOBS)


def test_a_grid_over_a_group_and_values_composes_one_template_per_choice() -> None:
    overrides = ["stage=smoke", "model=linear_pe,filter_bank", "optimizer.lr=1e-3,5e-4",
                 "model.k=4,8", "seed=1"]
    ours, full = _raw_compositions(overrides, None, shared=True)
    hydras, _ = _raw_compositions(overrides, None, shared=False)
    assert len(hydras) == 8 and ours == hydras
    assert full == 1 + 2  # the master, then one per model
    fast = compose_sweep(overrides)
    _assert_same_jobs(fast.jobs, compose_sweep(overrides, shared_cache=False).jobs)


def test_one_seed_of_stage1_composes_as_with_hydras_uncached_loader() -> None:
    overrides = ["stage=stage1", "seed=2", "optimizer.weight_decay=1e-3"]
    fast = compose_sweep(overrides)
    baseline = compose_sweep(overrides, shared_cache=False)
    assert len(baseline.jobs) == 18
    _assert_same_jobs(fast.jobs, baseline.jobs)


def _nodes(config: Any) -> set[int]:
    """The ids of every node object of a config tree."""
    ids = {id(config)}
    if OmegaConf.is_dict(config):
        for key in config:
            ids |= _nodes(config._get_node(key))
    elif OmegaConf.is_list(config):
        for index in range(len(config)):
            ids |= _nodes(config._get_node(index))
    return ids


def test_the_cache_is_read_once_per_file_and_never_merged_into_a_job() -> None:
    with hydra_session() as loader:
        shared = share_config_cache(loader)
        assert isinstance(shared, SharedConfigRepository)
        assert share_config_cache(loader) is shared  # idempotent
        master = load_master_config(loader, ["stage=stage1", "model=linear_pe"])
        before = {key: OmegaConf.to_container(result.config, resolve=False)
                  for key, result in shared.cache.results.items() if result is not None}
        sweep = compose_jobs(loader, master, ["stage=stage1", "model=linear_pe"])
        assert len(sweep.jobs) == 36
        cached = [result.config for result in shared.cache.results.values()
                  if result is not None]
        # Hydra reads about 19 files per job; shared, each is parsed once for all 36,
        # and Hydra composes in full the master and one job (of the one model).
        assert shared.cache.loads == len(shared.cache.results) < 40
        assert shared.cache.full_compositions == 1 + 1
        cached_ids = set().union(*(_nodes(config) for config in cached))
        for job in sweep.jobs:
            assert not _nodes(job.sweep_config) & cached_ids, job.run_name
        after = {key: OmegaConf.to_container(result.config, resolve=False)
                 for key, result in shared.cache.results.items() if result is not None}
        assert {key: after[key] for key in before} == before


def test_basic_sweepers_check_of_each_planned_job_reuses_the_plans_composition() -> None:
    """tmgg-train -m: BasicSweeper composes each job again only to check it composes."""
    overrides = ["stage=smoke"]
    with hydra_session(shared_cache=False) as loader:
        baseline_master = load_master_config(loader, overrides)
        baseline = [OmegaConf.to_container(loader.load_sweep_config(baseline_master, job.overrides))
                    for job in compose_jobs(loader, baseline_master, overrides).jobs]
    with hydra_session() as loader:
        keep_compositions_for_the_sweeper(loader)
        keep_compositions_for_the_sweeper(loader)  # idempotent
        master = load_master_config(loader, overrides)
        jobs = compose_jobs(loader, master, overrides).jobs  # the plan
        shared = loader.repository
        composed = shared.cache.compositions
        checked = [loader.load_sweep_config(master_config=master, sweep_overrides=job.overrides)
                   for job in jobs]  # as Sweeper.validate_batch_is_legal calls it
        assert shared.cache.compositions == composed
        assert [OmegaConf.to_container(config) for config in checked] == baseline
        loader.load_sweep_config(master_config=master, sweep_overrides=jobs[0].overrides)
        assert shared.cache.compositions == composed + 1  # kept for one more asker only


# -- reading the recorded plan instead of composing ----------------------------------

SMOKE = ["stage=smoke", "seed=1"]


def _record(overrides: list[str], launcher_overrides: list[str]) -> list[PlannedJob]:
    """Record a plan as ``tmgg-train -m`` does (it adds hydra.mode=MULTIRUN itself)."""
    full = ["hydra.mode=MULTIRUN", *launcher_overrides, *overrides]
    with hydra_session() as loader:
        master = load_master_config(loader, full)
        jobs = compose_jobs(loader, master, full).jobs
        record_plan(jobs, master, overrides)
    return jobs


def test_report_and_reconcile_read_a_plan_recorded_for_the_same_overrides(
        tmp_path: Path) -> None:
    overrides = [*SMOKE, f"experiments_dir={tmp_path}/exp", f"outputs_dir={tmp_path}/out"]
    recorded = _record(overrides, ["hydra/launcher=local"])
    sweep = recorded_or_composed_sweep(overrides)
    assert sweep.from_plan
    assert [(j.job_id, j.run_name, j.overrides, j.task_config) for j in sweep.jobs] == [
        (j.job_id, j.run_name, j.overrides, j.task_config) for j in recorded]
    assert sweep.stage == "smoke" and sweep.ledger.root == tmp_path / "exp" / "smoke"


@pytest.mark.parametrize("change", ["other_overrides", "other_inputs", "no_configs",
                                    "one_stage_of_several"])
def test_a_plan_that_may_differ_is_not_read_but_composed_again(
        tmp_path: Path, change: str) -> None:
    overrides = [*SMOKE, f"experiments_dir={tmp_path}/exp", f"outputs_dir={tmp_path}/out"]
    _record(overrides, [])
    plan_path = tmp_path / "exp" / "smoke" / "plan.json"
    plan = json.loads(plan_path.read_text())
    asked = overrides
    if change == "other_overrides":
        asked = [*overrides, "trainer.max_steps=7"]
    elif change == "other_inputs":
        plan["composition"]["inputs_digest"] = "0" * 64
    elif change == "one_stage_of_several":
        plan["sweep_jobs"] = len(plan["jobs"]) + 4
    else:
        for job in plan["jobs"]:
            job.pop("config")
    plan_path.write_text(json.dumps(plan))
    sweep = recorded_or_composed_sweep(asked)
    assert not sweep.from_plan
    assert all(job.sweep_config is not None for job in sweep.jobs)
    if change == "other_overrides":
        assert {job.task_config["trainer"]["max_steps"] for job in sweep.jobs} == {7}


def test_the_inputs_digest_changes_with_any_conf_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import tmgg.config

    conf = tmp_path / "conf"
    shutil.copytree(tmgg.config.CONF_DIR, conf)
    monkeypatch.setattr(tmgg.config, "CONF_DIR", conf)
    before = composition_inputs_digest()
    assert composition_inputs_digest() == before
    model = conf / "model" / "linear_pe.yaml"
    model.write_text(model.read_text() + "\n# a comment is a change too\n")
    assert composition_inputs_digest() != before
