"""SLURM / submitit workers log to W&B with the key the plan checked (issue 21, "The
key the workers use is the key that is checked"): a submitit job inherits the
launching shell's environment, so a launcher config or sbatch variable that gives the
workers another W&B key, entity, host or netrc (which cannot be checked before
dispatch) is refused at plan time, naming the job and the field."""

from __future__ import annotations

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train

WANDB_SLURM = ["stage=smoke", "seed=1", "model=linear_pe", "logger=wandb",
               "hydra/launcher=slurm"]


@pytest.mark.parametrize("setting, env, field, says", [
    (["hydra.launcher.setup=[module load cuda,'export WANDB_API_KEY=$(cat ~/team.key)']"],
     {}, "hydra.launcher.setup[1]", "changes the workers' WANDB_API_KEY"),
    (["hydra.launcher.setup=['wandb login --relogin $TEAM_KEY']"], {},
     "hydra.launcher.setup[0]", "changes the workers' wandb login"),
    (["hydra.launcher.setup=['export NETRC=/shared/team.netrc']"], {},
     "hydra.launcher.setup[0]", "changes the workers' NETRC"),
    (["+hydra.launcher.additional_parameters.export='ALL,WANDB_ENTITY=other-team'"], {},
     "hydra.launcher.additional_parameters.export",
     "--export=ALL,WANDB_ENTITY=other-team sets the workers' WANDB_ENTITY"),
    ([], {"SBATCH_EXPORT": "NONE"}, "SBATCH_EXPORT (this shell's sbatch variable)",
     "--export=NONE does not pass this shell's WANDB_API_KEY to the workers"),
], ids=["setup-key", "setup-login", "setup-netrc", "export-entity", "sbatch-export-none"])
def test_a_workers_key_the_plan_cannot_check_is_refused(
        sweep_dirs: SweepDirs, setting: list[str], env: dict[str, str], field: str,
        says: str) -> None:
    overrides = [*WANDB_SLURM, *setting, *sweep_dirs.overrides]
    plan = tmgg_sweep("plan", *overrides, env=env)
    assert plan.returncode != 0, plan.stdout[-2000:]
    assert field in plan.stderr and says in plan.stderr, plan.stderr[-3000:]
    assert "job smoke_linear_pe" in plan.stderr and "logs to W&B (logger.mode=auto)" \
        in plan.stderr
    # The launch refuses the same, before anything is recorded or submitted.
    launch = tmgg_train("-m", *overrides, env=env)
    assert launch.returncode != 0
    assert field in launch.stderr and says in launch.stderr, launch.stderr[-3000:]
    assert not (sweep_dirs.experiments / "smoke" / "ledger.jsonl").exists()


def test_workers_that_inherit_this_shells_key_or_log_offline_are_not_refused(
        sweep_dirs: SweepDirs) -> None:
    inherited = tmgg_sweep("plan", *WANDB_SLURM, "hydra.launcher.setup=['module load cuda']",
                           "+hydra.launcher.additional_parameters.export='ALL'",
                           *sweep_dirs.overrides)
    assert inherited.returncode == 0, inherited.stderr[-3000:]
    offline = tmgg_sweep("plan", *WANDB_SLURM, "logger.mode=offline",
                         "hydra.launcher.setup=['export WANDB_API_KEY=x']",
                         *sweep_dirs.overrides)
    assert offline.returncode == 0, offline.stderr[-3000:]
