"""W&B online, end to end: the real wandb client against the test suite's W&B server.

Nothing inside wandb is replaced. Jobs run as subprocesses (the real app) with the
server reached through ``logger.base_url``; the server (``tests/wandb_server``)
resolves entities as the real service does and records every run for the asserts.
A second server, the decoy, stands for any other W&B host the environment or a
settings file names: it must never hear from a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from wandb_server import FakeWandbServer
from wandb_server.fixtures import PROJECT, TEAM, online_env, user

from tmgg.config.identity import wandb_run_id
from tmgg.jobs.compose import compose_sweep

TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
ONE_JOB = ["stage=smoke", "model=linear_pe", "seed=1", *TINY]


def dirs(root: Path) -> list[str]:
    return [f"experiments_dir={root / 'exp'}", f"outputs_dir={root / 'out'}"]


def run_module(root: Path, module: str, args: list[str], env: dict[str, str],
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", module, *args, *dirs(root)], cwd=root,
                          text=True, capture_output=True, env=env, timeout=timeout)


def job_records(root: Path, stage: str = "smoke") -> dict[str, dict]:
    jobs = root / "exp" / stage / "jobs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))}


def app_logs(root: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((root / "out").rglob("app.log")))


# -- the incident, reproduced by the fake --------------------------------------------
def test_incident_replay_wandb_init_without_entity_lands_in_the_personal_entity(
        wandb_server: FakeWandbServer, tmp_path: Path) -> None:
    """The earlier system's call: no entity. The server picks the key's own entity."""
    alice = user(wandb_server, "alice")
    code = ("import wandb\n"
            f"run = wandb.init(project={PROJECT!r}, name='stage1_linear_pe_lr1e-3_wd1e-2_k8_s1',"
            " group='stage1')\n"
            "run.log({'train/loss': 0.5})\n"
            "print('LIVE', run.entity, run.project, run.id)\n"
            "run.finish()\n")
    env = online_env(tmp_path, alice.api_key, WANDB_BASE_URL=wandb_server.base_url,
                     WANDB_MODE="online", WANDB_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True,
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [r for r in wandb_server.runs_in(project=PROJECT)
              if r.display_name == "stage1_linear_pe_lr1e-3_wd1e-2_k8_s1"]
    assert run.entity == "alice"  # the key's personal entity, not graph_denoise_team
    assert f"LIVE alice {PROJECT} {run.name}" in result.stdout
    assert (run.state, run.exit_code, run.group) == ("finished", 0, "stage1")
    assert run.history_rows[0]["train/loss"] == 0.5
    # Nothing of this call at the team (other tests of this module share the server).
    assert not [r for r in wandb_server.runs_in(entity=TEAM)
                if r.display_name == "stage1_linear_pe_lr1e-3_wd1e-2_k8_s1"]


# -- the smoke sweep online, with every other source pointing elsewhere ----------------
@dataclass
class OnlineSweep:
    root: Path
    result: subprocess.CompletedProcess[str]
    server: FakeWandbServer
    decoy: FakeWandbServer


@pytest.fixture(scope="module")
def decoy_server() -> Iterator[FakeWandbServer]:
    """Another W&B host, where the environment and settings files point."""
    decoy = FakeWandbServer().start()
    decoy.add_user("alice", teams=[TEAM])
    decoy.add_user("someone_personal")
    yield decoy
    decoy.stop()


# Projects that other tests of this module create on the shared server.
OTHER_TESTS_PROJECTS = {"deleted_case", "server_behaviour"}


@pytest.fixture(scope="module")
def online_sweep(wandb_server: FakeWandbServer, decoy_server: FakeWandbServer,
                 tmp_path_factory: pytest.TempPathFactory) -> OnlineSweep:
    root = tmp_path_factory.mktemp("online-sweep")
    stray = (f"[default]\nbase_url = {decoy_server.base_url}\nentity = someone_personal\n"
             "project = elsewhere\nmode = disabled\n")
    for settings in (root / "wandb-config" / "settings", root / "wandb" / "settings"):
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(stray)
    env = online_env(root, user(wandb_server, "alice").api_key,
                     WANDB_BASE_URL=decoy_server.base_url, WANDB_MODE="offline",
                     WANDB_ENTITY="someone_personal", WANDB_PROJECT="elsewhere",
                     WANDB_RUN_ID="strayrun1", WANDB_RUN_GROUP="stray_group")
    # Two jobs are enough to show every run lands pinned (and keep this test cheap).
    result = run_module(root, "tmgg.cli.app", ["-m", "stage=smoke", "model=linear_pe",
                                           "logger.mode=online",
                                           f"logger.base_url={wandb_server.base_url}",
                                           "hydra.launcher.n_workers=2", *TINY], env)
    return OnlineSweep(root, result, wandb_server, decoy_server)


@pytest.mark.slow
def test_online_smoke_sweep_lands_every_run_in_the_pinned_destination(
        online_sweep: OnlineSweep) -> None:
    result, server = online_sweep.result, online_sweep.server
    assert result.returncode == 0, result.stderr[-4000:]
    records = job_records(online_sweep.root)
    assert len(records) == 2 and all(r["status"] == "FINISHED" for r in records.values())
    runs = server.runs_in(entity=TEAM, project=PROJECT)
    # One run per job, each under the job's own id, name and the stage's group.
    assert sorted(run.name for run in runs) == sorted(r["wandb"]["run_id"] for r in
                                                      records.values())
    for record in records.values():
        run = server.run(TEAM, PROJECT, record["wandb"]["run_id"])
        assert run.name == wandb_run_id(record["job_id"])
        assert (run.display_name, run.group) == (record["run_name"], "smoke")
        assert (run.state, run.exit_code) == ("finished", 0)
        assert run.history_rows and "wandb-summary.json" in run.files
        assert record["wandb"]["mode"] == "online"
        assert record["wandb"]["base_url"] == server.base_url
        assert record["wandb"]["path"] == f"{TEAM}/{PROJECT}/{run.name}"
    names = {record["run_name"] for record in records.values()}
    # Every run with a job's name, wherever it is, less the projects that other tests of
    # this module (which shares the server, in any order) fill with the same smoke job.
    named = [run for run in server.runs_in() if run.display_name in names
             and run.project not in OTHER_TESTS_PROJECTS]
    assert len(named) == 2 and {(r.entity, r.project) for r in named} == {(TEAM, PROJECT)}
    assert not server.runs_in(entity="someone_personal")
    assert not server.runs_in(project="elsewhere")
    # The other host never heard from a job.
    assert online_sweep.decoy.operations == [] and not online_sweep.decoy.runs_in()
    plan = json.loads((online_sweep.root / "exp" / "smoke" / "plan.json").read_text())
    assert {job["wandb"]["mode"] for job in plan["jobs"]} == {"online"}
    assert {job["wandb"]["base_url"] for job in plan["jobs"]} == {server.base_url}
    # Each overridden source is named in the job's warning.
    logs = app_logs(online_sweep.root)
    for named in ("WANDB_ENTITY=someone_personal", "WANDB_PROJECT=elsewhere",
                  f"WANDB_BASE_URL={online_sweep.decoy.base_url}", "WANDB_MODE=offline",
                  "WANDB_RUN_ID=strayrun1", "WANDB_RUN_GROUP=stray_group",
                  f"settings: base_url={online_sweep.decoy.base_url}",
                  "settings: mode=disabled"):
        assert named in logs, named


# -- plan-time access check, against the server's real viewer -------------------------
def test_key_without_access_to_the_entity_is_refused_before_dispatch(
        wandb_server: FakeWandbServer, tmp_path: Path) -> None:
    env = online_env(tmp_path, user(wandb_server, "mallory").api_key)
    result = run_module(tmp_path, "tmgg.cli.app",
                        ["-m", "stage=smoke", "model=linear_pe", "logger.mode=online",
                         f"logger.base_url={wandb_server.base_url}", *TINY], env)
    assert result.returncode != 0
    assert (f"the W&B API key of user 'mallory' cannot write to entity '{TEAM}' on "
            f"{wandb_server.base_url}; it can write to mallory") in result.stderr
    assert not (tmp_path / "exp" / "smoke").exists()  # nothing planned, nothing dispatched
    assert not list((tmp_path / "out").rglob("app.log"))
    assert not wandb_server.runs_in(entity="mallory")


def test_plan_check_asks_the_pinned_host_for_the_keys_access(
        wandb_server: FakeWandbServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
        ) -> None:
    from tmgg.jobs.plan import PlanError
    from tmgg.jobs.wandb_check import check_wandb_destinations

    online = ["stage=smoke", "model=linear_pe", "logger.mode=online", *dirs(tmp_path)]
    sweep = compose_sweep([*online, f"logger.base_url={wandb_server.base_url}"])
    monkeypatch.setenv("WANDB_API_KEY", user(wandb_server, "alice").api_key)
    check_wandb_destinations(sweep.jobs, sweep.master_config)  # alice is a team member
    monkeypatch.setenv("WANDB_API_KEY", user(wandb_server, "mallory").api_key)
    with pytest.raises(PlanError, match=f"user 'mallory' cannot write to entity '{TEAM}'"):
        check_wandb_destinations(sweep.jobs, sweep.master_config)
    # A host that does not answer cannot prove access: refused too (after wandb's own
    # HTTP timeout, which the plan check honours: 60 s unless set; nothing listens on
    # port 9, so 1 s proves the same as more).
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "1")
    closed = compose_sweep([*online, "logger.base_url=http://127.0.0.1:9"])
    with pytest.raises(PlanError, match="cannot check that the W&B API key may write"):
        check_wandb_destinations(closed.jobs, closed.master_config)
    # Offline jobs never ask.
    offline = compose_sweep([*online, "logger.mode=offline",
                             "logger.base_url=http://127.0.0.1:9"])
    check_wandb_destinations(offline.jobs, offline.master_config)


# -- a run that cannot be created stops the job before training ------------------------
def test_online_run_that_cannot_be_created_fails_the_job_before_training(
        wandb_server: FakeWandbServer, tmp_path: Path) -> None:
    env = online_env(tmp_path, user(wandb_server, "mallory").api_key)
    result = run_module(tmp_path, "tmgg.cli.app", [*ONE_JOB, "logger.mode=online",
                                               f"logger.base_url={wandb_server.base_url}"],
                        env)
    assert result.returncode != 0
    (record,) = job_records(tmp_path).values()
    assert record["status"] == "FAILED"
    assert "WandbRunError" in record["error"] and "stopped before training" in record["error"]
    assert f"refuses run {TEAM}/{PROJECT}/" in record["error"]
    assert "permission denied" in record["error"]
    (job_dir,) = (tmp_path / "out" / "smoke").iterdir()
    assert not (job_dir / "checkpoints").exists() and not (job_dir / "metrics.json").exists()
    assert not wandb_server.runs_in(entity="mallory")


# -- the mode is the config's -----------------------------------------------------------
def test_environment_cannot_disable_a_run(tmp_path: Path) -> None:
    """WANDB_MODE=disabled with logger.mode=auto and no key: the run is offline, not off."""
    from tmgg.cli.reconcile import read_run_file, run_files

    env = online_env(tmp_path, None, WANDB_MODE="disabled")
    result = run_module(tmp_path, "tmgg.cli.app", ONE_JOB, env)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = job_records(tmp_path).values()
    assert record["status"] == "FINISHED" and record["wandb"]["mode"] == "offline"
    (job_dir,) = (tmp_path / "out" / "smoke").iterdir()
    (run_file,) = run_files(job_dir)
    run = read_run_file(run_file)
    assert (run.entity, run.project, run.exit_code) == (TEAM, PROJECT, 0)
    assert run.history_rows > 0
    assert "WANDB_MODE=disabled" in app_logs(tmp_path)


def test_mode_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.task.loggers import decide_wandb_mode

    url = "http://127.0.0.1:9"
    no_key: dict[str, str] = {}
    assert decide_wandb_mode("auto", url, {"WANDB_MODE": "disabled"}).mode == "offline"
    assert decide_wandb_mode("auto", url, {"WANDB_MODE": "dryrun"}).mode == "offline"
    # auto follows the credentials for the pinned host: none, a netrc entry, a key.
    netrc = tmp_path / "netrc"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    assert decide_wandb_mode("auto", url, no_key).mode == "offline"
    # wandb's own lookup: the entry is the pinned URL's netloc (port included), as
    # `wandb login --host` writes it, and its key has wandb's 40+ characters.
    key = "k" * 40
    netrc.write_text(f"machine api.wandb.ai login user password {key}\n")
    assert decide_wandb_mode("auto", url, no_key).mode == "offline"  # another host's
    netrc.write_text(f"machine 127.0.0.1 login user password {key}\n")
    assert decide_wandb_mode("auto", url, no_key).mode == "offline"  # no port: another's
    netrc.write_text("machine 127.0.0.1:9 login user password x\n")
    assert decide_wandb_mode("auto", url, no_key).mode == "offline"  # not a key wandb takes
    netrc.write_text(f"machine 127.0.0.1:9 login user password {key}\n")
    assert decide_wandb_mode("auto", url, no_key).mode == "online"
    netrc.unlink()
    # the key in the environment decide_wandb_mode is given (the netrc is gone)
    assert decide_wandb_mode("auto", url, {"WANDB_API_KEY": key}).mode == "online"
    online = decide_wandb_mode("online", url, {"WANDB_MODE": "offline"})
    assert (online.mode, online.ignored) == ("online", ("WANDB_MODE=offline",))
    offline = decide_wandb_mode("offline", url, {"WANDB_MODE": "disabled"})
    assert (offline.mode, offline.ignored) == ("offline", ("WANDB_MODE=disabled",))
    assert decide_wandb_mode("disabled", url, {"WANDB_MODE": "online"}).mode == "disabled"


def test_guard_refuses_a_run_whose_mode_is_not_the_jobs(tmp_path: Path) -> None:
    import wandb

    from tmgg.task.wandb_guard import live_run_mode, mode_problem

    run = wandb.init(mode="disabled", dir=str(tmp_path))  # what WANDB_MODE=disabled made
    try:
        assert live_run_mode(run) == "disabled"
    finally:
        run.finish()
    assert mode_problem("online", "online") is None
    assert mode_problem("disabled", "online") == (
        "W&B run is disabled, job's mode is online (logger.mode; the environment cannot "
        "change it)")
    assert mode_problem("offline", "online") is not None


# -- a deleted run's id ------------------------------------------------------------------
@pytest.mark.slow
def test_deleted_run_id_fails_the_job_and_a_new_generation_starts_a_fresh_run(
        wandb_server: FakeWandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    from tmgg.cli.reconcile import main as reconcile_main
    from tmgg.cli.reconcile import reconcile_jobs

    host = f"logger.base_url={wandb_server.base_url}"
    project = "deleted_case"  # this test's own project on the module's server
    args = [*ONE_JOB, "logger.mode=online", host, f"logger.project={project}"]
    (job,) = compose_sweep([*args, *dirs(tmp_path)]).jobs
    old_id = wandb_run_id(job.job_id)
    wandb_server.plant_run(TEAM, project, old_id, display_name=job.run_name, group="smoke")
    wandb_server.delete_run(TEAM, project, old_id)  # someone deleted it in the UI
    alice = user(wandb_server, "alice").api_key
    # The service answers 409; wandb-core's run upsert retries it until init_timeout
    # (90 s) unless its GraphQL retries run out first: one retry, then the 409 is the
    # init's error (with the service's message) a few seconds in, whatever the load.
    env = online_env(tmp_path, alice, WANDB_INIT_TIMEOUT="60", WANDB__GRAPHQL_RETRY_MAX="1")
    refused = run_module(tmp_path, "tmgg.cli.app", args, env)
    assert refused.returncode != 0
    record = job_records(tmp_path)[job.job_id]
    assert record["status"] == "FAILED"
    assert f"refuses run id {TEAM}/{project}/{old_id}" in record["error"]
    assert "was deleted there" in record["error"]
    assert "relaunch it with logger.run_generation=1" in record["error"]
    (job_dir,) = (tmp_path / "out" / "smoke").iterdir()
    assert not (job_dir / "checkpoints").exists()

    monkeypatch.setenv("WANDB_API_KEY", alice)
    assert reconcile_main(["--online", *args, *dirs(tmp_path)]) == 1
    sweep = compose_sweep([*args, *dirs(tmp_path)])
    (row,) = reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage, mode="online",
                            overrides=[*args, *dirs(tmp_path)])
    assert row.status == "failed" and "refuses run id" in row.detail
    assert row.advice.startswith("tmgg-sweep resume ")
    assert row.advice.endswith(" logger.run_generation=1")

    # The advice, run as printed, relaunches the job as run generation 1.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    relaunched = subprocess.run(["bash", "-c", row.advice], cwd=tmp_path, text=True,
                                capture_output=True, env=env, timeout=600)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    record = job_records(tmp_path)[job.job_id]  # the same job, now finished
    new_id = wandb_run_id(job.job_id, 1)
    assert new_id != old_id and record["status"] == "FINISHED"
    assert record["wandb"]["run_id"] == new_id
    run = wandb_server.run(TEAM, project, new_id)
    assert run is not None and (run.state, run.display_name) == ("finished", job.run_name)
    assert reconcile_main(["--online", *args, "logger.run_generation=1", *dirs(tmp_path)]) == 0
    # A later generation is the job's own run: the stage as declared is ok too.
    assert reconcile_main(["--online", *args, *dirs(tmp_path)]) == 0


# -- sync: tests/test_sync.py (upload, verification, relog, advice) ----------------------


# -- 108 concurrent inits under a rate limit ----------------------------------------------
# Stage 1 as a user runs it (the real app, the local launcher, three fused groups of 36
# concurrent W&B runs, one per seed), at one training step: 108 real inits against the
# test server while it answers run creation and streaming with 429s.
STAGE1_TINY = ["stage=stage1", "logger.mode=online", "trainer.max_steps=1",
               "trainer.val_check_interval=1", "data.val_samples=10", "data.test_samples=10",
               "hydra.launcher.n_workers=3"]
RETRY_AFTER = 0.1  # seconds, the rate limit's Retry-After


@pytest.mark.slow
def test_108_concurrent_inits_under_a_rate_limit_land_pinned_or_fail_before_training(
        tmp_path: Path) -> None:
    server = FakeWandbServer().start()
    try:
        server.add_user("alice", teams=[TEAM])
        env = online_env(tmp_path, user(server, "alice").api_key, WANDB_INIT_TIMEOUT="30")
        overrides = [*STAGE1_TINY, f"logger.base_url={server.base_url}"]
        # The service's rate limit: 429 with Retry-After on run creation and streaming,
        # and without end for one job of each fused group (wandb gives its init up).
        # wandb-core waits what Retry-After says (seconds, fractions too) and gives a
        # request up after 21 attempts: 0.1 s keeps every 429 and every retry, and spends
        # 2 s, not 20 s, on each init that fails (the fused inits run one after another).
        jobs = compose_sweep([*overrides, *dirs(tmp_path)]).jobs
        refused_jobs = {job.job_id for job in jobs[::36]}
        for job_id in refused_jobs:
            server.inject("UpsertBucket", status=429, retry_after=RETRY_AFTER, times=10**6,
                          match={"name": wandb_run_id(job_id)})
        server.inject("UpsertBucket", status=429, retry_after=RETRY_AFTER, times=150)
        server.inject("file_stream", status=429, retry_after=RETRY_AFTER, times=100)
        sweep = run_module(tmp_path, "tmgg.cli.app", ["-m", *overrides], env, timeout=1200)
        assert server.refused.count("429: rate limit exceeded (injected)") >= 150
        records = job_records(tmp_path, "stage1")
        assert len(records) == 108, sweep.stderr[-3000:]
        pinned = {f"{TEAM}/{PROJECT}/{wandb_run_id(job_id)}" for job_id in records}
        failed = {job_id for job_id, record in records.items() if record["status"] != "FINISHED"}
        assert len(refused_jobs) == 3 and refused_jobs <= failed, sweep.stderr[-3000:]
        for job_id, record in records.items():
            if job_id in failed:  # failed before training: no step, no checkpoint
                assert record["status"] == "FAILED", record
                assert "W&B" in record["error"], record["error"]
                assert not list(Path(record["output_dir"]).glob("checkpoints/*.ckpt"))
            else:
                assert record["wandb"]["path"] in pinned and record["metrics"][
                    "global_step"] == 1
        assert (sweep.returncode == 0) is not failed, sweep.stderr[-3000:]
        # No run anywhere but the pinned place, whatever the 429s did.
        assert {(run.entity, run.project) for run in server.runs_in()} <= {(TEAM, PROJECT)}
        assert {f"{run.entity}/{run.project}/{run.name}" for run in server.runs_in()} <= pinned

        server.faults.clear()  # the rate limit passes; `resume` runs what failed
        resumed = run_module(tmp_path, "tmgg.cli.tmgg_sweep", ["resume", *overrides], env,
                             timeout=1200)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert f"{len(failed)} to run" in resumed.stdout, resumed.stdout[-2000:]
        records = job_records(tmp_path, "stage1")
        assert {record["status"] for record in records.values()} == {"FINISHED"}
        reconcile = run_module(tmp_path, "tmgg.cli.tmgg_sweep",
                               ["reconcile", "--online", *overrides], env)
        assert reconcile.returncode == 0, reconcile.stdout[-3000:] + reconcile.stderr[-2000:]
        runs = server.runs_in()
        assert {f"{run.entity}/{run.project}/{run.name}" for run in runs} == pinned
        assert len(runs) == 108 and {run.state for run in runs} == {"finished"}
        assert not server.repeated_offsets  # no run id had two writers
    finally:
        server.stop()


# -- the test server behaves like the service where the checks depend on it ------------
def post(server: FakeWandbServer, path: str, key: str, body: dict) -> tuple[int, dict, dict]:
    """One request as the client sends it: status, JSON body, headers."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.base_url}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def upsert(server: FakeWandbServer, key: str, **variables: str) -> tuple[int, dict, dict]:
    return post(server, "/graphql", key, {"operationName": "UpsertBucket",
                                          "query": "mutation UpsertBucket",
                                          "variables": variables})


def test_server_states_faults_and_the_append_only_file_stream(
        wandb_server: FakeWandbServer) -> None:
    key = user(wandb_server, "alice").api_key
    project = "server_behaviour"
    status, _, _ = upsert(wandb_server, key, entity=TEAM, project=project, name="r1")
    assert status == 200 and wandb_server.run(TEAM, project, "r1").state == "running"
    stream = f"/files/{TEAM}/{project}/r1/file_stream"
    line = {"files": {"wandb-history.jsonl": {"offset": 0, "content": ['{"a": 1}']}}}
    assert post(wandb_server, stream, key, line)[0] == 200
    # A second writer of the same run id sends offset 0 again: kept out, and flagged.
    assert post(wandb_server, stream, key, line)[0] == 200
    assert wandb_server.run(TEAM, project, "r1").history == ['{"a": 1}']
    assert wandb_server.repeated_offsets == [f"{TEAM}/{project}/r1 wandb-history.jsonl @0"]
    # The console log is not a history: a changed line comes again at its offset and
    # replaces the old one (a progress bar), with no flag.
    for text in ("epoch 0: 10%", "epoch 0: 100%"):
        console = {"files": {"output.log": {"offset": 0, "content": [text]}}}
        assert post(wandb_server, stream, key, console)[0] == 200
    assert wandb_server.run(TEAM, project, "r1").logs == ["epoch 0: 100%"]
    assert len(wandb_server.repeated_offsets) == 1
    post(wandb_server, stream, key, {"complete": True, "exitcode": 0})
    assert wandb_server.run(TEAM, project, "r1").state == "finished"
    # Resumed: running again, as the service keeps it.
    upsert(wandb_server, key, entity=TEAM, project=project, name="r1")
    assert wandb_server.run(TEAM, project, "r1").state == "running"
    # Failures on demand, on the chosen operation only, with Retry-After.
    wandb_server.inject("UpsertBucket", status=429, retry_after=2, match={"name": "r2"})
    status, body, headers = upsert(wandb_server, key, entity=TEAM, project=project, name="r2")
    assert (status, headers.get("Retry-After")) == (429, "2")
    assert body["errors"][0]["message"] == "rate limit exceeded (injected)"
    assert upsert(wandb_server, key, entity=TEAM, project=project, name="r2")[0] == 200
    wandb_server.inject("file_stream", status=503)
    assert post(wandb_server, stream, key, {})[0] == 503
    # A killed run stays running until its heartbeat times out, then it is crashed.
    wandb_server.kill_run(TEAM, project, "r2", crash_after=0.5)
    moment = time.monotonic()
    assert wandb_server.run(TEAM, project, "r2").state_at(moment) == "running"
    assert wandb_server.run(TEAM, project, "r2").state_at(moment + 1) == "crashed"
    # Users without a personal entity: their runs without an entity go to their team.
    newcomer = wandb_server.add_user("newcomer2", teams=["vision"], default_entity="vision",
                                     personal=False)
    upsert(wandb_server, newcomer.api_key, project=project, name="r3")
    assert wandb_server.run("vision", project, "r3") is not None
    status, body, _ = upsert(wandb_server, newcomer.api_key, entity="newcomer2",
                             project=project, name="r4")
    assert status == 404  # no such entity: the account has no personal one

