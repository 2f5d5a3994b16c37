"""Identity that cannot be talked round (issue 20).

``job.id`` and the other keys tmgg computes (run name, output folder) are refused when
a config sets them, naming the job and the field, before anything is recorded or run;
and a number is canonical by its declared type before it is hashed, so
``optimizer.weight_decay=0`` and ``=0.0`` are one job. The committed ids do not move.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train
from omegaconf import OmegaConf

from tmgg.config import CONF_DIR, identity
from tmgg.config.identity import (
    COMPUTED_KEYS,
    computed_key_problems,
    identity_config,
    legacy_job_id,
    wandb_run_id,
)
from tmgg.config.schema import canonical_numbers
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.plan import PlanError

# The issue's $C, one job.
C = ["stage=smoke", "seed=1", "model=linear_pe", "trainer.max_steps=20",
     "trainer.val_check_interval=10"]


def the_job(sweep_dirs: SweepDirs, *overrides: str):
    jobs = compose_sweep([*C, *sweep_dirs.overrides, *overrides]).jobs
    assert len(jobs) == 1
    return jobs[0]


def test_forging_the_id_of_another_job_is_refused_before_anything_is_recorded(
        sweep_dirs: SweepDirs) -> None:
    """The issue's repro: lr 0.5 under the id of the lr 1e-3 job would have made the
    lr 1e-3 job SKIPPED (finished) with the lr 0.5 job's metrics."""
    victim = the_job(sweep_dirs).job_id
    result = tmgg_train("-m", *C, *sweep_dirs.overrides, "optimizer.lr=0.5",
                        f"job.id={victim}", timeout=300)
    assert result.returncode != 0
    assert "job.id: is the job's identity" in result.stderr
    assert f"set to '{victim}'" in result.stderr and "optimizer.lr=0.5" in result.stderr
    assert not (sweep_dirs.experiments / "smoke").exists()  # no plan, no record, no claim
    assert not sweep_dirs.outputs.exists()  # nothing ran


def test_the_dry_run_and_a_single_run_refuse_it_too(sweep_dirs: SweepDirs) -> None:
    plan = tmgg_sweep("plan", *C, *sweep_dirs.overrides, "job.id=smoke-0123456789",
                      timeout=300)
    assert plan.returncode != 0 and "job.id: is the job's identity" in plan.stderr
    single = tmgg_train(*C, *sweep_dirs.overrides, "job.run_name=elsewhere", timeout=300)
    assert single.returncode != 0
    assert "run refused, nothing ran" in single.stderr
    assert "job.run_name: is computed from the stage's run-name template" in single.stderr
    assert not sweep_dirs.outputs.exists()


@pytest.mark.parametrize(("override", "field", "found"), [
    ("job.id=smoke-0123456789", "job.id", "set to 'smoke-0123456789'"),
    ("job.run_name=mine", "job.run_name", "set to 'mine'"),
    ("hydra.sweep.subdir=shared", "hydra.sweep.subdir", "set to 'shared'"),
    ("~job.id", "job.id", "removed"),
])
def test_each_computed_key_is_refused_by_name(sweep_dirs: SweepDirs, override: str,
                                              field: str, found: str) -> None:
    with pytest.raises(PlanError) as refused:
        the_job(sweep_dirs, override)
    message = str(refused.value)
    assert message.startswith("job #0 (") and f"): {field}: is " in message
    assert found in message


def test_a_config_file_that_sets_a_computed_key_is_refused_like_an_override() -> None:
    written = OmegaConf.create({"job": {"id": "smoke-0123456789",
                                        "run_name": COMPUTED_KEYS["job.run_name"][0]},
                                "hydra": {"sweep": {"subdir": "x"}}})
    assert [field for field, _ in computed_key_problems(written)] == [
        "job.id", "hydra.sweep.subdir"]


def test_conf_train_yaml_computes_the_keys_with_the_expressions_tmgg_expects() -> None:
    train = OmegaConf.load(CONF_DIR / "train.yaml")
    for key in ("job.id", "job.run_name", "hydra.sweep.subdir", "hydra.run.dir"):
        assert computed_key_problems(train, [key]) == [], key


def test_zero_and_zero_point_zero_are_one_job(sweep_dirs: SweepDirs) -> None:
    as_int = the_job(sweep_dirs, "optimizer.weight_decay=0")
    as_float = the_job(sweep_dirs, "optimizer.weight_decay=0.0")
    assert as_int.job_id == as_float.job_id
    assert wandb_run_id(as_int.job_id) == wandb_run_id(as_float.job_id)
    assert as_int.sweep_config.hydra.sweep.subdir == as_float.sweep_config.hydra.sweep.subdir
    assert legacy_job_id("smoke", as_int.overrides) == legacy_job_id("smoke", as_float.overrides)
    levels = the_job(sweep_dirs, "noise.levels=[0,0.1]")
    assert levels.job_id == the_job(sweep_dirs, "noise.levels=[0.0,0.1]").job_id
    assert the_job(sweep_dirs, "optimizer.weight_decay=1e-3").job_id != as_int.job_id


def test_one_sweep_listing_both_spellings_is_refused_as_one_job_twice(
        sweep_dirs: SweepDirs) -> None:
    with pytest.raises(PlanError, match="compose to the same task config"):
        compose_sweep([*C, *sweep_dirs.overrides, "optimizer.weight_decay=0,0.0"])


def test_integer_keys_keep_their_type_and_refuse_a_float(sweep_dirs: SweepDirs) -> None:
    assert canonical_numbers({"model": {"name": "linear_pe", "k": 8}, "seed": 1}) == {
        "model": {"name": "linear_pe", "k": 8}, "seed": 1}
    with pytest.raises(PlanError, match=r"model\.k: expected an integer"):
        the_job(sweep_dirs, "model.k=8.0")


def test_canonical_numbers_leave_every_committed_config_as_it_was() -> None:
    """So no committed id, W&B run id or output folder moves (the stage-1 pins are in
    test_plan.py): every number the committed records hash is already a float where the
    schema declares one."""
    records = sorted((REPO / "experiments").glob("*/jobs/*.json"))
    assert len(records) > 500
    for path in records:
        config = json.loads(path.read_text())["config"]
        hashed = identity._plain_tree(config, "")  # what identity_config hashed before
        assert json.dumps(identity_config(config)) == json.dumps(hashed), path
