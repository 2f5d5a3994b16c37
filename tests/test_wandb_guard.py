"""The pinned W&B destination: plan-time check, environment pinning, in-job guard.

W&B runs are real offline runs (WANDB_MODE=offline) in subprocesses, read back from
wandb's own transaction logs; jobs are the smoke stage narrowed to model=linear_pe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tmgg.cli.reconcile import read_run_file, run_files
from tmgg.config.identity import wandb_run_id
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.plan import PlanError
from tmgg.jobs.wandb_check import check_wandb_destinations, expected_destination

PINNED = ("graph_denoise_team", "spectral_denoising")
TINY = ["stage=smoke", "model=linear_pe", "trainer.max_steps=4", "trainer.val_check_interval=2"]

# A job process whose logger or training can be altered for a test, then the real app.
JOB_SCRIPT = textwrap.dedent("""
    import os

    from lightning.pytorch.callbacks import Callback

    import tmgg.task.loggers as loggers
    import tmgg.task.train as train


    class Probe(Callback):
        # Records every training step that starts; raises at TEST_CRASH_AT (a crash).
        def on_train_batch_start(self, trainer, *args):
            if os.environ.get("TEST_STEPS_FILE"):
                with open(os.environ["TEST_STEPS_FILE"], "a") as handle:
                    handle.write(f"{trainer.global_step}\\n")
            if trainer.global_step == int(os.environ.get("TEST_CRASH_AT", "-1")):
                raise RuntimeError("simulated crash")


    if os.environ.get("TEST_MISROUTE"):
        from lightning.pytorch.loggers import WandbLogger

        def misrouted_logger(cfg, output_dir):
            # What the incident's missing injection built: no entity, no project.
            return WandbLogger(name=str(cfg.job.run_name), save_dir=str(output_dir),
                               mode="offline")

        loggers.build_logger = misrouted_logger

    original = train.run_training
    train.run_training = lambda cfg, extra_callbacks=None: original(cfg, [Probe()])

    from tmgg.cli.app import main

    main()
""")


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "MODAL_TOKEN", "TEST_"))}
    env.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"), TMGG_NUM_THREADS="1")
    env.update(extra)
    return env


def dirs(tmp_path: Path) -> list[str]:
    return [f"experiments_dir={tmp_path / 'exp'}", f"outputs_dir={tmp_path / 'out'}"]


def run_app(tmp_path: Path, args: list[str], script: bool = False, **env: str
            ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tmgg.cli.app"]
    if script:
        path = tmp_path / "job_script.py"
        path.write_text(JOB_SCRIPT)
        command = [sys.executable, str(path)]
    return subprocess.run(command + args + dirs(tmp_path), cwd=tmp_path, text=True,
                          capture_output=True, env=job_env(tmp_path, **env), timeout=240)


def job_records(tmp_path: Path) -> dict[str, dict]:
    jobs = tmp_path / "exp" / "smoke" / "jobs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))}


def ledger_events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "exp" / "smoke" / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_dirs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "out" / "smoke"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_incident_replay_environment_cannot_redirect_runs(tmp_path: Path) -> None:
    """Stage-1 incident: env, settings files and a stray W&B sweep name elsewhere."""
    stray = "[default]\nentity = someone_personal\nproject = elsewhere\n"
    for settings in (tmp_path / "wandb-config" / "settings", tmp_path / "wandb" / "settings"):
        settings.parent.mkdir(parents=True)
        settings.write_text(stray)
    result = run_app(tmp_path, ["-m", *TINY, "hydra.launcher.n_workers=1"],
                     WANDB_ENTITY="someone_personal", WANDB_PROJECT="elsewhere",
                     WANDB_SWEEP_ID="stray_sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    records = job_records(tmp_path)
    assert len(records) == 2 and all(r["status"] == "FINISHED" for r in records.values())
    # Both jobs ran one after the other in the same warm worker process ...
    assert len({r["pid"] for r in records.values()}) == 1
    run_ids = set()
    for directory in job_dirs(tmp_path):
        files = run_files(directory)
        assert len(files) == 1, files
        run = read_run_file(files[0])
        record = next(r for r in records.values() if r["output_dir"] == str(directory))
        assert (run.entity, run.project) == PINNED
        # ... and each has its own run: the job's id, name and stage group.
        assert run.run_id == wandb_run_id(record["job_id"]) == record["wandb"]["run_id"]
        assert (run.name, run.group, run.exit_code) == (record["run_name"], "smoke", 0)
        assert run.config["job"] == record["config"]["job"]  # the composed job config
        assert run.config["logger"]["entity"] == PINNED[0]
        assert run.history_rows > 0
        assert record["wandb"]["path"] == f"{PINNED[0]}/{PINNED[1]}/{run.run_id}"
        warning = (directory / "app.log").read_text()
        assert "WANDB_ENTITY=someone_personal" in warning
        assert "WANDB_PROJECT=elsewhere" in warning
        run_ids.add(run.run_id)
    assert len(run_ids) == 2
    # wandb did read the stray files (its lines are in the jobs' own console.log)
    consoles = "".join((d / "console.log").read_text() for d in job_dirs(tmp_path))
    assert "Loading settings from" in consoles


def test_guard_aborts_misrouted_run_before_first_step(tmp_path: Path) -> None:
    steps = tmp_path / "steps.txt"
    result = run_app(tmp_path, [*TINY, "seed=1"], script=True, TEST_MISROUTE="1",
                     TEST_STEPS_FILE=str(steps), WANDB_ENTITY="someone_personal",
                     WANDB_PROJECT="elsewhere")
    assert result.returncode != 0
    expected = ("W&B run resolved to someone_personal/elsewhere, job is pinned to "
                "graph_denoise_team/spectral_denoising")
    assert expected in result.stderr
    (record,) = job_records(tmp_path).values()
    assert record["status"] == "FAILED"
    assert f"WandbDestinationError: {expected}" in record["error"]
    assert "aborted at global step 0" in record["error"]
    assert not steps.exists(), "a training step ran"
    (directory,) = job_dirs(tmp_path)
    assert not (directory / "checkpoints").exists() and not (directory / "metrics.json").exists()
    (stray,) = [read_run_file(p) for p in run_files(directory)]
    assert (stray.entity, stray.project, stray.exit_code) == ("someone_personal", "elsewhere", 1)


def test_finished_job_is_not_rerun_and_relaunch_resumes_the_same_run(tmp_path: Path) -> None:
    args = ["stage=smoke", "model=linear_pe", "seed=1", "trainer.max_steps=6",
            "trainer.val_check_interval=2"]
    crashed = run_app(tmp_path, args, script=True, TEST_CRASH_AT="3")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    (job_id, record), = job_records(tmp_path).items()
    assert record["status"] == "FAILED"

    steps = tmp_path / "steps.txt"
    relaunched = run_app(tmp_path, args, script=True, TEST_STEPS_FILE=str(steps))
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    record = job_records(tmp_path)[job_id]
    assert record["status"] == "FINISHED" and record["attempts"] == 2
    # It continued from the checkpoint of step 2 (validation every 2 steps).
    assert steps.read_text().split() == ["2", "3", "4", "5"]
    assert record["metrics"]["resumed_from_step"] == 2
    assert record["metrics"]["global_step"] == 6

    again = run_app(tmp_path, ["-m", *args])  # the same job through a sweep
    assert again.returncode == 0, again.stderr[-3000:]
    assert job_records(tmp_path)[job_id]["finished_at"] == record["finished_at"]

    (directory,) = job_dirs(tmp_path)
    runs = [read_run_file(p) for p in run_files(directory)]
    assert len(runs) == 2  # the crashed attempt and its resumption; none for the skip
    assert {r.run_id for r in runs} == {wandb_run_id(job_id)}
    assert [r.exit_code for r in runs] == [1, 0]
    assert all((r.entity, r.project) == PINNED for r in runs)


@pytest.mark.parametrize("override", ["~logger.entity", "logger.entity=''"])
def test_sweep_without_entity_is_refused_at_plan_time(tmp_path: Path, override: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tmgg.cli.app", "-m", *TINY, override, *dirs(tmp_path)],
        cwd=tmp_path, text=True, capture_output=True, env=job_env(tmp_path), timeout=120)
    assert result.returncode != 0
    assert "job smoke_linear_pe_lr1e-3_wd1e-2_k8_s1: logger.entity: " in result.stderr
    assert not [e for e in ledger_events(tmp_path) if e["event"] == "dispatched"]
    assert job_dirs(tmp_path) == []
    assert not (tmp_path / "exp" / "smoke" / "jobs").exists()


def test_plan_check_accepts_the_stage_and_whole_sweep_overrides(tmp_path: Path) -> None:
    sweep = compose_sweep([*TINY, *dirs(tmp_path)])
    check_wandb_destinations(sweep.jobs, sweep.master_config)
    assert expected_destination(sweep.master_config).sources["entity"] == \
        "conf/stage/smoke.yaml"

    sweep = compose_sweep([*TINY, "logger.entity=other_team", *dirs(tmp_path)])
    check_wandb_destinations(sweep.jobs, sweep.master_config)
    assert {job.wandb["entity"] for job in sweep.jobs} == {"other_team"}


def test_plan_check_refuses_a_destination_that_varies_per_job(tmp_path: Path) -> None:
    sweep = compose_sweep(["stage=smoke", "seed=1", "logger.project=spectral_${model.name}",
                           *dirs(tmp_path)])
    with pytest.raises(PlanError, match=r"job smoke_filter_bank_\S+: logger.project: "
                                        r"'spectral_filter_bank' is not the sweep's"):
        check_wandb_destinations(sweep.jobs, sweep.master_config)


def test_guard_names_the_live_and_pinned_destinations() -> None:
    from tmgg.task.wandb_guard import destination_problem

    team, project = PINNED
    run_id = wandb_run_id("smoke-0123456789")
    assert destination_problem(team, project, run_id, team, project, run_id) is None
    assert destination_problem("someone_personal", project, run_id, team, project, run_id) == (
        f"W&B run resolved to someone_personal/{project}, job is pinned to {team}/{project}")
    assert destination_problem("", "lightning_logs", run_id, team, project) == (
        f"W&B run resolved to <no entity>/lightning_logs, job is pinned to {team}/{project}")
    # The right place but another run (a W&B sweep context, or an earlier job's run).
    problem = destination_problem(team, project, "a32xip9w", team, project, run_id)
    assert problem is not None and f"is not this job's run {team}/{project}/{run_id}" in problem
    # The right place on another W&B host (WANDB_BASE_URL followed after all).
    assert destination_problem(team, project, run_id, team, project, run_id,
                               live_base_url="https://wandb.example.org",
                               base_url="https://api.wandb.ai") == (
        f"W&B run {team}/{project} logs to host https://wandb.example.org, job is pinned to "
        "https://api.wandb.ai (logger.base_url)")
    assert destination_problem(team, project, run_id, team, project, run_id,
                               live_base_url="https://api.wandb.ai/",
                               base_url="https://api.wandb.ai") is None
