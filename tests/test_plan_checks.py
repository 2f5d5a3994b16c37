"""The dry run refuses what the launch refuses (issue 20).

``tmgg-sweep plan`` runs the configured launcher's own refusals (``LauncherHooks.check``:
every one that needs no credentials and no network), so a setting that ``tmgg-train -m``
refuses is refused by the plan with the same field, and a plan that passes is not
refused by the launch for its settings. Both commands run as a user runs them.
"""

from __future__ import annotations

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train

ONE_JOB = ["stage=smoke", "seed=1", "model=linear_pe", "trainer.max_steps=20",
           "trainer.val_check_interval=10"]
MODAL = ["hydra/launcher=modal"]


@pytest.mark.parametrize(("setting", "field"), [
    ("hydra.launcher.timeout_s=5", "hydra.launcher.timeout_s"),
    ("hydra.launcher.retries.max_retries=50", "hydra.launcher.retries.max_retries"),
    ("hydra.launcher.cpu=-2", "hydra.launcher.cpu"),
    ("hydra.launcher.memory_mb=0", "hydra.launcher.memory_mb"),
    ("hydra.launcher.max_containers=0", "hydra.launcher.max_containers"),
])
def test_the_plan_refuses_the_modal_settings_the_launch_refuses(
        sweep_dirs: SweepDirs, setting: str, field: str) -> None:
    overrides = [*ONE_JOB, *sweep_dirs.overrides, *MODAL, setting]
    plan = tmgg_sweep("plan", *overrides, timeout=300)
    assert plan.returncode == 2, plan.stdout
    assert f"plan refused: {field}:" in plan.stderr
    assert "nothing dispatched" not in plan.stdout
    launch = tmgg_train("-m", *overrides, timeout=300)
    assert launch.returncode != 0
    assert f"{field}:" in launch.stderr  # the same refusal, by the launch
    assert not (sweep_dirs.experiments / "smoke").exists()  # neither recorded a plan


def test_the_local_launchers_settings_are_refused_by_the_plan_too(
        sweep_dirs: SweepDirs) -> None:
    overrides = [*ONE_JOB, *sweep_dirs.overrides, "hydra.launcher.n_workers=0"]
    plan = tmgg_sweep("plan", *overrides, timeout=300)
    assert plan.returncode == 2 and "plan refused: hydra.launcher.n_workers:" in plan.stderr
    launch = tmgg_train("-m", *overrides, timeout=300)
    assert launch.returncode != 0 and "hydra.launcher.n_workers:" in launch.stderr


def test_good_modal_settings_plan_without_credentials(sweep_dirs: SweepDirs) -> None:
    """The dry run makes no network call and needs no Modal token (the launch does)."""
    plan = tmgg_sweep("plan", *ONE_JOB, *sweep_dirs.overrides, *MODAL,
                      "hydra.launcher.timeout_s=600", "hydra.launcher.max_containers=4",
                      timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "1 jobs" in plan.stdout and "nothing dispatched" in plan.stdout
