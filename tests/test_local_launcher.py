"""hydra/launcher=local: Hydra's launcher conformance suites, sweeps, faults, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, run_cli, tmgg_sweep, tmgg_train
from holds import BROKEN_RUN_S, hold_env, released, wait_for_holds, wait_until_group_gone
from hydra.core.utils import JobReturn, JobStatus
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from tmgg.jobs.ledger import DISPATCHED, FAILED, FINISHED, LOST, RUNNING, Ledger
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.sweep import record_lost_job
from tmgg.launch.local import worker_crash
from tmgg.launch.worker_pool import Died

LOCAL = ["hydra/launcher=local", "hydra.launcher.n_workers=2"]
# A few steps and samples: the smoke test's assertions are about records, not training.
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_samples=20",
        "data.test_samples=20"]


@pytest.mark.parametrize("launcher_name, overrides", [("local", ["hydra.launcher.n_workers=2"])])
class TestLocalLauncher(LauncherTestSuite):
    """Hydra's own launcher conformance suite."""


@pytest.mark.parametrize("task_launcher_cfg, extra_flags",
                         [({}, ["-m", "hydra/launcher=local", "hydra.launcher.n_workers=1"])])
class TestLocalLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite: the plugin is discovered and runs real apps."""


def test_smoke_sweep_records_every_job(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", "stage=smoke", "logger=csv", *LOCAL, *TINY,
                        *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    states = ledger.states()
    assert len(states) == 6
    assert {s.status for s in states.values()} == {FINISHED}
    plan = ledger.plan()
    assert plan is not None and len(plan["jobs"]) == 6
    for state in states.values():
        record = state.record
        assert record["metrics"]["test/mse"] >= 0
        assert record["code"]["git_commit"]
        assert set(record["versions"]) >= {"torch", "lightning", "hydra-core", "wandb"}
        assert record["config"]["job"]["id"] == state.job_id
        output_dir = record["output_dir"]
        metrics_file = Path(output_dir) / "metrics.json"
        assert json.loads(metrics_file.read_text())["job_id"] == state.job_id
        assert os.path.exists(f"{output_dir}/.hydra/config.yaml")
    # Distinct jobs never share a directory.
    assert len({s.record["output_dir"] for s in states.values()}) == 6
    events = [e["event"] for e in ledger.events()]
    assert events.count("planned") == 6 and events.count("outcome") == 6
    assert "FINISHED" in result.stderr  # the outcome table


def test_failed_job_does_not_stop_the_others(sweep_dirs: SweepDirs) -> None:
    result = run_cli([str(REPO / "tests/apps/faulty_train.py"), "-m", "stage=smoke",
                      "logger=csv", "model=linear_pe,filter_bank", *LOCAL, *sweep_dirs.overrides])
    assert result.returncode != 0
    states = Ledger(sweep_dirs.experiments, "smoke").states()
    by_status: dict[str, list] = {}
    for state in states.values():
        by_status.setdefault(state.status, []).append(state)
    assert len(by_status[FINISHED]) == 2 and len(by_status[FAILED]) == 2
    for state in by_status[FAILED]:
        assert "injected failure in smoke_filter_bank" in state.error
        assert "RuntimeError" in state.error
    assert "FAILED" in result.stderr


def test_sigkilled_worker_fails_its_own_job_only(sweep_dirs: SweepDirs) -> None:
    """A worker killed by the kernel (OOM killer, SIGKILL) fails its own job, named as such.

    The first of four jobs kills its own worker at step 1, with no clean-up and no
    reply, while the other worker's job is held at step 2 (``tmgg.task.hold``): that job
    is in flight when the worker dies, whatever the machine's speed. Once the crash is in
    the ledger, the held jobs are let on; the job in flight and the two queued jobs
    finish. The crashed job's record and ledger outcome say FAILED with the signal, not
    the RUNNING its dead process wrote last; the sweep exits non-zero and its table
    counts 1 failed.
    """
    victim = "smoke_linear_pe_lr1e-3_wd1e-2_k8_s1"
    release = sweep_dirs.root / "release"
    stderr_path = sweep_dirs.root / "sweep.stderr"
    env = {**hold_env(2, release), "PYTHONUNBUFFERED": "1",
           "TMGG_TEST_KILL_RUN": victim, "TMGG_TEST_KILL_STEP": "1"}
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tests/apps/killed_train.py"), "-m", "stage=smoke",
             "logger=csv", "model=linear_pe,filter_bank", *LOCAL, *TINY,
             *sweep_dirs.overrides],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            env=env)
    try:
        wait_for_holds(release, 1, process, describe=stderr_path.read_text)
        deadline = time.monotonic() + BROKEN_RUN_S  # a bound for a broken run, not a race
        while not any(s.run_name == victim and s.status == FAILED
                      for s in ledger.states().values()):
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the killed worker's job never failed"
            time.sleep(0.05)
        with released(release):
            assert process.wait(timeout=BROKEN_RUN_S) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        wait_until_group_gone(process.pid)
    stderr_text = stderr_path.read_text()
    states = {s.run_name: s for s in ledger.states().values()}
    assert len(states) == 4
    assert {name: s.status for name, s in states.items() if s.status != FINISHED} == {
        victim: FAILED}, stderr_text[-3000:]
    crashed = states[victim]
    assert "WorkerCrashed" in crashed.error and "SIGKILL (signal 9)" in crashed.error
    record = sweep_dirs.job_records("smoke")[crashed.job_id]
    assert record["status"] == FAILED and "SIGKILL" in record["error"]
    assert record["started_at"] and record["attempts"] == 1  # the job's own start, kept
    (outcome,) = [e for e in ledger.events()
                  if e["event"] == "outcome" and e["job_id"] == crashed.job_id]
    assert outcome["status"] == FAILED and "SIGKILL (signal 9)" in outcome["error"]
    summary = " ".join(stderr_text.split())  # rich wraps the line at the console width
    assert ("3 finished, 0 skipped (already finished), 0 left to the sweep that holds them, "
            "1 failed") in summary


def _job_and_ledger(root: Path) -> tuple[PlannedJob, Ledger]:
    task = {"experiments_dir": str(root), "stage": {"name": "smoke"},
            "job": {"id": "smoke-0123456789", "run_name": "smoke_x"}, "logger": {"name": "csv"}}
    job = PlannedJob(index=0, job_id="smoke-0123456789", run_name="smoke_x", stage="smoke",
                     overrides=[], sweep_config=None, task_config=task)  # type: ignore[arg-type]
    return job, Ledger(root, "smoke")


def _crashed(job: PlannedJob) -> JobReturn:
    failed = JobReturn(overrides=[], status=JobStatus.FAILED)
    failed.return_value = worker_crash(job, Died(pid=4242, exitcode=-9))
    return failed


def test_launcher_records_a_dead_workers_job_failed_over_its_running_record(
        tmp_path: Path) -> None:
    job, ledger = _job_and_ledger(tmp_path)
    ledger.write_job_record(job.job_id, {"job_id": job.job_id, "status": RUNNING,
                                         "started_at": "2026-01-01T00:00:00+00:00",
                                         "attempts": 1, "output_dir": "/out/smoke_x"})
    record_lost_job(job, _crashed(job), "local")
    record = ledger.job_record(job.job_id)
    assert record["status"] == FAILED and record["attempts"] == 1
    assert record["started_at"] == "2026-01-01T00:00:00+00:00"  # the job's own, kept
    assert record["output_dir"] == "/out/smoke_x"
    assert record["error"].startswith("WorkerCrashed: the worker process (pid 4242) was "
                                      "killed by SIGKILL (signal 9) (out of memory?")


def test_a_job_that_recorded_finished_before_its_worker_died_stays_finished(
        tmp_path: Path) -> None:
    job, ledger = _job_and_ledger(tmp_path)
    finished = {"job_id": job.job_id, "status": FINISHED, "metrics": {"test/mse": 0.25}}
    ledger.write_job_record(job.job_id, finished)
    result = record_lost_job(job, _crashed(job), "local")
    assert result.status == JobStatus.COMPLETED and result.return_value == {"test/mse": 0.25}
    assert ledger.job_record(job.job_id) == finished


def test_override_holding_an_interpolation_is_planned_as_hydra_runs_it(
        sweep_dirs: SweepDirs) -> None:
    """``${...}`` in a command-line override is text to Hydra's sweeper; the plan (and the
    job ids derived from it) must read it the same way, not resolve it on the spot."""
    result = tmgg_train("-m", "stage=smoke", "model=linear_pe", "logger.mode=offline",
                        "logger.group=${stage.name}_b", "trainer.max_steps=10",
                        "trainer.val_check_interval=5", *LOCAL, *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    plan = ledger.plan()
    assert plan is not None
    planned = {job["job_id"]: job["overrides"] for job in plan["jobs"]}
    records = sweep_dirs.job_records("smoke")
    assert set(records) == set(planned) and len(records) == 2
    for job_id, record in records.items():
        assert record["status"] == FINISHED
        assert record["overrides"] == planned[job_id]
        assert record["config"]["logger"]["group"] == "smoke_b"


def test_rerun_skips_finished_jobs(sweep_dirs: SweepDirs) -> None:
    args = ("-m", "stage=smoke", "logger=csv", "model=linear_pe", *LOCAL, *sweep_dirs.overrides)
    assert tmgg_train(*args).returncode == 0
    first = sweep_dirs.job_records("smoke")
    second_run = tmgg_train(*args)
    assert second_run.returncode == 0
    assert "skipped" in second_run.stderr
    assert sweep_dirs.job_records("smoke") == first  # untouched: nothing re-ran


def test_sigkill_then_resume_runs_exactly_the_unfinished_jobs(sweep_dirs: SweepDirs) -> None:
    """The launcher is killed with one fused group (seed 1) finished and the other held
    at step 2 (``tmgg.task.hold``: one release lets the first group through), whatever
    the machine's speed."""
    overrides = ["stage=smoke", "logger=csv", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "data.val_samples=20", "data.test_samples=20",
                 "hydra/launcher=local", "hydra.launcher.n_workers=1", *sweep_dirs.overrides]
    release = sweep_dirs.root / "release"
    env = {**os.environ, "TMGG_TEST_HOLD_AT_STEP": "2", "TMGG_TEST_HOLD_FILE": str(release)}
    process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    ledger = Ledger(sweep_dirs.experiments, "smoke")

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 600  # a bound for a broken run, not a race
        while not done():
            assert process.poll() is None, f"the sweep ended before {what}"
            assert time.monotonic() < deadline, f"never {what}"
            time.sleep(0.05)

    def held() -> int:
        return len(list(sweep_dirs.root.glob("release.held.*")))

    try:
        wait_for("the first group held", lambda: held() == 1)
        release.touch()  # the first group goes on and finishes; the second holds
        wait_for("the second group held", lambda: held() == 2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers, no cleanup
        process.wait()
        wait_until_group_gone(process.pid)
    before = {job_id: dict(record) for job_id, record in sweep_dirs.job_records("smoke").items()}
    finished_before = {j for j, r in before.items() if r["status"] == FINISHED}
    assert len(finished_before) == 3
    assert {r["config"]["seed"] for j, r in before.items() if j in finished_before} == {1}
    # The ledger survived the kill: every line parses, the plan is complete.
    assert len([e for e in ledger.events() if e["event"] == "planned"]) == 6
    # Jobs that were running when their process died are LOST, none still "running".
    states = ledger.states()
    assert not {RUNNING, DISPATCHED} & {s.status for s in states.values()}
    for job_id, record in before.items():
        if record["status"] == RUNNING:
            assert states[job_id].status == LOST, states[job_id]

    resumed = tmgg_sweep("resume", *[o for o in overrides if not o.startswith("hydra")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{6 - len(finished_before)} to run" in resumed.stdout
    after = sweep_dirs.job_records("smoke")
    assert {r["status"] for r in after.values()} == {FINISHED}
    assert len(after) == 6
    for job_id in finished_before:  # not re-run
        assert after[job_id]["started_at"] == before[job_id]["started_at"]
    for job_id in set(after) - finished_before:
        assert before.get(job_id, {}).get("started_at") != after[job_id]["started_at"]
    status = tmgg_sweep("status", "--json", "stage=smoke", *sweep_dirs.overrides)
    assert json.loads(status.stdout)["counts"] == {FINISHED: 6}


# Run in a fresh interpreter: the fork server is per process, and Hydra's suites above
# may already have started one in pytest's. The probe is what a worker runs.
_PROBE = """
import sys

def loaded(names):
    return [name for name in names if name in sys.modules]
"""
_WARM_WORKERS_SCRIPT = """
import json, multiprocessing, sys, threading
from multiprocessing import forkserver

sys.path.insert(0, sys.argv[1])
import probe
from hydra import compose, initialize_config_dir

from tmgg.config import CONF_DIR
from tmgg.jobs.hydra_callbacks import LocalWorkersCallback

with initialize_config_dir(str(CONF_DIR), version_base=None):
    cfg = compose("train", overrides=sys.argv[2:], return_hydra_config=True)
LocalWorkersCallback().on_multirun_start(config=cfg)
for thread in threading.enumerate():
    if thread.name == "tmgg-forkserver-start":
        thread.join()
started = forkserver._forkserver._forkserver_pid is not None
loaded = []
if started:
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        loaded = pool.apply(probe.loaded, (["lightning", "networkx", "tmgg.task.module",
                                            "wandb", "wandb.sdk.launch.inputs.internal"],))
print(json.dumps({"callbacks": list(cfg.hydra.callbacks), "started": started,
                  "loaded": loaded}))
"""


@pytest.mark.parametrize("overrides, started, loaded", [
    (["hydra/launcher=local", "logger=csv"], True,
     ["lightning", "networkx", "tmgg.task.module"]),
    (["hydra/launcher=local", "logger=wandb"], True,
     ["lightning", "networkx", "tmgg.task.module", "wandb",
      "wandb.sdk.launch.inputs.internal"]),
    (["hydra/launcher=basic"], False, []),
])
def test_workers_warm_up_from_multirun_start(tmp_path: Path, overrides: list[str],
                                             started: bool, loaded: list[str]) -> None:
    """The fork server starts with the multirun, before the plan, with the job's imports.

    A worker forked from it has torch, lightning and the task modules (and wandb when
    the sweep logs to W&B) before its first job; other launchers start nothing.
    """
    (tmp_path / "probe.py").write_text(_PROBE)
    result = run_cli(["-c", _WARM_WORKERS_SCRIPT, str(tmp_path), *overrides], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["callbacks"] == ["local_workers", "ledger"]  # before the plan is composed
    assert report["started"] is started
    assert report["loaded"] == loaded
