"""Hydra turns an exception raised in a callback into a warning and launches anyway:
tmgg's callbacks stop the sweep instead, with tmgg's own message, whatever the
exception (issue 20, "Hydra's swallowed exceptions")."""

from __future__ import annotations

import pytest
from conftest import REPO, SweepDirs, run_cli

from tmgg.jobs.plan import PlanError


def test_a_crash_in_the_launchers_check_before_the_plan_stops_the_sweep(
        sweep_dirs: SweepDirs) -> None:
    result = run_cli([str(REPO / "tests/apps/broken_launcher_check.py"), "-m", "stage=smoke",
                      "logger=csv", "hydra/launcher=local", *sweep_dirs.overrides])
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("sweep refused, nothing dispatched (the launcher's checks before the plan "
            "failed: OSError): injected: the launcher's check crashed") in result.stderr
    # Stopped before the plan: nothing was recorded, let alone dispatched.
    assert not (sweep_dirs.experiments / "smoke" / "ledger.jsonl").exists()
    assert not list(sweep_dirs.outputs.glob("smoke/*/metrics.json"))


@pytest.mark.parametrize("error, message", [
    (PlanError("job smoke-1: trainer.max_steps must be positive"),
     "sweep refused, nothing dispatched: job smoke-1: trainer.max_steps must be positive"),
    (KeyError("stage"),
     "sweep refused, nothing dispatched (recording the plan: KeyError): 'stage'"),
])
def test_refusing_turns_any_exception_into_a_refusal_with_its_message(
        error: Exception, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tmgg.jobs.hydra_callbacks import refusing

    with pytest.raises(SystemExit) as stopped, refusing(step="recording the plan"):
        raise error
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_refusing_lets_a_step_that_succeeds_go_on() -> None:
    from tmgg.jobs.hydra_callbacks import refusing

    with refusing(step="recording the plan"):
        done = True
    assert done
