"""A job is what it computes: ids from the composed config, superseded records, migration.

The stage-1 pins (ids of the committed records, its report, resume running nothing)
are in test_plan.py, beside the composed stage-1 fixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tmgg_sweep, tmgg_train
from omegaconf import OmegaConf

from tmgg.cli.commands import status_main
from tmgg.cli.reconcile import main as reconcile_main
from tmgg.cli.reconcile import reconcile_jobs
from tmgg.cli.reporting.precision import interval
from tmgg.cli.reporting.report import REPORT_FILE
from tmgg.cli.reporting.report import main as report_main
from tmgg.config.identity import (
    config_job_id,
    identity_config,
    job_id_for,
    job_suffix,
    legacy_job_id,
    wandb_run_id,
)
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.ledger import FAILED, FINISHED, JobState, Ledger
from tmgg.jobs.plan import PlanError

TASK = {
    "model": {"name": "linear_pe", "k": 8},
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01},
    "trainer": {"max_steps": 60, "num_threads": None, "resume": True},
    "logger": {"name": "wandb", "entity": "e", "project": "p", "group": "s", "mode": "auto"},
    "stage": {"name": "s", "run_name": "s_linear_pe", "gpu_seconds_per_job": 5},
    "seed": 1,
    "experiments_dir": "experiments",
    "outputs_dir": "outputs",
    "job": {"id": "s-0", "run_name": "s_linear_pe"},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    config = json.loads(json.dumps(TASK))
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


def _id(config: dict[str, Any]) -> str:
    return config_job_id("s", identity_config(config))


def test_config_identity_is_canonical_and_ignores_where_and_how() -> None:
    base = _id(TASK)
    reordered = {key: TASK[key] for key in reversed(list(TASK))}
    assert _id(reordered) == base
    composed = OmegaConf.create(
        "optimizer: {lr: 1e-3, weight_decay: 1e-2, name: adamw}\n"
        "model: {k: 8, name: linear_pe}\n")
    assert identity_config(composed) == {key: TASK[key] for key in ("optimizer", "model")}
    for path, value in [("experiments_dir", "/x"), ("outputs_dir", "/y"),
                        ("logger.mode", "offline"), ("trainer.num_threads", 2),
                        ("trainer.resume", False), ("stage.run_name", "other"),
                        ("stage.gpu_seconds_per_job", 99), ("job.id", "x")]:
        assert _id(_with(path, value)) == base, path
    for path, value in [("trainer.max_steps", 5000), ("optimizer.lr", 0.002),
                        ("logger.name", "csv"), ("logger.project", "q"), ("seed", 2),
                        ("model.k", 16)]:
        assert _id(_with(path, value)) != base, path


def test_a_task_key_that_interpolates_the_job_id_does_not_recurse(tmp_path: Path) -> None:
    config = OmegaConf.create({
        **{k: v for k, v in TASK.items() if k not in ("job", "logger")},
        "experiments_dir": str(tmp_path),
        "logger": {"name": "wandb", "group": "${job.id}_g"},
        "job": {"id": "${tmgg.job_id:${stage.name}}"},
    })
    job_id = config.job.id
    assert job_id.startswith("s-") and config.logger.group == f"{job_id}_g"
    assert job_id == job_id_for(config, "s")


def test_hydra_runtime_values_count_as_written_not_as_resolved() -> None:
    """``${hydra:runtime.output_dir}`` is where a job runs, and it resolves differently
    in the plan and in the job's process: the id must not depend on it."""
    config = OmegaConf.create({**TASK, "trainer": {**TASK["trainer"],
                                                   "log_dir": "${hydra:runtime.output_dir}"}})
    identity = identity_config(config)  # not resolved: HydraConfig holds another job now
    assert identity["trainer"]["log_dir"] == "${hydra:runtime.output_dir}"
    assert identity["optimizer"] == TASK["optimizer"]


def test_two_spellings_of_one_config_are_one_job_and_refused_as_a_duplicate() -> None:
    with pytest.raises(PlanError, match="compose to the same task config"):
        compose_sweep(["stage=smoke", "model=linear_pe", "seed=1", "optimizer.lr=1e-3,0.001"])


@dataclass
class _Run:
    """A W&B run as reconcile reads it from ``wandb.Api().runs``."""

    id: str
    name: str
    entity: str = "graph_denoise_team"
    project: str = "spectral_denoising"
    group: str = "smoke"
    state: str = "finished"


@dataclass(frozen=True)
class _Viewer:
    """``wandb.Api().viewer``: the key's user (reconcile fails closed without one)."""

    entity: str = "alice"
    username: str = "alice"
    teams: tuple[str, ...] = ("graph_denoise_team",)


class _Runs:
    """The runs of one project, as the API lists them (filters aside), and the key's
    user, whom reconcile asks first (it searches that user's entities too)."""

    def __init__(self, runs: list[_Run], viewer: _Viewer | None = None) -> None:
        self._runs = runs
        self.viewer = viewer or _Viewer()

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[_Run]:
        return [run for run in self._runs if f"{run.entity}/{run.project}" == path]


def test_reconcile_does_not_count_a_superseded_jobs_run_as_a_duplicate(
        tmp_path: Path) -> None:
    """The earlier config's run has the same name and group as the current job's."""
    (job,) = compose_sweep(["stage=smoke", "model=linear_pe", "seed=1",
                            f"experiments_dir={tmp_path}"]).jobs
    old = JobState(job_id="smoke-0123456789", run_name=job.run_name, status=FINISHED,
                   overrides=list(job.overrides),
                   record={"wandb": {"run_id": wandb_run_id("smoke-0123456789")}})
    current = JobState(job_id=job.job_id, run_name=job.run_name, status=FINISHED)
    api = _Runs([_Run(wandb_run_id(old.job_id), job.run_name),
                 _Run(wandb_run_id(job.job_id), job.run_name)])
    (row,) = reconcile_jobs([job], {old.job_id: old, job.job_id: current}, "smoke",
                            mode="online", api=api)
    assert (row.status, row.run_ids) == ("ok", [wandb_run_id(job.job_id)])


def _compose_one(*overrides: str) -> Any:
    (job,) = compose_sweep(["stage=smoke", "model=linear_pe", "seed=1", "logger=csv",
                            *overrides]).jobs
    return job


def test_a_record_of_the_override_identity_counts_while_its_config_is_current(
        tmp_path: Path) -> None:
    """Migration: a record made under the legacy (override-set) id keeps that id, and
    so its output folder and W&B run id, while its recorded config is the job's."""
    where = f"experiments_dir={tmp_path}"
    job = _compose_one(where)
    legacy = legacy_job_id("smoke", job.overrides)
    assert job.job_id == config_job_id("smoke", identity_config(job.task_config)) != legacy

    ledger = Ledger(tmp_path, "smoke")
    config = {**job.task_config, "job": {**job.task_config["job"], "id": legacy}}
    ledger.write_job_record(legacy, {"job_id": legacy, "status": FAILED, "config": config,
                                     "overrides": job.overrides})
    migrated = _compose_one(where)
    assert migrated.job_id == legacy
    assert OmegaConf.select(migrated.sweep_config, "hydra.sweep.subdir") == (
        f"{migrated.run_name}-{job_suffix(legacy)}")

    # A record of another config under that id is the earlier job, not this one.
    config["trainer"] = {**config["trainer"], "max_steps": 59}
    ledger.write_job_record(legacy, {"job_id": legacy, "status": FINISHED, "config": config,
                                     "overrides": job.overrides})
    assert _compose_one(where).job_id == job.job_id


# -- acceptance: edit a stage, see the plan supersede, the re-run, the report ---------
STAGE = """# @package _global_
stage:
  name: edited
  run_name: ${{stage.name}}_${{model.name}}_lr${{tmgg.short:${{optimizer.lr}}}}_s${{seed}}
  gpu_seconds_per_job: 5
logger:
  group: ${{stage.name}}
trainer:
  max_steps: {max_steps}
  val_check_interval: 2
data:
  val_samples: 50
  test_samples: 50
hydra:
  sweeper:
    params:
      model: linear_pe
      seed: 1,2
"""


def _write_stage(conf: Path, max_steps: int) -> None:
    (conf / "stage").mkdir(parents=True, exist_ok=True)
    (conf / "stage" / "edited.yaml").write_text(STAGE.format(max_steps=max_steps))


def _ids(records: dict[str, dict[str, Any]]) -> set[str]:
    return set(records)


@pytest.mark.slow
def test_editing_a_stage_supersedes_its_finished_jobs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf, experiments = tmp_path / "conf", tmp_path / "exp"
    args = ["stage=edited", f"hydra.searchpath=[file://{conf}]", "logger=csv",
            f"experiments_dir={experiments}", f"outputs_dir={tmp_path / 'out'}"]
    ledger = Ledger(experiments, "edited")
    _write_stage(conf, max_steps=4)
    first = tmgg_train("-m", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    old = ledger.job_records()
    assert len(old) == 2 and {r["status"] for r in old.values()} == {FINISHED}

    # The edit: same grid, another trainer budget.
    _write_stage(conf, max_steps=6)
    plan = tmgg_sweep("plan", "--json", *args, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    facts = json.loads(plan.stdout)
    new_ids = {job["job_id"] for job in facts["jobs"]}
    assert len(new_ids) == 2 and not new_ids & _ids(old)
    assert facts["superseded_finished"] == 2
    assert {s["job_id"] for s in facts["superseded"]} == _ids(old)
    table = tmgg_sweep("plan", *args, cwd=tmp_path)
    assert "this plan supersedes 2 finished jobs" in table.stdout, table.stdout[-3000:]
    assert ledger.job_records() == old  # planning wrote nothing

    # The re-run trains them (Hydra's basic launcher: the id is resolved in the job).
    second = tmgg_train("-m", *args, "hydra/launcher=basic", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "this plan supersedes 2 finished jobs" in second.stdout + second.stderr
    records = ledger.job_records()
    assert {job_id: records[job_id] for job_id in old} == old  # the old records stay
    new = {job_id: records[job_id] for job_id in new_ids}
    for record in new.values():
        assert record["status"] == FINISHED
        assert record["config"]["trainer"]["max_steps"] == 6
        assert record["metrics"]["global_step"] == 6
        assert record["output_dir"] not in {r["output_dir"] for r in old.values()}
        assert record["output_dir"].endswith(job_suffix(record["job_id"]))
    states = ledger.states()
    assert sorted(states[job_id].superseded_by for job_id in old) == sorted(new)
    by_run_name = {r["run_name"]: job_id for job_id, r in new.items()}
    for job_id, record in old.items():
        assert states[job_id].superseded_by == by_run_name[record["run_name"]]

    # status counts the current jobs; the superseded ones are listed apart.
    capsys.readouterr()
    assert status_main(["--json", "--no-poll", *args]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {FINISHED: 2} and status["superseded"] == 2
    assert {row["job_id"] for row in status["jobs"] if row["status"] == "SUPERSEDED"} == (
        _ids(old))

    # reconcile expects the current jobs only.
    assert reconcile_main(["--offline", *args]) == 0
    assert "2 expected jobs" in capsys.readouterr().out

    # The report shows the new results only, each with the config it ran.
    assert report_main([*args, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / REPORT_FILE).read_text()
    assert "| finished | 2 |" in text and "| **expected** | **2** |" in text
    assert "## Superseded records of earlier configs (not in the table) (2)" in text
    mse = sorted(r["metrics"]["test/mse"] for r in new.values())
    cell = interval(mse)  # the new records' mean and 95 % interval, nothing of the old
    assert cell is not None and cell.n == 2
    assert f"| 2/2 | {cell.text()} |" in text
    # From the records alone, too.
    assert report_main(["--ledger", str(experiments / "edited"),
                        "--out", str(tmp_path / "from_ledger")]) == 0
    alone = (tmp_path / "from_ledger" / REPORT_FILE).read_text()
    assert "| **expected** | **2** |" in alone and cell.text() in alone


@pytest.mark.slow
def test_a_failed_legacy_job_reruns_under_its_id_in_the_job_process(tmp_path: Path) -> None:
    """Hydra's basic launcher composes the job in its own process: it finds the same
    legacy id there, so the rerun writes the record, folder and W&B run of that id."""
    args = ["stage=smoke", "model=linear_pe", "seed=1", "logger=csv", "trainer.max_steps=2",
            "trainer.val_check_interval=1", f"experiments_dir={tmp_path / 'exp'}",
            f"outputs_dir={tmp_path / 'out'}"]
    job = _compose_one(*args[3:])
    legacy = legacy_job_id("smoke", job.overrides)
    config = {**job.task_config, "job": {**job.task_config["job"], "id": legacy}}
    ledger = Ledger(tmp_path / "exp", "smoke")
    ledger.write_job_record(legacy, {"job_id": legacy, "run_name": job.run_name,
                                     "status": FAILED, "config": config,
                                     "overrides": job.overrides, "attempts": 1})
    result = tmgg_train("-m", *args, "hydra/launcher=basic", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = ledger.job_records()
    assert set(records) == {legacy}
    record = records[legacy]
    assert record["status"] == FINISHED and record["attempts"] == 2
    assert record["output_dir"] == str(
        tmp_path / "out" / "smoke" / f"{job.run_name}-{job_suffix(legacy)}")
