"""Fused groups on the Modal and SLURM launchers: one container (array task) per group,
every member still its own job.

Modal runs through its local transport (worker processes standing in for containers,
the remote function's own body, a directory standing in for the volume); SLURM through
hydra-submitit-launcher's local executor (``submitit_local_tmgg``: the SLURM path
rehearsed on this machine). The sweep: two models x two seeds of the smoke stage at a
tiny step budget, i.e. two batch streams of two jobs each.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import SweepDirs, run_cli, tmgg_sweep, tmgg_train

from tmgg.jobs.ledger import CANCELLED, FAILED, FINISHED, Ledger
from tmgg.launch.cost import group_time_factor, plan_estimates

SWEEP = ["stage=smoke", "model=linear_pe,filter_bank", "logger=csv", "trainer.max_steps=20",
         "trainer.val_check_interval=10", "data.val_samples=50", "data.test_samples=50"]
MODAL = ["hydra/launcher=modal", "hydra.launcher.transport=local",
         "hydra.launcher.retries.initial_delay=0"]


def _events(ledger: Ledger, kind: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events() if e["event"] == kind]


def _assert_members_are_solo_jobs(sweep_dirs: SweepDirs, launcher: str,
                                  own_records: Path | None = None) -> list[Any]:
    """Four FINISHED jobs, each with its own record, output folder and metrics, trained
    two by two (the group is in each member's metrics: ``fused_members``).

    ``own_records``: where the jobs wrote their own records (the volume's, for Modal);
    the process that trained each job is read from there.
    """
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    states = list(ledger.states().values())
    assert len(states) == 4 and {s.status for s in states} == {FINISHED}
    assert len(_events(ledger, "planned")) == 4
    for state in states:
        record = state.record
        assert record["launcher"] == launcher
        assert record["metrics"]["job_id"] == state.job_id
        assert record["metrics"]["fused_members"] == 2
        output_dir = Path(record["output_dir"])
        assert output_dir.name.startswith(state.run_name)
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["job_id"] == state.job_id and metrics["global_step"] == 20
        assert (output_dir / "checkpoints" / "best.ckpt").exists()
        assert (output_dir / ".hydra" / "config.yaml").exists()
    # Members of one group trained in one process; the two groups in two.
    own = {s.job_id: json.loads((own_records / f"{s.job_id}.json").read_text())
           if own_records else s.record for s in states}
    by_pid = Counter(record["pid"] for record in own.values())
    assert sorted(by_pid.values()) == [2, 2]
    for pid in by_pid:
        seeds = {r["config"]["seed"] for r in own.values() if r["pid"] == pid}
        assert len(seeds) == 1  # a group is one batch stream
    return states


# --------------------------------------------------------------------------- Modal


@pytest.mark.slow
def test_modal_runs_one_container_call_per_fused_group(sweep_dirs: SweepDirs,
                                                       tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    result = tmgg_train("-m", *SWEEP, *MODAL, "hydra.launcher.local_containers=2",
                        f"hydra.launcher.local_volume_dir={volume}", *sweep_dirs.overrides,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = _assert_members_are_solo_jobs(sweep_dirs, "modal",
                                           volume / "experiments/smoke/jobs")
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    assert len(_events(ledger, "dispatched")) == 4 and len(_events(ledger, "outcome")) == 4
    for state in states:  # on the (stand-in) volume, as a solo job on Modal
        assert state.record["modal"]["volume_path"].startswith("outputs/smoke/")
        assert (volume / "experiments/smoke/jobs" / f"{state.job_id}.json").exists()
    # One container call per group: each call reloads the volume once, at its start.
    operations = [json.loads(line) for line in
                  (volume / ".volume-commits.jsonl").read_text().splitlines()]
    starts = [op for op in operations if op["reason"] == "job start"]
    assert len(starts) == 2 and len({op["pid"] for op in starts}) == 2
    assert "4 jobs in 2 containers" in result.stderr


def test_modal_fuse_off_plans_a_container_per_job_and_bad_settings_are_refused(
        sweep_dirs: SweepDirs) -> None:
    from tmgg.jobs.plan import PlanError
    from tmgg.launch.modal.settings import ModalSettings

    with pytest.raises(PlanError, match=r"hydra\.launcher\.fuse:"):
        ModalSettings.from_params({"transport": "local", "fuse": "always"})
    with pytest.raises(PlanError, match=r"hydra\.launcher\.fuse_max_members"):
        ModalSettings.from_params({"transport": "local", "fuse_max_members": 0})
    refused = tmgg_train("-m", *SWEEP, *MODAL, "hydra.launcher.fuse=sometimes",
                         *sweep_dirs.overrides)
    assert refused.returncode != 0 and "hydra.launcher.fuse" in refused.stderr
    assert not list(Ledger(sweep_dirs.experiments, "smoke").events())  # not even planned
    # fuse=off: one container a job (fused, the same four jobs take two).
    for fuse, containers in (("off", 4), ("auto", 2)):
        plan = tmgg_sweep("plan", "--json", *SWEEP, "hydra/launcher=modal",
                          "hydra.launcher.transport=local", f"hydra.launcher.fuse={fuse}",
                          *sweep_dirs.overrides)
        assert plan.returncode == 0, plan.stderr[-2000:]
        facts = json.loads(plan.stdout)
        assert facts["containers"] == containers, fuse
        assert len({row["container"] for row in facts["jobs"]}) == containers, fuse


def test_the_plan_and_cost_count_containers(sweep_dirs: SweepDirs) -> None:
    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep([*SWEEP, "hydra/launcher=modal", "hydra.launcher.gpu=T4",
                           *sweep_dirs.overrides])
    fused = plan_estimates(sweep.master_config, sweep.jobs)
    solo = plan_estimates(sweep.master_config, sweep.jobs, [[p] for p in range(4)])
    # smoke declares 5 s a job; a group of two: 5 s x group_time_factor(2) in one container.
    assert group_time_factor(1) == 1 and 1 < group_time_factor(2) < 2
    assert {row["container"] for row in fused} == {0, 1}
    for row in fused:  # (figures rounded to 0.1 s)
        assert row["est_container_seconds"] == pytest.approx(5 * group_time_factor(2), abs=0.06)
    assert sum(r["est_gpu_seconds"] for r in fused) == pytest.approx(10 * group_time_factor(2),
                                                                     abs=0.2)
    assert sum(r["est_gpu_seconds"] for r in solo) == 20
    fused_cost = sum(r["est_cost_usd"] for r in fused)
    assert fused_cost < sum(r["est_cost_usd"] for r in solo)
    # The CPU-only option is still shown, and cheaper.
    assert 0 < sum(r["est_cost_cpu_usd"] for r in fused) < fused_cost

    plan = tmgg_sweep("plan", "--json", *SWEEP, "hydra/launcher=modal",
                      "hydra.launcher.transport=local", *sweep_dirs.overrides)
    assert plan.returncode == 0, plan.stderr
    facts = json.loads(plan.stdout)
    assert facts["containers"] == 2 and len(facts["fused_groups"]) == 2
    assert facts["est_container_seconds"] == pytest.approx(10 * group_time_factor(2), abs=0.2)
    assert all(group["members"] == 2 for group in facts["fused_groups"])
    table = tmgg_sweep("plan", *SWEEP, "hydra/launcher=modal", "hydra.launcher.transport=local",
                       "hydra.launcher.fuse=off", *sweep_dirs.overrides)
    assert table.returncode == 0, table.stderr
    assert "fused groups" not in table.stdout and "4 jobs, estimated" in table.stdout


@pytest.mark.slow
def test_detached_fused_groups_are_one_call_each_folded_and_cancelled_per_member(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    # The jobs write their own records on the stand-in volume: only `status` folding the
    # call's result brings them into this machine's ledger. One container slot: the
    # second group's call waits for the first. Each group holds at step 1
    # (``tmgg.task.hold``): the first is let through, the second is cancelled while
    # held, whatever the machine's speed.
    from holds import hold_env, wait_for_holds

    release = tmp_path / "release"
    result = tmgg_train("-m", *SWEEP, *MODAL, "hydra.launcher.detach=true",
                        "hydra.launcher.local_containers=1",
                        f"hydra.launcher.local_volume_dir={tmp_path / 'volume'}",
                        *sweep_dirs.overrides, timeout=300, env=hold_env(1, release))
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    dispatched = _events(ledger, "dispatched")
    calls = Counter(e["call_id"] for e in dispatched)
    assert len(dispatched) == 4 and sorted(calls.values()) == [2, 2]  # a call per group
    outs = {call: ledger.root / "modal_calls" / "local" / f"{call}.out" for call in calls}
    wait_for_holds(release, 1)
    release.touch()  # the first group trains on and finishes; the second then holds
    wait_for_holds(release, 2)
    deadline = time.monotonic() + 600  # a bound for a broken run, not a race
    while not any(out.exists() for out in outs.values()):  # the first call's result
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (first,) = [call for call, out in outs.items() if out.exists()]
    # `tmgg-sweep status` folds the one call's result into both members' records.
    status = run_cli(["-m", "tmgg.cli.tmgg_sweep", "status", "--json", "stage=smoke",
                      *sweep_dirs.overrides])
    assert status.returncode == 0, status.stderr
    folded = [s for s in ledger.states().values() if s.status == FINISHED]
    assert len(folded) == 2 and {s.call_id for s in folded} == {first}
    for state in folded:
        assert state.metrics["job_id"] == state.job_id and state.metrics["fused_members"] == 2
        assert state.record["modal"]["call_id"] == first
    cancel = run_cli(["-m", "tmgg.cli.tmgg_sweep", "cancel", "stage=smoke",
                      *sweep_dirs.overrides])
    assert cancel.returncode == 0, cancel.stderr
    assert "1 call(s) cancelled" in cancel.stdout
    cancelled = _events(ledger, "cancelled")
    assert len(cancelled) == 2 and {e["call_id"] for e in cancelled} == set(calls) - {first}
    # A member already training when its call is stopped may record FAILED itself (its
    # own record wins over the launcher's event, as for a solo job); one waiting for
    # its container slot is CANCELLED.
    rest = [s.status for s in ledger.states().values() if s.call_id != first]
    assert len(rest) == 2 and set(rest) <= {CANCELLED, FAILED}


@pytest.mark.slow
def test_a_lost_group_container_resumes_each_member_from_its_checkpoint(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    """The group's container is SIGKILLed (no clean-up) while its trainer is held at step
    21 (``tmgg.task.hold``), so both members' step-20 checkpoints are committed to the
    stand-in volume, whatever the machine's speed; Modal's retry runs the group again in
    a fresh container, which resumes each member from its own last.ckpt (step 20)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO
    from holds import BROKEN_RUN_S, hold_env, released, wait_for_holds, wait_until_group_gone

    volume, release = tmp_path / "volume", tmp_path / "release"
    args = ["-m", "stage=smoke", "model=linear_pe,filter_bank", "seed=1", "logger=csv",
            "trainer.max_steps=40", "trainer.val_check_interval=20", "data.val_samples=50",
            "data.test_samples=50", *MODAL, "hydra.launcher.local_containers=1",
            f"hydra.launcher.local_volume_dir={volume}",
            *sweep_dirs.overrides]
    log_path = tmp_path / "sweep.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", *args], cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=hold_env(21, release))
    try:
        wait_for_holds(release, 1, process, describe=log_path.read_text)
        assert len(list(volume.glob("outputs/smoke/*/checkpoints/last.ckpt"))) == 2
        commits = volume / ".volume-commits.jsonl"
        container = json.loads(commits.read_text().splitlines()[0])["pid"]
        os.kill(container, signal.SIGKILL)  # the container this sweep started
        with released(release):  # the retry holds at step 21 again: let it on
            assert process.wait(timeout=BROKEN_RUN_S) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        wait_until_group_gone(process.pid)
    states = list(Ledger(sweep_dirs.experiments, "smoke").states().values())
    assert len(states) == 2 and {s.status for s in states} == {FINISHED}
    for state in states:
        metrics = json.loads((Path(state.record["output_dir"]) / "metrics.json").read_text())
        assert metrics["global_step"] == 40 and metrics["fused_members"] == 2
        assert metrics["resumed_from_step"] == 20  # the checkpoint committed before the kill
        own = json.loads((volume / "experiments/smoke/jobs" / f"{state.job_id}.json")
                         .read_text())
        assert own["attempts"] == 2 and own["status"] == FINISHED
    starts = [json.loads(line)["pid"] for line in commits.read_text().splitlines()
              if json.loads(line)["reason"] == "job start"]
    assert len(starts) == 2 and starts[0] == container != starts[1]
    # One commit per validation round for the whole group (not one per member's file):
    # at step 20 in the lost container, at 40 in its retry.
    checkpoint_pids = [json.loads(line)["pid"] for line in commits.read_text().splitlines()
                       if json.loads(line)["reason"].startswith("checkpoints")]
    assert checkpoint_pids == [container, starts[1]]


# --------------------------------------------------------------------------- SLURM

SUBMITIT_LOCAL = ["hydra/launcher=submitit_local_tmgg", "trainer.num_threads=1"]


@pytest.mark.slow
def test_submitit_runs_one_array_task_per_fused_group(sweep_dirs: SweepDirs) -> None:
    """The SLURM path rehearsed with submitit's local executor."""
    result = tmgg_train("-m", *SWEEP, *SUBMITIT_LOCAL, *sweep_dirs.overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_members_are_solo_jobs(sweep_dirs, "submitit_local_tmgg")
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    assert len(_events(ledger, "dispatched")) == 4 and len(_events(ledger, "outcome")) == 4
    # One submitit job per group, each returning its members' results.
    submitted = list((sweep_dirs.outputs / "smoke" / ".submitit").glob("*/*_result.pkl"))
    assert len(submitted) == 2
    assert "4 jobs (0 already finished) in 2 array tasks" in result.stderr + result.stdout


def test_slurm_array_has_one_task_per_group_and_its_time_covers_the_group(
        sweep_dirs: SweepDirs) -> None:
    """The real launcher and submitit up to the sbatch call (a stand-in records the
    script and refuses it): four stage-1 jobs of two seeds are two array tasks."""
    import os
    import stat
    import subprocess
    import sys

    from conftest import REPO

    from tmgg.launch.slurm_resources import slurm_minutes

    bin_dir = sweep_dirs.root / "bin"
    bin_dir.mkdir(parents=True)
    calls = sweep_dirs.root / "sbatch_calls"
    calls.mkdir()
    for name, body in (("srun", "exit 1\n"), ("sbatch", f'cp "$1" "{calls}/"\nexit 1\n')):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SBATCH_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    overrides = ["stage=stage1", "hydra/launcher=slurm", "model=linear_pe,filter_bank",
                 "optimizer.lr=1e-3", "optimizer.weight_decay=1e-2", "model.k=8", "seed=1,2",
                 *sweep_dirs.overrides]
    result = subprocess.run([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    (script,) = calls.glob("*.sh")
    lines = set(script.read_text().splitlines())
    minutes = math.ceil(slurm_minutes(10_000, 0.0144, 2, 5) * group_time_factor(2))
    assert "#SBATCH --array=0-1%2" in lines, sorted(lines)
    assert f"#SBATCH --time={minutes}" in lines, sorted(lines)
    states = Ledger(sweep_dirs.experiments, "stage1").states()
    assert {s.status for s in states.values()} == {"PLANNED"} and len(states) == 4

    plan = tmgg_sweep("plan", "--json", *overrides)
    assert plan.returncode == 0, plan.stderr
    facts = json.loads(plan.stdout)
    assert facts["containers"] == 2 and [g["members"] for g in facts["fused_groups"]] == [2, 2]
    assert facts["resources"]["task_time_limit"] == f"00:{minutes:02d}:00"
    solo = tmgg_sweep("plan", "--json", *overrides, "hydra.launcher.fuse=off")
    assert json.loads(solo.stdout)["containers"] == 4
    refused = tmgg_sweep("plan", *overrides, "hydra.launcher.fuse_max_members=0")
    assert refused.returncode == 2 and "hydra.launcher.fuse_max_members" in refused.stderr
