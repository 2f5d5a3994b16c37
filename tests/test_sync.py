"""``tmgg-sweep sync``/``relog`` and reconcile's advice, with the real wandb client
against the test suite's W&B server.

One small sweep is trained once for the module (``template``): job ``s1`` ran offline
(auto without a key), job ``s2`` with ``logger.mode=disabled``. Each test copies it and
talks to a fresh server (``logger.base_url`` is not part of a job's identity), so the
tests share the training and not their state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from wandb_server import FakeWandbServer
from wandb_server.fixtures import PROJECT, TEAM, online_env, require_pinned_wandb

from tmgg.config.identity import wandb_run_id
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.plan import PlannedJob

pytestmark = pytest.mark.slow

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
SWEEP = ["stage=smoke", "model=linear_pe", *TINY]
NOWHERE = "http://127.0.0.1:9"  # the host the template sweep was planned with
BIN = Path(sys.executable).parent


def dirs(root: Path) -> list[str]:
    return [f"experiments_dir={root / 'exp'}", f"outputs_dir={root / 'out'}"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """s1 trained offline (no key), s2 trained with W&B disabled; both FINISHED."""
    require_pinned_wandb()
    root = tmp_path_factory.mktemp("sync-template")
    env = online_env(root, None)
    for extra in (["seed=1"], ["seed=2", "logger.mode=disabled"]):
        ran = subprocess.run([sys.executable, "-m", "tmgg.cli.app", "-m", *SWEEP, *extra,
                              f"logger.base_url={NOWHERE}", *dirs(root)], cwd=root,
                             text=True, capture_output=True, env=env, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]
    return root


@dataclass
class Case:
    """A copy of the template sweep, pointed at its own fresh W&B server."""

    root: Path
    server: FakeWandbServer
    jobs: dict[str, PlannedJob]  # "s1" / "s2"

    @property
    def overrides(self) -> list[str]:
        return [*SWEEP, f"logger.base_url={self.server.base_url}", *dirs(self.root)]

    def env(self, username: str = "alice", **extra: str) -> dict[str, str]:
        key = next(u.api_key for u in self.server.users.values() if u.username == username)
        env = online_env(self.root, key, **extra)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def tmgg_sweep(self, *args: str, username: str = "alice", timeout: float = 300
                   ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "tmgg-sweep"), *args], cwd=self.root, text=True,
                              capture_output=True, env=self.env(username), timeout=timeout)

    def shell(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run an advice line exactly as printed."""
        return subprocess.run(["bash", "-c", command], cwd=self.root, text=True,
                              capture_output=True, env=self.env(), timeout=timeout)

    def reconcile(self, api_timeout: int = 60) -> tuple[int, dict[str, object]]:
        """``tmgg-sweep reconcile --online`` in this process: exit code, rows by job."""
        from tmgg.cli.reconcile import main, reconcile_jobs

        os.environ["WANDB_API_KEY"] = self.env()["WANDB_API_KEY"]
        code = main(["--online", "--api-timeout", str(api_timeout), *self.overrides])
        sweep = compose_sweep(self.overrides)
        rows = reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage, mode="online",
                              overrides=self.overrides, api_timeout=api_timeout)
        return code, {row.run_name[-2:]: row for row in rows}


@pytest.fixture
def case(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
         ) -> Iterator[Case]:
    root = tmp_path / "sweep"
    shutil.copytree(template, root, symlinks=True)
    for path in (root / "exp").rglob("*"):  # records name the template's output dirs
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            path.write_text(path.read_text().replace(str(template), str(root)))
    for name in [n for n in os.environ if n.startswith(("WANDB_", "MODAL_TOKEN"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(root / "wandb-config"))
    server = FakeWandbServer().start()
    server.add_user("alice", teams=[TEAM, "vision_team"])
    server.add_user("mallory")
    jobs = {job.run_name[-2:]: job for job in compose_sweep(
        [*SWEEP, f"logger.base_url={server.base_url}", *dirs(root)]).jobs}
    try:
        yield Case(root, server, jobs)
    finally:
        server.stop()
    server.assert_understood()


def run_id(case: Case, name: str, generation: int = 0) -> str:
    return wandb_run_id(case.jobs[name].job_id, generation)


# -- sync -------------------------------------------------------------------------------
def test_sync_refuses_a_key_that_cannot_write_before_uploading(case: Case) -> None:
    result = case.tmgg_sweep("sync", *case.overrides, username="mallory")
    assert result.returncode != 0
    assert (f"sync refused, nothing uploaded to {TEAM}/{PROJECT} on {case.server.base_url}: "
            f"the W&B API key of user 'mallory' cannot write to entity '{TEAM}'"
            in result.stderr)
    assert "UpsertBucket" not in case.server.operations and not case.server.runs_in()


def test_sync_verifies_every_run_through_the_api_and_asks_again_the_second_time(
        case: Case) -> None:
    first = case.tmgg_sweep("sync", *case.overrides)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert f"verified: 1 job(s)' runs at {TEAM}/{PROJECT} on {case.server.base_url}" \
        in first.stdout
    run = case.server.run(TEAM, PROJECT, run_id(case, "s1"))
    assert run is not None and run.state == "finished"
    assert run.summary["trainer/global_step"] >= 4
    listings = case.server.operations.count("Runs")
    # wandb skips a synced run by its local marker; the check still asks the server.
    case.server.delete_run(TEAM, PROJECT, run_id(case, "s1"))
    # No lagging listing to wait for here: the run is gone (the default waits 30 s).
    again = case.tmgg_sweep("sync", "--verify-wait", "0", *case.overrides)
    assert case.server.operations.count("Runs") > listings
    assert again.returncode != 0
    assert (f"NOT VERIFIED job {case.jobs['s1'].run_name}: no run with its id at "
            f"{TEAM}/{PROJECT}") in again.stderr
    assert "to fix: tmgg-sweep relog" in again.stderr


def test_sync_of_a_deleted_run_id_stops_at_its_time_limit_with_the_generation_advice(
        case: Case) -> None:
    case.server.plant_run(TEAM, PROJECT, run_id(case, "s1"))
    case.server.delete_run(TEAM, PROJECT, run_id(case, "s1"))
    started = time.monotonic()
    refused = case.tmgg_sweep("sync", "--upload-timeout", "8", "--verify-wait", "0",
                              *case.overrides)
    assert time.monotonic() - started < 120
    assert refused.returncode != 0
    assert "did not finish within 8 s and was stopped" in refused.stderr
    assert f"NOT VERIFIED job {case.jobs['s1'].run_name}" in refused.stderr
    assert "logger.run_generation=1" in refused.stderr and "tmgg-sweep relog" in refused.stderr


def test_sync_after_a_partial_upload_names_the_jobs_and_a_retry_completes(case: Case
                                                                         ) -> None:
    case.server.inject("file_stream", status=503, times=10_000)
    partial = case.tmgg_sweep("sync", "--upload-timeout", "8", "--verify-wait", "0",
                              *case.overrides)
    assert partial.returncode != 0
    assert f"NOT VERIFIED job {case.jobs['s1'].run_name}" in partial.stderr
    case.server.faults.clear()
    retried = case.tmgg_sweep("sync", *case.overrides)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert case.server.run(TEAM, PROJECT, run_id(case, "s1")).state == "finished"


# -- reconcile's advice, each run as printed ------------------------------------------------
def apply_advice(case: Case, rows: dict[str, object]) -> list[str]:
    commands = list(dict.fromkeys(row.advice for row in rows.values() if row.advice))
    for command in commands:
        done = case.shell(command)
        if done.returncode != 0:
            pytest.fail(f"advice failed: {command}\n{done.stdout[-3000:]}\n"
                        f"{done.stderr[-3000:]}", pytrace=False)
    return commands


def test_advice_for_finished_jobs_without_a_run_sync_and_relog(case: Case) -> None:
    code, rows = case.reconcile()
    assert code == 1
    assert {name: row.status for name, row in rows.items()} == {"s1": "missing",
                                                                 "s2": "missing"}
    assert rows["s1"].advice.startswith("tmgg-sweep sync ")  # its offline run is on disk
    assert rows["s2"].advice.startswith("tmgg-sweep relog ")  # W&B was disabled
    apply_advice(case, rows)
    code, rows = case.reconcile()
    assert code == 0 and {row.status for row in rows.values()} == {"ok"}
    relogged = case.server.run(TEAM, PROJECT, run_id(case, "s2"))
    assert relogged.state == "finished" and relogged.summary["tmgg/relogged"] is True
    assert relogged.display_name == case.jobs["s2"].run_name and relogged.group == "smoke"
    assert relogged.summary["test/mse"] >= 0 and "tmgg/checkpoint_sha256" in relogged.summary


def test_misrouted_runs_in_another_team_and_uncategorized_are_found_and_fixed(
        case: Case) -> None:
    case.server.plant_run("vision_team", PROJECT, run_id(case, "s1"),
                          display_name=case.jobs["s1"].run_name, group="smoke")
    case.server.plant_run("alice", "uncategorized", "stray0002",
                          display_name=case.jobs["s2"].run_name)
    code, rows = case.reconcile()
    assert code == 1
    assert rows["s1"].status == "misrouted" and "vision_team/" in rows["s1"].detail
    assert rows["s2"].status == "misrouted" and "alice/uncategorized/stray0002" \
        in rows["s2"].detail
    assert "tmgg-sweep relog" in rows["s1"].advice and ".delete()" in rows["s1"].advice
    apply_advice(case, rows)
    assert not case.server.runs_in(entity="vision_team")
    assert not case.server.runs_in(project="uncategorized")
    code, rows = case.reconcile()
    assert code == 0, {name: (row.status, row.detail) for name, row in rows.items()}
    # s1's generation-0 id was used offline: the re-logged run is generation 1.
    assert case.server.run(TEAM, PROJECT, run_id(case, "s1", 1)).state == "finished"


def test_advice_for_duplicated_foreign_running_and_unknown(case: Case) -> None:
    apply_advice(case, case.reconcile()[1])  # both jobs ok to start with
    # duplicated: someone logged the job's name under another id at the pinned place
    case.server.plant_run(TEAM, PROJECT, "dupl0001", display_name=case.jobs["s1"].run_name)
    # foreign: s2's own run deleted, a run of someone else with its name is all there is
    for run in case.server.runs_in(entity=TEAM):
        if run.display_name == case.jobs["s2"].run_name:
            case.server.delete_run(TEAM, PROJECT, run.name)
    case.server.plant_run(TEAM, PROJECT, "forn0001", display_name=case.jobs["s2"].run_name)
    code, rows = case.reconcile()
    assert (code, rows["s1"].status, rows["s2"].status) == (1, "duplicated", "foreign")
    apply_advice(case, rows)
    code, rows = case.reconcile()
    assert code == 0, {name: (row.status, row.detail) for name, row in rows.items()}

    # running: a killed run stays running, then the service marks it crashed (its
    # heartbeat times out: here when the test says so, not after a race with a timer)
    (own,) = [r for r in case.server.runs_in(entity=TEAM)
              if r.display_name == case.jobs["s1"].run_name]
    case.server.kill_run(TEAM, PROJECT, own.name, crash_after=3600)
    code, rows = case.reconcile()
    assert (code, rows["s1"].status) == (1, "running")
    assert rows["s1"].advice.startswith("tmgg-sweep status ")
    apply_advice(case, {"s1": rows["s1"]})
    case.server.kill_run(TEAM, PROJECT, own.name, crash_after=0)  # the heartbeat timed out
    code, rows = case.reconcile()
    assert (rows["s1"].status, rows["s1"].detail.endswith("crashed")) == ("failed", True)
    assert rows["s1"].advice.startswith("tmgg-sweep relog ")
    apply_advice(case, rows)

    # unknown: one search path (alice's own entity) answers 429 until the limit
    case.server.inject("Runs", status=429, retry_after=1, times=10_000,
                       match={"entity": "alice"})
    code, rows = case.reconcile(api_timeout=2)
    assert code == 1 and {row.status for row in rows.values()} == {"unknown"}
    assert "could not read alice/" in rows["s1"].detail
    assert rows["s1"].advice.startswith("tmgg-sweep reconcile --online ")
    case.server.faults.clear()
    apply_advice(case, rows)  # once the service answers again


def test_verification_waits_for_a_listing_that_lags_behind_a_finish(tmp_path: Path) -> None:
    import wandb

    from tmgg.cli.sync import verify_at_destination

    require_pinned_wandb()
    server = FakeWandbServer().start()
    try:
        alice = server.add_user("alice", teams=[TEAM])
        jobs = compose_sweep([*SWEEP, "seed=1", f"logger.base_url={server.base_url}",
                              *dirs(tmp_path)]).jobs
        run = server.plant_run(TEAM, PROJECT, wandb_run_id(jobs[0].job_id), state="running")
        run.summary = {"trainer/global_step": 4}
        server.listing_lag = 3.0  # the listing shows each state 3 s late
        run.set_state("finished")
        api = wandb.Api(overrides={"base_url": server.base_url}, api_key=alice.api_key)
        (late,) = verify_at_destination(api, TEAM, PROJECT, jobs, {}, SWEEP, wait=0)
        assert late.problem.endswith("is running, not finished")
        assert verify_at_destination(api, TEAM, PROJECT, jobs, {}, SWEEP, wait=15,
                                     poll=0.5) == []
    finally:
        server.stop()
