"""Every bad value is refused before dispatch by tmgg itself, naming the job and field.

Hydra echoes the overrides whenever anything fails, so finding the field's name in
stderr proves nothing: these tests look for tmgg's own refusal
(``sweep refused, nothing dispatched: job <run name>: <field>: <problem>``) and check
that nothing was recorded, dispatched or trained.
"""

from __future__ import annotations

import typing

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train
from omegaconf import OmegaConf

from tmgg.config import CONF_DIR
from tmgg.config.schema import PRECISIONS, SCHEMA, Options, compositions_count
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.plan import PlanError

JOB = "adhoc_linear_pe_lr1e-3_wd1e-2_k8_s1"
ONE_JOB = ["model=linear_pe", "logger=csv"]

# (override, field, words of tmgg's problem text)
BAD_VALUES = [
    ("seed=-1", "seed", "from 0 to 4294967295"),
    ("seed=4294967296", "seed", "from 0 to 4294967295"),
    ("trainer.gradient_clip_val=abc", "trainer.gradient_clip_val", "expected a number >= 0"),
    ("trainer.precision=bogus", "trainer.precision", "unknown value 'bogus'"),
    ("trainer.devices=0", "trainer.devices", "expected a number of devices"),
    ("trainer.accelerator=tpu9", "trainer.accelerator", "unknown value 'tpu9'"),
    ("trainer.checkpoint=maybe", "trainer.checkpoint", "expected true or false"),
    ("trainer.num_threads=0", "trainer.num_threads", "integer >= 1"),
    ("logger=wandb logger.tags=foo", "logger.tags", "expected a list"),
    ("logger=wandb logger.tags=[ok,'']", "logger.tags", "1 to 64 characters"),
    ("logger=wandb logger.mode=loud", "logger.mode", "unknown value 'loud'"),
    ("experiments_dir=", "experiments_dir", "expected a directory path"),
    ("outputs_dir=", "outputs_dir", "expected a directory path"),
    ("stage.gpu_seconds_per_job=abc", "stage.gpu_seconds_per_job", "expected a positive number"),
    ("data.num_train_graphs=600", "data.num_train_graphs", "only 583 compositions"),
    ("data.min_blocks=5", "data.min_blocks", "exceeds data.max_blocks=4"),
    ("data=regular data.num_nodes=7", "data.degree", "do not exist"),
    ("data=sbm_single data.block_sizes=[10,10]", "data.block_sizes", "sums to 20"),
    ("model.max_nodes=10", "model.max_nodes", "smaller than data.num_nodes=20"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas", "item 1"),
    ("optimizer=sgd optimizer.momentum=0 optimizer.nesterov=true", "optimizer.nesterov",
     "needs optimizer.momentum > 0"),
    ("scheduler.warmup_fraction=0.9", "scheduler.warmup_fraction", "decay would end before"),
    ("noise.levels=[]", "noise.levels", "at least 1 items"),
    ("+model.dropout=0.1", "model.dropout", "unknown option"),
    ("+trainer.extra_dir=x", "trainer.extra_dir", "unknown option"),
    ("+optimizer.lrr=1", "optimizer.lrr", "unknown option"),
    ("+wandb_project=x", "wandb_project", "unknown option"),
    ("logger=wandb ~logger.entity", "logger.entity", "mandatory but missing"),
]


def _job_name(override: str) -> str:
    name = JOB
    if override.startswith("seed="):
        name = name.replace("_s1", f"_s{override.split('=')[1]}")
    if override.startswith("optimizer=sgd"):
        name = name.replace("lr1e-3_wd1e-2", "lr1e-2_wd0")
    return name


@pytest.mark.parametrize(("override", "field", "problem"), BAD_VALUES)
def test_bad_value_is_refused_at_plan_time(override: str, field: str, problem: str) -> None:
    with pytest.raises(PlanError) as refused:
        compose_sweep([*ONE_JOB, *override.split(" ")])
    message = str(refused.value)
    assert message.startswith(f"job {_job_name(override)}: {field}: "), message
    assert problem in message


# The values issue 11 lists, through the command a user types.
ISSUE_VALUES = [value for value in BAD_VALUES if value[0] in {
    "seed=-1", "trainer.gradient_clip_val=abc", "trainer.precision=bogus",
    "trainer.devices=0", "logger=wandb logger.tags=foo", "experiments_dir=",
    "stage.gpu_seconds_per_job=abc", "data.num_train_graphs=600"}]


@pytest.mark.parametrize(("override", "field", "problem"), ISSUE_VALUES)
def test_bad_value_stops_the_sweep_before_dispatch(sweep_dirs: SweepDirs, override: str,
                                                   field: str, problem: str) -> None:
    overrides = [o for o in sweep_dirs.overrides if not o.startswith(override.split("=")[0])]
    # The basic launcher: the refusal is the ledger callback's, the same for every
    # launcher, and the local launcher would first start its fork server (seconds).
    result = tmgg_train("-m", *ONE_JOB, "hydra/launcher=basic", *override.split(" "),
                        *overrides, cwd=sweep_dirs.root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"sweep refused, nothing dispatched: job {_job_name(override)}: {field}: "
            in result.stderr), result.stderr[-2000:]
    assert problem in result.stderr
    assert list(sweep_dirs.root.iterdir()) == []  # no ledger, no outputs: nothing ran


@pytest.mark.parametrize(("setting", "field", "problem"), [
    ("hydra.launcher.timeout_s=5", "hydra.launcher.timeout_s", "from 10 to 86400"),
    ("hydra.launcher.retries.max_retries=50", "hydra.launcher.retries.max_retries",
     "from 0 to 10"),
    ("hydra.launcher.cpu=-2", "hydra.launcher.cpu", ">= 0.125"),
    ("hydra.launcher.fuse=sometimes", "hydra.launcher.fuse", "not one of auto, off"),
])
def test_modal_settings_outside_modals_ranges_are_refused(sweep_dirs: SweepDirs, setting: str,
                                                          field: str, problem: str) -> None:
    result = tmgg_train("-m", *ONE_JOB, "hydra/launcher=modal", "hydra.launcher.transport=local",
                        setting, *sweep_dirs.overrides, cwd=sweep_dirs.root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"sweep refused, nothing dispatched: {field}: " in result.stderr
    assert problem in result.stderr
    assert list(sweep_dirs.root.iterdir()) == []


@pytest.mark.parametrize(("setting", "field"), [
    ("hydra.launcher.n_workers=0", "hydra.launcher.n_workers"),
    ("hydra.launcher.threads_per_worker=0", "hydra.launcher.threads_per_worker"),
    ("hydra.launcher.start_method=bogus", "hydra.launcher.start_method"),
    ("hydra.launcher.worker_crash_retries=-1", "hydra.launcher.worker_crash_retries"),
])
def test_local_launcher_settings_are_checked(sweep_dirs: SweepDirs, setting: str,
                                             field: str) -> None:
    result = tmgg_train("-m", *ONE_JOB, setting, *sweep_dirs.overrides, cwd=sweep_dirs.root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"sweep refused, nothing dispatched: {field}: " in result.stderr
    assert list(sweep_dirs.root.iterdir()) == []


def test_schema_declares_every_option_of_every_group() -> None:
    """A new option file in conf/<group>/ needs its entry in the schema (and back)."""
    groups = {group: node for group, node in SCHEMA.items() if isinstance(node, Options)}
    assert set(groups) == {"model", "optimizer", "scheduler", "data", "noise", "objective",
                           "logger"}
    for group, node in groups.items():
        files = sorted((CONF_DIR / group).glob("*.yaml"))
        assert {OmegaConf.load(path).name for path in files} == set(node.options), group
        assert {path.stem for path in files} == set(node.options), group


def test_composition_count_matches_the_data_generator() -> None:
    from tmgg.task.data import compositions

    for params in [(20, 2, 4, 2, 15), (10, 1, 3, 1, 10), (12, 3, 3, 4, 4), (7, 2, 2, 5, 9)]:
        assert compositions_count(*params) == len(compositions(*params)), params


def test_declared_precisions_are_lightnings() -> None:
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    accepted = {str(v) for kind in (_PRECISION_INPUT_INT, _PRECISION_INPUT_STR,
                                    _PRECISION_INPUT_STR_ALIAS) for v in typing.get_args(kind)}
    assert {str(p) for p in PRECISIONS} <= accepted


def test_output_dir_interpolation_is_kept_for_the_job() -> None:
    """Frozen at plan time it would be None; it must resolve where the job runs."""
    sweep = compose_sweep([*ONE_JOB, "+extra.dir=${hydra:runtime.output_dir}/x",
                           "+extra.copy=${extra.dir}", "+extra.plain=${stage.name}"])
    (job,) = sweep.jobs
    assert job.task_config["extra"] == {"dir": "${hydra:runtime.output_dir}/x",
                                        "copy": "${extra.dir}", "plain": "adhoc"}


def test_every_local_launcher_setting_has_a_rule() -> None:
    import dataclasses

    from hydra_plugins.tmgg_launchers.local_launcher import LocalLauncherConf
    from tmgg.launch.local_settings import RULES

    fields = {f.name for f in dataclasses.fields(LocalLauncherConf)} - {"_target_"}
    assert fields - set(RULES) == set()


@pytest.mark.parametrize("launcher", ["local", "basic"])
def test_output_dir_interpolation_resolves_per_job(sweep_dirs: SweepDirs, launcher: str) -> None:
    """As under Hydra's basic launcher: each job sees its own output directory."""
    result = tmgg_train("-m", "stage=smoke", "model=linear_pe", "logger=csv",
                        f"hydra/launcher={launcher}", "trainer.max_steps=4",
                        "trainer.val_check_interval=2", "+extra.dir=${hydra:runtime.output_dir}/x",
                        *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = sweep_dirs.job_records("smoke")
    assert len(records) == 2
    for record in records.values():
        assert record["status"] == "FINISHED"
        assert record["output_dir"].startswith(str(sweep_dirs.outputs))
        assert record["config"]["extra"]["dir"] == f"{record['output_dir']}/x"
    assert len({record["output_dir"] for record in records.values()}) == 2


@pytest.mark.parametrize(("launcher", "setting", "field"), [
    ("submitit_local_tmgg", "hydra.launcher.timeout_min=0", "hydra.launcher.timeout_min"),
    ("slurm", "hydra.launcher.mem_gb=0", "hydra.launcher.mem_gb"),
    ("slurm", "hydra.launcher.gpus_per_node=-1", "hydra.launcher.gpus_per_node"),
    ("submitit_local_tmgg", "hydra.launcher.fuse_max_members=0",
     "hydra.launcher.fuse_max_members"),
    ("slurm", "hydra.launcher.fuse=sometimes", "hydra.launcher.fuse"),
])
def test_slurm_resources_sbatch_would_reject_are_refused(
        sweep_dirs: SweepDirs, launcher: str, setting: str, field: str) -> None:
    plan = tmgg_sweep("plan", *ONE_JOB, f"hydra/launcher={launcher}", setting,
                      *sweep_dirs.overrides)
    assert plan.returncode == 2 and f"plan refused: {field}: " in plan.stderr, plan.stderr
    if launcher == "submitit_local_tmgg":  # runnable here: refused before the plan is recorded
        run = tmgg_train("-m", *ONE_JOB, f"hydra/launcher={launcher}", setting,
                         *sweep_dirs.overrides, cwd=sweep_dirs.root)
        assert run.returncode == 2
        assert f"sweep refused, nothing dispatched: {field}: " in run.stderr, run.stderr[-2000:]
        assert list(sweep_dirs.root.iterdir()) == []
