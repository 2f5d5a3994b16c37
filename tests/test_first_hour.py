"""The first hour of a new user (issue 22): the silent footguns are refused with the
command to type, Ctrl-C ends a sweep cleanly, the terminal stays readable, and a
single run ends by saying what it scored and where its files are."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train
from holds import hold_env, wait_for_holds

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_samples=20",
        "data.test_samples=20"]


# -- no silent footguns ------------------------------------------------------------------


def test_a_stage_with_a_grid_run_without_m_is_refused_with_the_m_command(
        sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("stage=smoke", "logger=csv", *sweep_dirs.overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run refused, nothing ran: stage smoke is a sweep of 6 jobs (it sweeps model, " \
           "seed)" in result.stderr
    assert "Run the sweep: tmgg-train -m stage=smoke logger=csv " in result.stderr
    assert list(sweep_dirs.root.iterdir()) == []  # nothing trained, nothing recorded


def test_one_point_of_a_grid_named_in_full_still_runs_alone(sweep_dirs: SweepDirs) -> None:
    """Every swept key given: that is one of the grid's own jobs, so it may run alone;
    it ends with its test metrics and its output directory."""
    result = tmgg_train("stage=smoke", "model=linear_pe", "seed=1", "logger=csv", *TINY,
                        *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-4:]
    assert last[0].startswith("smoke_linear_pe_lr1e-3_wd1e-2_k8_s1 tested: test/mse 0.")
    assert "test/loss" in last[0] and "test/f1" in last[0]
    assert last[1].startswith("  reference no_edges: test/mse 0.")
    assert last[2].startswith("  reference noisy_input: test/mse 0.")
    output_dir = Path(last[3].removeprefix("output: "))
    assert last[3].startswith("output: ") and output_dir.is_absolute()
    assert output_dir.parent == sweep_dirs.outputs / "smoke"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert f"test/mse {metrics['test/mse']:.4f}" in last[0]


def test_another_directory_is_refused_before_a_second_ledger_starts(tmp_path: Path) -> None:
    """conf/ comes from the checkout; relative experiments/ and outputs/ would come from
    the shell's directory: a sweep there would retrain every job into a new ledger."""
    sweep = tmgg_train("-m", "stage=smoke", "logger=csv", "hydra/launcher=basic",
                       cwd=tmp_path)
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    line = [text for text in sweep.stderr.splitlines() if "refused" in text]
    assert line == [f"sweep refused, nothing dispatched: experiments_dir=experiments is "
                    f"relative, and this shell is in {tmp_path.resolve()}, not in the checkout "
                    f"{REPO} whose conf/ tmgg uses: its records would go to "
                    f"{tmp_path.resolve() / 'experiments'}, apart from {REPO / 'experiments'}. "
                    f"Run it from the checkout (cd {REPO}), or give absolute experiments_dir= "
                    "and outputs_dir="]
    status = tmgg_sweep("status", "stage=smoke", cwd=tmp_path)
    assert status.returncode == 2
    assert "tmgg-sweep status refused: experiments_dir=experiments is relative" in status.stderr
    assert "no jobs recorded" not in status.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_plan_line_names_the_ledger_by_its_absolute_path(sweep_dirs: SweepDirs) -> None:
    plan = tmgg_sweep("plan", "stage=smoke", "logger=csv", *sweep_dirs.overrides)
    assert plan.returncode == 0, plan.stderr[-2000:]
    ledger = sweep_dirs.experiments / "smoke"
    assert f"nothing dispatched; ledger {ledger}" in " ".join(plan.stdout.split())


@pytest.mark.parametrize("command", ["resume", "status", "reconcile", "report", "sync"])
def test_stage_commands_without_a_stage_are_refused(command: str, sweep_dirs: SweepDirs) -> None:
    result = tmgg_sweep(command, *sweep_dirs.overrides)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"tmgg-sweep {command}: name the stage it acts on, e.g. "
        f"`tmgg-sweep {command} stage=smoke` (stages: adhoc, bench, smoke, stage1,")
    assert list(sweep_dirs.root.iterdir()) == []  # nothing acted on adhoc


def test_an_unwritable_experiments_dir_is_refused_in_one_line_before_planning(
        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = tmgg_train("-m", "stage=smoke", "logger=csv", f"experiments_dir={blocker}/exp",
                        f"outputs_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"sweep refused, nothing dispatched: experiments_dir={blocker}/exp cannot be "
        f"written: {blocker} is not a directory")
    assert "Launching" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_an_unwritable_outputs_dir_is_refused_for_a_single_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = tmgg_train("model=linear_pe", "logger=csv", f"experiments_dir={tmp_path / 'e'}",
                        f"outputs_dir={blocker}/out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"run refused, nothing ran: outputs_dir={blocker}/out cannot be written: "
        f"{blocker} is not a directory")


@pytest.mark.parametrize("typed", ["launcher=modal", "+launcher=modal"])
def test_launcher_override_names_hydra_launcher(typed: str) -> None:
    train = tmgg_train("-m", "stage=smoke", typed)
    plan = tmgg_sweep("plan", "stage=smoke", typed)
    for result, program in ((train, "tmgg-train"), (plan, "tmgg-sweep plan")):
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"{program}: {typed!r} is not an override tmgg knows: the launcher is Hydra's "
            "config group, so write hydra/launcher=modal (local, modal, slurm or "
            "submitit_local_tmgg)")


def test_a_missing_entity_suggests_the_team_or_csv(sweep_dirs: SweepDirs) -> None:
    result = tmgg_sweep("plan", "stage=smoke", "~logger.entity", *sweep_dirs.overrides)
    assert result.returncode == 2
    assert ("logger.entity: is mandatory but missing from the config; name the W&B team "
            "with logger.entity=<team>, or log without W&B: logger=csv") in result.stderr


# -- a console a person can read ---------------------------------------------------------


def _quiet_free_env() -> dict[str, str]:
    """The tests' environment without WANDB_SILENT: wandb prints as it would for a user."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}


def test_a_smoke_sweep_prints_a_line_per_job_and_wandb_goes_to_each_jobs_log(
        sweep_dirs: SweepDirs) -> None:
    env = _quiet_free_env()
    result = subprocess.run([sys.executable, "-m", "tmgg.cli.app", "-m", "stage=smoke", *TINY,
                             *sweep_dirs.overrides], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) <= 12, "\n".join(lines)
    # Branch wandb's notice that auto logs offline (WANDB_MODE=offline here): said once,
    # loudly, naming the W&B host (api.wandb.ai); nothing else of wandb's on the console.
    offline = [line for line in lines if "W&B OFFLINE" in line]
    assert len(offline) == 1 and offline[0].startswith("*** W&B OFFLINE: "), offline
    assert not [line for line in lines if line not in offline
                and ("wandb" in line or "GPU available" in line)]
    ended = [line for line in lines if line.startswith("FINISHED ")]
    assert len(ended) == 6 and all("test/mse=0." in line for line in ended)
    assert lines[-1] == ("6 finished, 0 skipped (already finished), 0 left to the sweep "
                         "that holds them, 0 failed")
    for record in sweep_dirs.job_records("smoke").values():
        log = (Path(record["output_dir"]) / "console.log").read_text()
        assert f"wandb: Run data is saved locally in {record['output_dir']}/wandb/" in log
        assert "GPU available: False" in log  # Lightning's too


def test_ctrl_c_stops_the_sweep_cleanly_with_the_resume_command(sweep_dirs: SweepDirs) -> None:
    overrides = ["stage=smoke", "logger=csv", "trainer.max_steps=5000",
                 "trainer.val_check_interval=1000", *sweep_dirs.overrides]
    # Training holds at step 2 (tmgg.task.hold; never released): Ctrl-C comes while a
    # job trains, past its first steps, whatever the machine's speed.
    release = sweep_dirs.root / "release"
    process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=hold_env(2, release),
                               start_new_session=True)  # its own group, as a terminal's job
    try:
        wait_for_holds(release, 1, process)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    resume = " ".join(o for o in overrides if o != "stage=smoke")
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: 0 finished, 6 not finished → tmgg-sweep resume stage=smoke {resume}")
    records = sweep_dirs.job_records("smoke")
    interrupted = [r for r in records.values() if r["status"] == "FAILED"]
    assert interrupted and all("Interrupted: the sweep was stopped (Ctrl-C)" in r["error"]
                               for r in interrupted)
    assert not [r for r in records.values() if r["status"] == "RUNNING"]


def test_status_counts_the_current_grid_and_other_records_apart(sweep_dirs: SweepDirs) -> None:
    """Two jobs ran (model=linear_pe, seeds 1 and 2); the grid asked about is seed 1's
    three models: one of them finished, two missing, and seed 2's job counted apart."""
    ran = tmgg_train("-m", "stage=smoke", "model=linear_pe", "logger=csv", *TINY,
                     *sweep_dirs.overrides)
    assert ran.returncode == 0, ran.stderr[-3000:]
    narrow = ["stage=smoke", "seed=1", "logger=csv", *TINY, *sweep_dirs.overrides]
    columns = {"COLUMNS": "80"}
    summary = tmgg_sweep("status", "--summary", *narrow, env=columns)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert summary.stdout.splitlines() == [
        "stage smoke, its grid of 3 jobs: 1 finished, 2 missing",
        "other records, not in this grid (other overrides or settings): 1 finished"]
    facts = json.loads(tmgg_sweep("status", "--json", *narrow).stdout)
    assert facts["grid"] == {"jobs": 3, "counts": {"FINISHED": 1, "MISSING": 2}}
    assert facts["other_records"] == {"FINISHED": 1}
    table = tmgg_sweep("status", *narrow, env=columns)
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("smoke_linear_pe_lr1e-3_wd1e-2_k8_s1", "smoke_filter_bank_lr1e-3_wd1e-2_k8_s1",
                 "smoke_self_attention_lr1e-3_wd1e-2_k8_s1",
                 "smoke_linear_pe_lr1e-3_wd1e-2_k8_s2"):
        (row,) = [line for line in lines if f" {name} " in line]  # whole, on one line
        assert ("not in" in row) == name.endswith("_s2")  # its note (folded)

    watch = subprocess.Popen([sys.executable, "-m", "tmgg.cli.tmgg_sweep", "status",
                              "--watch", "0.5", "--summary", *narrow], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watch.stdout is not None
    first = [watch.stdout.readline() for _ in range(3)]  # the first view, then Ctrl-C
    watch.send_signal(signal.SIGINT)
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0 and "Traceback" not in stderr
    assert first[0] == "stage smoke, its grid of 3 jobs: 1 finished, 2 missing\n"
    assert "every 0.5 s; Ctrl-C ends" in "".join(first)


def test_reconcile_rows_fit_80_columns(sweep_dirs: SweepDirs) -> None:
    ran = tmgg_train("-m", "stage=smoke", "model=linear_pe", "seed=1", *TINY,
                     *sweep_dirs.overrides)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = tmgg_sweep("reconcile", "stage=smoke", "model=linear_pe", "seed=1", *TINY,
                        *sweep_dirs.overrides, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    (row,) = [i for i, line in enumerate(lines) if " smoke_linear_pe_lr1e-3_wd1e-2_k8_s1 " in line]
    assert " ok " in lines[row] and "FINISHED" in lines[row]
    continued = [line for line in lines[row + 1:] if line.startswith(" " * 40)]
    assert len(continued) <= 2  # a row takes at most three lines, never seven


def test_the_live_line_counts_jobs_steps_and_an_eta() -> None:
    """The launcher's live line, read from the workers' shared step counter: steps of
    every job (fused members each count) against the pending jobs' budgets."""
    import multiprocessing

    from hydra.core.utils import JobReturn, JobStatus

    from tmgg.jobs.plan import PlannedJob
    from tmgg.launch.sweep_console import SweepConsole

    jobs = [PlannedJob(index=i, job_id=f"smoke-{i}", run_name=f"smoke_{i}", stage="smoke",
                       overrides=[], sweep_config=None,
                       task_config={"trainer": {"max_steps": 100}}) for i in range(4)]
    steps = multiprocessing.get_context("spawn").Value("q", 0)
    display = SweepConsole(jobs, pending=[1, 2, 3], steps=steps, enabled=False)
    display.started -= 30.0  # as if the sweep had run for 30 s
    display.started_task([1, 2])
    steps.value = 100  # a third of the pending jobs' 300 steps
    done = JobReturn(overrides=[], status=JobStatus.COMPLETED)
    done.return_value = {"test/mse": 0.3}
    display.ended(1, done)
    line = display.totals()
    assert line.startswith("jobs 2/4 finished, 1 running, 0 failed · steps 100/300 · 0:00:3")
    assert re.search(r"ETA 0:01:0[0-2]$", line)  # 100 steps in 30 s, 200 to go
    stage_line = display.interrupted_line("smoke", ["stage=smoke", "logger=csv"])
    assert stage_line == ("interrupted: 2 finished, 2 not finished → tmgg-sweep resume "
                          "stage=smoke logger=csv")
