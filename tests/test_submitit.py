"""SLURM through hydra-submitit-launcher: the presets, records, requeue and resume.

CI has no SLURM. The smoke stage and the requeue run through real submitit with its
local executor (``hydra/launcher=submitit_local_tmgg``: one process per job under a
submitit controller, the same pickled launcher and signal protocol as on SLURM). The
SLURM preset is checked by composing it and by letting submitit write the sbatch script
for stage-1 jobs, with an ``sbatch`` stand-in on PATH that records the script and
refuses it, so nothing is ever submitted.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, tmgg_train

from tmgg.config.identity import wandb_run_id
from tmgg.jobs.ledger import FINISHED, Ledger
from tmgg.launch.slurm_resources import (
    describe_launcher,
    format_minutes,
    format_resources,
    slurm_minutes,
)

LOCAL_PRESET = "submitit_local_tmgg"
LOCAL = [f"hydra/launcher={LOCAL_PRESET}", "trainer.num_threads=1"]
SBATCH_VARIABLES = ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_QOS", "SBATCH_TIMELIMIT")


def test_smoke_stage_through_submitit_local(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", "stage=smoke", "model=linear_pe", "logger=csv", *LOCAL,
                        "trainer.max_steps=6", "trainer.val_check_interval=3",
                        "data.val_samples=20", "data.test_samples=20",
                        *sweep_dirs.overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    # The plan was recorded at multirun start, on the launching side.
    plan = ledger.plan()
    assert plan is not None and plan["launcher"] == LOCAL_PRESET and len(plan["jobs"]) == 2
    assert [e["event"] for e in ledger.events()].count("planned") == 2
    states = ledger.states()
    assert len(states) == 2 and {s.status for s in states.values()} == {FINISHED}
    # The jobs derived the same ids in their own processes as the plan did.
    assert set(sweep_dirs.job_records("smoke")) == {job["job_id"] for job in plan["jobs"]}
    job_pids = set()
    for state in states.values():
        record = state.record  # written by the job itself, in its submitit process
        assert record["launcher"] == LOCAL_PRESET
        assert record["attempts"] == 1
        assert record["metrics"]["test/mse"] >= 0
        assert record["config"]["job"]["id"] == state.job_id
        output_dir = Path(record["output_dir"])
        # Deterministic: <outputs_dir>/<stage>/<run_name>-<digest of the job id>.
        assert output_dir == sweep_dirs.outputs / "smoke" / (
            f"{state.run_name}-{state.job_id.rsplit('-', 1)[1]}")
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["job_id"] == state.job_id
        assert metrics["global_step"] == 6 and metrics["resumed_from_step"] == 0
        assert (output_dir / ".hydra" / "config.yaml").exists()
        job_pids.add(record["pid"])
    assert len(job_pids) == 2  # one process per job
    # submitit ran each job and pickled its result under the sweep dir.
    results = list((sweep_dirs.outputs / "smoke" / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2


def _wait_for(condition, timeout: float, process: subprocess.Popen, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (rc {process.returncode}) before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_interrupted_job_is_requeued_and_resumes_from_its_checkpoint(
        sweep_dirs: SweepDirs) -> None:
    """USR2 is what SLURM sends before a time limit (and on preemption where the cluster
    signals it); the submitit local controller sends the same one at its own time-out.
    We send it to the job's process right after its first checkpoint."""
    import torch

    overrides = ["stage=smoke", "model=linear_pe", "seed=1", "logger=wandb",
                 "logger.mode=offline", "trainer.max_steps=150",
                 "trainer.val_check_interval=25", *LOCAL, *sweep_dirs.overrides]
    log_path = sweep_dirs.root / "sweep.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   start_new_session=True)
    try:
        last = _wait_for(lambda: next(sweep_dirs.outputs.glob("smoke/*/checkpoints/last.ckpt"),
                                      None), 240, process, "the first checkpoint")
        first = next(iter(sweep_dirs.job_records("smoke").values()))
        assert first["status"] == "RUNNING" and first["attempts"] == 1
        os.kill(first["pid"], signal.SIGUSR2)
        # The first attempt checkpoints the submission and exits; the requeued attempt
        # needs seconds of imports before it can write a checkpoint of its own.
        _wait_for(lambda: not _process_alive(first["pid"]), 60, process,
                  "the interrupted attempt to exit")
        interrupted_at = int(torch.load(last, map_location="cpu",
                                        weights_only=False)["global_step"])
        assert process.wait(timeout=240) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert 0 < interrupted_at < 150

    states = Ledger(sweep_dirs.experiments, "smoke").states()
    assert len(states) == 1
    (state,) = states.values()
    assert state.status == FINISHED
    record = state.record
    assert record["attempts"] == 2 and record["pid"] != first["pid"]
    output_dir = Path(record["output_dir"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 150
    assert metrics["resumed_from_step"] == interrupted_at

    submitit_log = "".join(p.read_text() for p in
                           (sweep_dirs.outputs / "smoke" / ".submitit").glob("*/*_log.*"))
    assert "Calling checkpoint method" in submitit_log and "Requeued job" in submitit_log
    assert f"from {output_dir / 'checkpoints' / 'last.ckpt'}" in submitit_log

    # Both attempts logged to one W&B run: the id derived from the job id.
    run_id = wandb_run_id(state.job_id)
    runs = sorted(p.name for p in (output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)
    assert metrics["wandb_path"] == f"graph_denoise_team/spectral_denoising/{run_id}"


def test_slurm_minutes_follow_the_trainer_budget() -> None:
    assert slurm_minutes(10_000, 0.0144, 2, 5) == 10  # 4.8 min of steps + 5
    assert slurm_minutes(100_000, 0.0144, 2, 5) == 53
    assert slurm_minutes(0, 0.0144) == 5
    assert format_minutes(10) == "00:10:00"
    assert format_minutes(24 * 60 + 61) == "1-01:01:00"
    with pytest.raises(ValueError, match="margin >= 1"):
        slurm_minutes(100, 0.01, 0.5)


def _master_config(overrides: list[str]):
    from tmgg.jobs.compose import hydra_session, load_master_config

    with hydra_session() as loader:
        return load_master_config(loader, overrides)


def test_slurm_preset_composes_for_stage1(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in SBATCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_ACCOUNT", "graph_lab")
    master = _master_config(["stage=stage1", "hydra/launcher=slurm"])
    resources = describe_launcher(master)
    assert resources["executor"] == "slurm"
    assert (resources["partition"], resources["account"], resources["qos"]) == (
        "gpu", "graph_lab", None)
    assert (resources["gpus_per_node"], resources["cpus_per_task"], resources["mem_gb"]) == (
        1, 4, 8)
    assert resources["timeout_min"] == slurm_minutes(10_000, 0.0144, 2, 5) == 10
    assert resources["time_limit"] == "00:10:00"
    assert resources["max_num_timeout"] == 3 and resources["signal_delay_s"] == 120
    assert master.hydra.sweep.dir == "outputs/stage1"
    assert resources["submitit_folder"] == "outputs/stage1/.submitit/%j"
    assert resources["name"] == "tmgg_stage1"
    assert "env_overrides" not in resources
    line = format_resources(resources)
    assert "partition=gpu" in line and "time=00:10:00" in line and "requeues=3" in line

    # The time limit follows the trainer budget; a configured partition loses to sbatch's
    # own variable, and the plan says so.
    longer = describe_launcher(_master_config(
        ["stage=stage1", "hydra/launcher=slurm", "trainer.max_steps=100000",
         "hydra.launcher.partition=a100"]))
    assert longer["timeout_min"] == 53 and longer["partition"] == "a100"
    assert longer["env_overrides"] == {"SBATCH_PARTITION": "gpu"}

    local = describe_launcher(_master_config(["stage=smoke", f"hydra/launcher={LOCAL_PRESET}"]))
    assert local["executor"] == "local" and local["gpus_per_node"] == 0
    assert local["timeout_min"] == slurm_minutes(60, 0.05, 2, 5)
    assert describe_launcher(_master_config(["stage=smoke"])) == {}  # our local launcher


def _stand_in(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_submitit_writes_the_sbatch_script_of_stage1_jobs(sweep_dirs: SweepDirs) -> None:
    """The real launcher and submitit, up to the sbatch call: the stand-in records the
    script it is given and refuses it, so nothing is submitted."""
    bin_dir = sweep_dirs.root / "bin"
    bin_dir.mkdir(parents=True)
    record = sweep_dirs.root / "sbatch_calls"
    record.mkdir()
    _stand_in(bin_dir / "srun", "exit 1\n")  # submitit only checks that srun exists
    _stand_in(bin_dir / "sbatch", f'cp "$1" "{record}/"\n'
              'echo "sbatch stand-in: not submitted" >&2\nexit 1\n')
    env = {key: value for key, value in os.environ.items() if key not in SBATCH_VARIABLES}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SBATCH_ACCOUNT="graph_lab")
    result = subprocess.run(
        [sys.executable, "-m", "tmgg.cli.app", "-m", "stage=stage1", "hydra/launcher=slurm",
         "model=linear_pe", "optimizer.lr=1e-3", "optimizer.weight_decay=1e-2", "model.k=8",
         "hydra.launcher.partition=gpu", *sweep_dirs.overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "sbatch stand-in: not submitted" in result.stderr
    scripts = list(record.glob("*.sh"))
    assert len(scripts) == 1
    lines = set(scripts[0].read_text().splitlines())
    folder = sweep_dirs.outputs / "stage1" / ".submitit" / "%A_%a"
    for flag in ("--array=0-2%3", "--job-name=tmgg_stage1", "--partition=gpu",
                 "--account=graph_lab", "--time=10", "--gpus-per-node=1",
                 "--cpus-per-task=4", "--mem=8GB", "--nodes=1", "--ntasks-per-node=1",
                 "--signal=USR2@120", "--open-mode=append", "--requeue",
                 f"--output={folder}/%A_%a_0_log.out"):
        assert f"#SBATCH {flag}" in lines, (flag, sorted(lines))
    # The three seeds were planned, none dispatched anywhere.
    states = Ledger(sweep_dirs.experiments, "stage1").states()
    assert len(states) == 3 and {s.status for s in states.values()} == {"PLANNED"}
