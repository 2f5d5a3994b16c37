"""Planning that keeps up: one parse of each config per sweep, same configs as Hydra's.

The shared repository must change nothing but speed: every job's composed config,
hydra node included, equals the one Hydra's own uncached loader composes, and no
object of the cache ever ends up inside a composed config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tmgg.orchestration.compose import (
    compose_jobs,
    compose_sweep,
    hydra_session,
    load_master_config,
    recorded_or_composed_sweep,
)
from tmgg.orchestration.composer import (
    SharedConfigRepository,
    composition_inputs_digest,
    keep_compositions_for_the_sweeper,
    share_config_cache,
)
from tmgg.orchestration.plan import PlannedJob
from tmgg.orchestration.sweep import record_plan


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


@pytest.mark.slow
def test_every_stage1_job_composes_as_with_hydras_uncached_loader() -> None:
    fast = compose_sweep(["stage=stage1"])
    baseline = compose_sweep(["stage=stage1"], shared_cache=False)
    assert len(baseline.jobs) == 108
    _assert_same_jobs(fast.jobs, baseline.jobs)


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
        # Hydra reads about 19 files per job; shared, each is parsed once for all 36.
        assert shared.cache.loads == len(shared.cache.results) < 40
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
