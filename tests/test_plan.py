"""Stages, identity and the plan: composed by Hydra, validated before dispatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, tmgg_sweep
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tmgg.cli.reporting.report import REPORT_FILE, write_report
from tmgg.config import CONF_DIR
from tmgg.config.identity import (
    config_job_id,
    identity_config,
    job_suffix,
    legacy_job_id,
    short_float,
    wandb_run_id,
)
from tmgg.jobs.compose import compose_sweep, hydra_session
from tmgg.jobs.ledger import FINISHED, Ledger
from tmgg.jobs.plan import PlanError
from tmgg.jobs.sweep import split_finished

COMMITTED = REPO / "experiments"

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("model", "optimizer", "scheduler", "data", "noise", "trainer", "logger")
}


@pytest.fixture(scope="module")
def stage1():
    """Stage 1 as `tmgg-train -m stage=stage1` composes it beside the committed ledger."""
    return compose_sweep(["stage=stage1", f"experiments_dir={COMMITTED}"])


def test_stage1_plan_has_108_unique_jobs_pinned_to_the_team(stage1) -> None:
    jobs = stage1.jobs
    assert len(jobs) == 108
    assert len({j.job_id for j in jobs}) == 108
    assert len({j.run_name for j in jobs}) == 108
    assert {(j.wandb["entity"], j.wandb["project"], j.wandb["group"]) for j in jobs} == {
        ("graph_denoise_team", "spectral_denoising", "stage1")}
    names = {j.run_name for j in jobs}
    for expected in ("stage1_filter_bank_lr1e-3_wd1e-2_k16_s1",
                     "stage1_filter_bank_lr1e-4_wd1e-2_k8_s1",
                     "stage1_linear_pe_lr1e-4_wd1e-2_k8_s1",
                     "stage1_self_attention_lr1e-4_wd1e-2_k8_s2",
                     "stage1_linear_pe_lr5e-4_wd1e-3_k8_s3"):
        assert expected in names
    first = jobs[0].task_config
    assert first["trainer"]["max_steps"] == 10_000 and first["optimizer"]["name"] == "adamw"
    assert first["noise"]["levels"] == [0.01, 0.05, 0.1, 0.2, 0.3]
    assert first["data"]["name"] == "sbm_partitions"


def test_planned_config_equals_what_tmgg_train_composes_alone(stage1) -> None:
    """Contract 1: the plan is Hydra's composition of each job's overrides, nothing else."""
    with hydra_session():
        for job in stage1.jobs:
            alone = compose(config_name="train", overrides=job.overrides,
                            return_hydra_config=True)
            HydraConfig.instance().set_config(alone)
            resolved = {
                key: (OmegaConf.to_container(alone[key], resolve=True)
                      if OmegaConf.is_config(alone[key]) else OmegaConf.select(alone, key))
                for key in alone if key != "hydra"}
            assert resolved == job.task_config, job.run_name


def test_override_on_top_narrows_the_stage() -> None:
    sweep = compose_sweep(["stage=stage1", "model=linear_pe"])
    assert len(sweep.jobs) == 36
    assert {j.task_config["model"]["name"] for j in sweep.jobs} == {"linear_pe"}


def test_stage2_grid() -> None:
    sweep = compose_sweep(["stage=stage2", "model=linear_pe", "seed=1"])
    assert len(sweep.jobs) == 4 * 2 * 3
    assert {j.task_config["data"]["name"] for j in sweep.jobs} == {
        "sbm_partitions", "er", "regular", "tree"}
    assert len({j.run_name for j in sweep.jobs}) == 24


@pytest.mark.parametrize(("group", "option"),
                         [(g, o) for g, options in GROUP_OPTIONS.items() for o in options])
def test_every_config_group_option_composes_and_validates(group: str, option: str) -> None:
    sweep = compose_sweep([f"{group}={option}"])
    assert len(sweep.jobs) == 1
    task = sweep.jobs[0].task_config
    if group in ("model", "optimizer", "scheduler", "data", "logger"):
        assert task[group]["name"] == option


@pytest.mark.parametrize("stage", ["adhoc", "smoke", "stage1", "stage2"])
def test_every_stage_composes(stage: str) -> None:
    sweep = compose_sweep([f"stage={stage}", "seed=1", "model=linear_pe"])
    assert sweep.stage == stage and sweep.jobs


def test_legacy_identity_is_deterministic_and_spelling_independent() -> None:
    """The override-set ids of records made before identity covered the config."""
    a = legacy_job_id("stage1", ["model=linear_pe", "optimizer.lr=1e-3", "seed=2"])
    b = legacy_job_id("stage1", ["seed=2", "optimizer.lr=0.001", "model=linear_pe"])
    assert a == b
    assert legacy_job_id("stage1", ["model=linear_pe", "optimizer.lr=1e-3", "seed=3"]) != a
    assert legacy_job_id("stage2", ["model=linear_pe", "optimizer.lr=1e-3", "seed=2"]) != a
    # Where the job's files go is not what the job is.
    assert legacy_job_id("stage1", ["model=linear_pe", "optimizer.lr=1e-3", "seed=2",
                                    "experiments_dir=/x", "outputs_dir=/y"]) == a
    assert wandb_run_id(a) == wandb_run_id(b) != wandb_run_id(legacy_job_id("s", []))
    assert [short_float(v) for v in (1e-3, 5e-4, 1e-2, 1e-4, 0.0, 1.5e-3, 16)] == [
        "1e-3", "5e-4", "1e-2", "1e-4", "0", "1.5e-3", "16"]


def test_invalid_job_stops_the_plan_naming_job_and_field() -> None:
    with pytest.raises(PlanError, match=r"stage1_linear_pe_lr1e-3_wd1e-2_k0_s1.*model\.k"):
        compose_sweep(["stage=stage1", "model=linear_pe", "model.k=0", "optimizer.lr=1e-3",
                       "optimizer.weight_decay=1e-2", "seed=1"])


def test_plan_cli_json_lists_jobs_and_dispatches_nothing(sweep_dirs: SweepDirs) -> None:
    result = tmgg_sweep("plan", "--json", "stage=smoke", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["count"] == 6 and len(plan["jobs"]) == 6
    row = plan["jobs"][0]
    assert {"job_id", "run_name", "wandb", "launcher"} <= set(row)
    assert not sweep_dirs.experiments.exists() and not sweep_dirs.outputs.exists()
    table = tmgg_sweep("plan", "stage=smoke", *sweep_dirs.overrides)
    assert table.returncode == 0 and "6 jobs" in table.stdout
    refused = tmgg_sweep("plan", "stage=smoke", "noise.levels=[1.5]", *sweep_dirs.overrides)
    assert refused.returncode == 2
    assert "noise.levels" in refused.stderr and "smoke_linear_pe" in refused.stderr


@pytest.mark.parametrize("module", ["tmgg.launch.cost", "tmgg.jobs.wandb_check"])
def test_plan_refuses_when_a_check_cannot_run(module: str, sweep_dirs: SweepDirs,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A destination or cost check that cannot be imported is not skipped silently."""
    import sys

    from tmgg.cli.commands import plan_main

    monkeypatch.setitem(sys.modules, module, None)  # what a broken import looks like
    assert plan_main(["stage=smoke", *sweep_dirs.overrides]) == 2
    err = capsys.readouterr().err
    assert f"plan refused: the plan check {module}." in err and "cannot run" in err


# -- the committed stage 1 keeps its identity ------------------------------------------
def test_stage1_job_ids_are_pinned_to_the_committed_records(stage1) -> None:
    """Every stage-1 job composed today is one of the 108 committed FINISHED records,
    under the same job id, W&B run id and output folder; a change of canonicalisation
    or of the composed config that orphaned them fails here, not silently."""
    ledger = Ledger(COMMITTED, "stage1")
    records = ledger.job_records()
    assert len(records) == 108 and {r["status"] for r in records.values()} == {FINISHED}
    assert {job.job_id for job in stage1.jobs} == set(records)
    planned = {event["job_id"] for event in ledger.events() if event["event"] == "planned"}
    assert planned == set(records)
    for job in stage1.jobs:
        record = records[job.job_id]
        assert record["run_name"] == job.run_name
        assert record["wandb"]["run_id"] == wandb_run_id(job.job_id)
        assert record["wandb"]["path"].endswith("/" + wandb_run_id(job.job_id))
        assert Path(record["output_dir"]).name == f"{job.run_name}-{job_suffix(job.job_id)}"
        assert identity_config(record["config"]) == identity_config(job.task_config)
        # Recorded before identity covered the config: the id of their override set.
        assert job.job_id == legacy_job_id("stage1", record["overrides"])
    # The config digest itself is pinned too: records made under config ids would be
    # orphaned by a change of it (stage1_linear_pe_lr1e-4_wd1e-2_k8_s1).
    first = records["stage1-f55cff9dda"]
    assert config_job_id("stage1", identity_config(first["config"])) == "stage1-f89055d663"


def test_resuming_stage1_runs_nothing(tmp_path: Path) -> None:
    """Every launcher's skip check and resume's to-run list find all 108 jobs finished.
    On a copy of the committed records: a skip check appends its ``skipped`` events, and
    committed ledgers are written by real sweeps only."""
    shutil.copytree(COMMITTED / "stage1", tmp_path / "stage1")
    stage1 = compose_sweep(["stage=stage1", f"experiments_dir={tmp_path}"])
    results, pending = split_finished(stage1.jobs)
    assert pending == [] and len(results) == 108
    skipped = [e for e in stage1.ledger.events() if e["event"] == "skipped"]
    assert len(skipped) == 108 and {e["reason"] for e in skipped} == {"finished already"}
    states = stage1.ledger.states()
    assert [job for job in stage1.jobs if states[job.job_id].status != FINISHED] == []
    assert not any(state.superseded_by for state in states.values())


def test_stage1_report_regenerates_byte_for_byte(stage1, tmp_path: Path) -> None:
    path = write_report(stage1, tmp_path)
    assert path.read_bytes() == (COMMITTED / "stage1" / REPORT_FILE).read_bytes()
