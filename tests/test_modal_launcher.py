"""hydra/launcher=modal through its local transport: the whole dispatch path, offline.

Modal's servers are out of reach here, so every sweep runs with
``hydra.launcher.transport=local``: payloads are cloudpickled as they would be sent
and run by the remote function's own body (``Function.local()``) in worker processes
standing in for containers. ``transport=modal`` is tested only where it must fail
before any network call (no credentials).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, run_cli, tmgg_sweep, tmgg_train
from holds import BROKEN_RUN_S, held_files, wait_for_holds
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from tmgg.config.identity import wandb_run_id
from tmgg.jobs import claims
from tmgg.jobs.ledger import CANCELLED, FAILED, FINISHED, IN_FLIGHT, Ledger
from tmgg.jobs.process_identity import ProcessIdentity
from tmgg.launch import snapshot_volume
from tmgg.launch.cost import LauncherSettingError, normalize_gpu, plan_estimates
from tmgg.launch.modal.calls import local_call_process, poll_detached
from tmgg.launch.modal.settings import ModalSettings
from tmgg.launch.modal.transport import LocalContainers
from tmgg.run.executor import JobFailure, serialize

LOCAL = ["hydra/launcher=modal", "hydra.launcher.transport=local"]
# A few steps and samples where an assertion is about records and returns, not training.
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_samples=20",
        "data.test_samples=20"]
ONE_CONTAINER = [*LOCAL, "hydra.launcher.local_containers=1"]


@pytest.mark.parametrize("launcher_name, overrides", [("modal", ONE_CONTAINER[1:])])
class TestModalLauncher(LauncherTestSuite):
    """Hydra's launcher conformance suite (one warm local container runs every job)."""


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", *ONE_CONTAINER])])
class TestModalLauncherIntegration(IntegrationTestSuite):
    """Hydra's integration suite: the plugin is discovered and runs real apps."""


def _no_modal_env(home: Path) -> dict[str, str]:
    """An environment without any Modal token: none in env, HOME without ~/.modal.toml."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MODAL_TOKEN") and k != "MODAL_CONFIG_PATH"}
    env["HOME"] = str(home)
    return env


def _events(ledger: Ledger, kind: str) -> list[dict]:
    return [e for e in ledger.events() if e["event"] == kind]


def test_plugin_import_imports_neither_modal_nor_torch() -> None:
    code = textwrap.dedent("""
        import sys
        import hydra_plugins.tmgg_launchers.modal_launcher
        heavy = [n for n in ("modal", "torch", "lightning", "wandb") if n in sys.modules]
        from hydra.core.plugins import Plugins
        from hydra.core.config_store import ConfigStore
        from hydra.plugins.launcher import Launcher
        names = [c.__name__ for c in Plugins.instance().discover(Launcher)]
        node = ConfigStore.instance().load("hydra/launcher/modal.yaml").node
        heavy += [n for n in ("modal", "torch") if n in sys.modules]
        print(heavy, "TmggModalLauncher" in names, node.transport, node.retries.max_retries)
    """)
    result = run_cli(["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True", "modal", "2"]


def test_smoke_stage_finishes_with_every_job_in_the_ledger(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", "stage=smoke", "logger=csv", *LOCAL, *TINY,
                        "hydra.launcher.local_containers=2", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    states = ledger.states()
    assert len(states) == 6 and {s.status for s in states.values()} == {FINISHED}
    for state in states.values():
        record = state.record
        assert record["launcher"] == "modal" and record["modal"]["transport"] == "local"
        assert record["metrics"]["test/mse"] >= 0
        assert record["metrics"]["job_id"] == state.job_id
        metrics = json.loads((Path(record["output_dir"]) / "metrics.json").read_text())
        assert metrics["run_name"] == state.run_name
    assert len(_events(ledger, "dispatched")) == 6 and len(_events(ledger, "outcome")) == 6
    assert "FINISHED" in result.stderr  # the outcome table


FAILING_APP = """
import hydra
from tmgg.cli.app import train
from tmgg.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg):
    if int(cfg.seed) == 2:
        raise RuntimeError("injected failure inside the job for seed 2")
    return train(cfg)


if __name__ == "__main__":
    main()
"""


def test_job_raising_remotely_is_a_failed_return_and_the_others_finish(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    app = tmp_path / "failing_app.py"
    app.write_text(FAILING_APP)
    result = run_cli([str(app), "-m", "stage=smoke", "logger=csv", "model=linear_pe", *LOCAL,
                      *TINY, "hydra.launcher.retries.max_retries=0", *sweep_dirs.overrides])
    assert result.returncode != 0
    states = {s.run_name: s for s in Ledger(sweep_dirs.experiments, "smoke").states().values()}
    ok, bad = states["smoke_linear_pe_lr1e-3_wd1e-2_k8_s1"], states[
        "smoke_linear_pe_lr1e-3_wd1e-2_k8_s2"]
    assert ok.status == FINISHED and ok.metrics["test/mse"] >= 0
    assert bad.status == FAILED
    # The remote error and its traceback, as text, in the ledger and on the console.
    assert "injected failure inside the job for seed 2" in bad.error
    # (cloudpickle 3 names a by-value function's file "<dynamic-code>", 2.x keeps it.)
    assert "Remote traceback" in bad.error and "in main" in bad.error
    assert "injected failure inside the job for seed 2" in result.stderr


def test_killed_job_resumes_from_its_checkpoint_with_the_same_wandb_run(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    """The sweep (launcher and container) is SIGKILLed while its job is held at step 2
    (``tmgg.task.hold``), its step-2 checkpoint committed: a rerun resumes from it."""
    from holds import hold_env, wait_for_holds

    volume = tmp_path / "volume"
    args = ["-m", "stage=smoke", "model=linear_pe", "seed=1", "logger=wandb",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_samples=20",
            "data.test_samples=20", *LOCAL, f"hydra.launcher.local_volume_dir={volume}",
            *sweep_dirs.overrides]
    env = hold_env(2, tmp_path / "release",
                   {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for_holds(tmp_path / "release", 1, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # launcher and containers, no clean-up
        process.wait()
    (job_dir,) = list(volume.glob("outputs/smoke/*"))
    assert not (job_dir / "metrics.json").exists()  # killed mid-training

    rerun = run_cli(["-m", "tmgg.cli.app", *args], env={"WANDB_MODE": "offline"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    state = next(iter(Ledger(sweep_dirs.experiments, "smoke").states().values()))
    assert state.status == FINISHED
    assert state.record["modal"]["volume_path"] == f"outputs/smoke/{job_dir.name}"
    # Both attempts logged to one W&B run: offline run folders carry the run id.
    run_id = wandb_run_id(state.job_id)
    assert _wandb_runs(volume, job_dir) == [run_id, run_id]
    assert metrics["wandb_path"].endswith(f"/{run_id}")
    # The volume was committed after checkpoints and at the end of the job.
    commits = [op["reason"] for op in _volume_log(volume) if op["op"] == "commit"]
    assert any(r.startswith("checkpoint") and r.endswith("last.ckpt") for r in commits)
    assert commits[-1] == "job end"
    # The job's own record landed on the (stand-in) volume too.
    assert (volume / "experiments/smoke/jobs" / f"{state.job_id}.json").exists()


def _volume_log(volume: Path) -> list[dict]:
    """The stand-in volume's commits and reloads, in order."""
    return [json.loads(line) for line in
            (volume / ".volume-commits.jsonl").read_text().splitlines()]


def _wandb_runs(volume: Path, job_dir: Path) -> list[str]:
    """Run ids of the job's W&B run folders: the finished attempt's, copied onto the
    volume, and a lost attempt's, left on its container's own disk."""
    disks = volume.parent / f".{volume.name}-container-disks"
    folders = [*job_dir.glob("wandb/offline-run-*"),
               *disks.glob(f"*/outputs/smoke/{job_dir.name}/wandb/offline-run-*")]
    return [folder.name.rsplit("-", 1)[1] for folder in folders]


def test_container_lost_once_resumes_from_its_committed_checkpoint(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    """A container that dies mid-training (SIGKILL, no clean-up) after a checkpoint commit
    is retried, as Modal retries a lost input, and the retry reloads the volume and
    continues from that checkpoint's step under the same W&B run, not from step 0.

    The stand-in volume refuses a commit while files under it are open in the
    container, as Modal's does, so every commit succeeding shows the job kept its open
    files (W&B's, Hydra's log) off the volume or closed them.
    """
    volume, marker = tmp_path / "volume", tmp_path / "killed.json"
    victim = "smoke_linear_pe_lr1e-3_wd1e-2_k8_s1"
    result = run_cli([str(REPO / "tests/apps/killed_train.py"), "-m", "stage=smoke",
                      "model=linear_pe", "seed=1", "logger=wandb", "trainer.max_steps=80",
                      "trainer.val_check_interval=20", *LOCAL,
                      "hydra.launcher.retries.initial_delay=0",
                      f"hydra.launcher.local_volume_dir={volume}", *sweep_dirs.overrides],
                     env={"WANDB_MODE": "offline", "TMGG_TEST_KILL_RUN": victim,
                          "TMGG_TEST_KILL_STEP": "50", "TMGG_TEST_KILL_ONCE": str(marker)})
    assert result.returncode == 0, result.stderr[-3000:]
    killed = json.loads(marker.read_text())
    assert killed == {"killed_at": 50, "checkpoint_step": 40}
    (job_dir,) = list(volume.glob("outputs/smoke/*"))
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed["checkpoint_step"]
    assert metrics["global_step"] == 80
    (state,) = Ledger(sweep_dirs.experiments, "smoke").states().values()
    assert state.status == FINISHED
    own = json.loads((volume / "experiments/smoke/jobs" / f"{state.job_id}.json").read_text())
    assert own["status"] == FINISHED and own["attempts"] == 2  # the job's record on the volume
    run_id = wandb_run_id(state.job_id)
    assert _wandb_runs(volume, job_dir) == [run_id, run_id]
    assert metrics["wandb_path"].endswith(f"/{run_id}")
    operations = _volume_log(volume)
    assert [op for op in operations if op["error"]] == []
    first, retry = operations[0]["pid"], operations[-1]["pid"]
    assert first != retry  # the lost container's inputs went to a fresh one
    assert any(op["op"] == "commit" and op["reason"].endswith("last.ckpt")
               for op in operations if op["pid"] == first)
    retried = [op for op in operations if op["pid"] == retry]
    assert retried[0] == {**retried[0], "op": "reload", "reason": "job start"}
    assert retried[-1]["reason"] == "job end"
    # One commit per validation round (best and last checkpoints together): 4 rounds
    # of 20 steps, at 20 and 40 in the lost container, 60 and 80 in the retry.
    checkpoint_commits = [op["pid"] for op in operations if op["op"] == "commit"
                          and op["reason"].startswith("checkpoints")]
    assert checkpoint_commits == [first, first, retry, retry]
    if snapshot_volume.supported():  # each container worked on its own view of it
        assert (volume.parent / f".{volume.name}-container-views").is_dir()


def test_unknown_gpu_is_refused_before_dispatch(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", "stage=smoke", "logger=csv", *LOCAL, "hydra.launcher.gpu=T5",
                        *sweep_dirs.overrides)
    assert result.returncode != 0
    assert "hydra.launcher.gpu" in result.stderr and "'T5'" in result.stderr
    assert not _events(Ledger(sweep_dirs.experiments, "smoke"), "dispatched")


def test_gpu_names() -> None:
    assert normalize_gpu("A10G") == "A10"
    assert normalize_gpu("h100:2") == "H100:2"
    assert normalize_gpu(None) is None
    for bad in ("T5", "A100", "H100:0", "H100:x", "A10G-24GB", "A10:8", "T4:9"):
        with pytest.raises(LauncherSettingError, match=r"hydra\.launcher\.gpu"):
            normalize_gpu(bad)
    assert ModalSettings.from_params({"gpu": "a10g", "transport": "local"}).gpu == "A10"


def test_a10g_plans_as_a10_and_the_plan_compares_cpu_only(sweep_dirs: SweepDirs) -> None:
    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(["stage=smoke", "hydra/launcher=modal", "hydra.launcher.gpu=A10G",
                           "hydra.launcher.fuse=off", *sweep_dirs.overrides])
    rows = plan_estimates(sweep.master_config, sweep.jobs)
    assert len(rows) == 6
    for row in rows:
        assert row["gpu"] == "A10"
        assert row["est_gpu_seconds"] == 5  # stage.gpu_seconds_per_job of the smoke stage
        assert 0 < row["est_cost_cpu_usd"] < row["est_cost_usd"]
    stage1 = compose_sweep(["stage=stage1", "hydra/launcher=local", "model=linear_pe",
                            "optimizer.lr=1e-3", "optimizer.weight_decay=1e-2", "model.k=8",
                            "seed=1", "stage.gpu_seconds_per_job=null", *sweep_dirs.overrides])
    (row,) = plan_estimates(stage1.master_config, stage1.jobs)
    assert row["gpu"] is None and row["est_cost_usd"] is None  # not billed through Modal
    assert row["est_gpu_seconds"] == pytest.approx(20 + 10000 * 0.0144)


def test_sweep_over_its_cost_limit_is_refused(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", "stage=smoke", "logger=csv", *LOCAL,
                        "hydra.launcher.max_cost_usd=0.001", *sweep_dirs.overrides)
    assert result.returncode != 0
    assert "hydra.launcher.max_cost_usd" in result.stderr and "exceeds" in result.stderr
    assert not list(Ledger(sweep_dirs.experiments, "smoke").events())  # not even planned


def test_modal_transport_without_credentials_fails_fast(sweep_dirs: SweepDirs,
                                                        tmp_path: Path) -> None:
    """Refused from the environment alone: no connection to Modal's server is even
    tried (so nothing waits on, or retries, a network call), and nothing is planned."""
    # Modal's client takes its server from MODAL_SERVER_URL: a socket that only listens
    # stands in for it. The kernel completes a client's connect even if nobody accepts,
    # so after the run a connection attempt would be waiting in the backlog.
    modal_server = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        host, port = modal_server.getsockname()[:2]
        env = {**_no_modal_env(tmp_path / "home"), "MODAL_SERVER_URL": f"http://{host}:{port}"}
        result = subprocess.run(
            [sys.executable, "-m", "tmgg.cli.app", "-m", "stage=smoke", "logger=csv",
             "hydra/launcher=modal", *sweep_dirs.overrides],
            cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
        modal_server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection was attempted
            modal_server.accept()
    finally:
        modal_server.close()
    assert result.returncode == 2
    assert result.stderr.count("Modal credentials were not found") == 1  # one refusal
    assert "Run `modal token new`" in result.stderr and "Nothing was dispatched" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(Ledger(sweep_dirs.experiments, "smoke").events())  # not even planned
    assert not sweep_dirs.outputs.exists() or not list(sweep_dirs.outputs.rglob("*.log"))


MISSING_SECRET_APP = """
import modal

from tmgg.cli.app import main


class MissingSecret:
    \"\"\"What Modal's server answers for a Secret that does not exist (unreachable here).\"\"\"

    def __init__(self, name, **kwargs):
        self.name = name

    def hydrate(self):
        raise modal.exception.NotFoundError(f"Secret '{self.name}' not found in environment 'main'")


modal.Secret.from_name = MissingSecret

if __name__ == "__main__":
    main()
"""


def test_missing_wandb_secret_is_refused_before_the_plan_is_recorded(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _no_modal_env(home)
    (home / ".modal.toml").write_text('[default]\ntoken_id = "ak-test"\n'
                                      'token_secret = "as-test"\n')
    app = tmp_path / "missing_secret_app.py"
    app.write_text(MISSING_SECRET_APP)
    result = subprocess.run(
        [sys.executable, str(app), "-m", "stage=smoke", "logger=csv", "hydra/launcher=modal",
         *sweep_dirs.overrides], cwd=REPO, env=env, text=True, capture_output=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sweep refused, nothing dispatched" in result.stderr
    assert "hydra.launcher.wandb_secret" in result.stderr
    assert "`modal secret create wandb WANDB_API_KEY=...`" in result.stderr
    assert "not found in environment 'main'" in result.stderr
    assert not list(Ledger(sweep_dirs.experiments, "smoke").events())  # not even planned


class _Exit:
    """Unpickling this kills the process: a container lost mid-input."""

    def __reduce__(self) -> tuple:
        return (os._exit, (3,))


class _Sleep:
    def __reduce__(self) -> tuple:
        return (time.sleep, (60,))


def test_local_containers_follow_modal_semantics() -> None:
    """Outputs as they finish, failures returned as exceptions, lost containers and
    timeouts retried."""
    settings = ModalSettings(transport="local", timeout_s=1, max_retries=1, initial_delay=0.0,
                             max_delay=1.0, wandb_secret=None)
    inputs = [(serialize(_Sleep()), None), (serialize(_Exit()), None), (b"not a pickle", None)]
    started = time.monotonic()
    arrived = list(LocalContainers(settings, size=3).map(inputs))
    outputs = dict(arrived)
    assert sorted(outputs) == [0, 1, 2] and len(arrived) == 3
    assert all(isinstance(o, JobFailure) for o in outputs.values())
    assert [outputs[i].error_type for i in range(3)] == ["FunctionTimeoutError",
                                                         "ContainerCrashed", "UnpicklingError"]
    assert "exited with code 3" in outputs[1].message
    assert "Traceback" in outputs[2].remote_traceback  # raised in the container's body
    # As they finish, not in input order: the bad pickle's retry runs at once in its
    # warm container, while input 0 runs into its time-out twice.
    assert arrived[0][0] == 2
    assert time.monotonic() - started < 40


class _WhereFrom:
    """Unpickled in a container, this reports where its code and conf/ come from."""

    def __reduce__(self) -> tuple:
        return (exec, ("import json, os, sys, tmgg, tmgg.config, "
                       "hydra_plugins.tmgg_launchers as plugins\n"
                       "raise RuntimeError(json.dumps([tmgg.__file__, plugins.__file__, "
                       "str(tmgg.config.CONF_DIR), "
                       "os.stat(tmgg.__file__).st_mode & 0o222]))",))


def test_local_containers_run_from_read_only_copies_at_the_images_layout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TMGG_CONF_DIR", raising=False)
    settings = ModalSettings(transport="local", max_retries=0, wandb_secret=None)
    ((_, failure),) = list(LocalContainers(settings, size=1).map(
        [(serialize(_WhereFrom()), None)]))
    package, plugins, conf, writable = json.loads(failure.message)
    root = Path(package).parents[2]
    assert Path(package) == root / "root/tmgg/__init__.py"
    assert Path(plugins) == root / "root/hydra_plugins/tmgg_launchers/__init__.py"
    assert Path(conf) == root / "conf" and REPO not in Path(package).parents
    assert writable == 0  # read-only copies
    assert not root.exists()  # removed with the containers


class _SpawnedCall:
    """A FunctionCall's contract as the Modal runner uses it: get() waits, then returns
    the output or raises the input's failure (Modal's servers are out of reach)."""

    def __init__(self, seconds: float, output: object) -> None:
        self.seconds, self.output = seconds, output

    def get(self) -> object:
        time.sleep(self.seconds)
        if isinstance(self.output, BaseException):
            raise self.output
        return self.output


class _SpawningFunction:
    def spawn(self, payload: tuple[float, object], volume: str | None) -> _SpawnedCall:
        return _SpawnedCall(*payload)


def test_modal_runner_yields_each_output_as_its_call_finishes() -> None:
    """One slow job holds back no finished one, and a failure stays pinned on its input."""
    from tmgg.launch.modal.transport import _ModalRunner

    lost = RuntimeError("container lost")
    inputs = [((1.0, b"slow"), "vol"), ((0.0, lost), "vol"), ((0.3, b"fast"), "vol")]
    arrived = list(_ModalRunner(_SpawningFunction()).map(inputs))
    assert arrived == [(1, lost), (2, b"fast"), (0, b"slow")]


def test_detached_sweep_is_polled_and_cancelled(sweep_dirs: SweepDirs) -> None:
    """Each job holds at step 1 until the test lets it through (``tmgg.task.hold``): the
    first is let through and finishes, the second is held when it is cancelled, however
    fast the machine."""
    release = sweep_dirs.root / "release"
    result = tmgg_train("-m", "stage=smoke", "logger=csv", "model=linear_pe", *LOCAL,
                        "hydra.launcher.detach=true", "hydra.launcher.local_containers=1",
                        *sweep_dirs.overrides,
                        env={"TMGG_TEST_HOLD_AT_STEP": "1", "TMGG_TEST_HOLD_FILE": str(release)})
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    dispatched = _events(ledger, "dispatched")
    assert len(dispatched) == 2 and all(e["call_id"].startswith("local-fc-")
                                        for e in dispatched)
    assert not _events(ledger, "outcome")  # the launcher returned without waiting

    wait_for_holds(release, 1)
    release.touch()  # the first job goes on; one container slot: then the second starts
    wait_for_holds(release, 2)
    deadline = time.monotonic() + BROKEN_RUN_S  # a bound for a broken run, not a race
    while FINISHED not in {s.status for s in ledger.states().values()}:
        assert time.monotonic() < deadline, "the first job's outcome never folded"
        poll_detached(ledger)
        time.sleep(0.05)
    assert len(held_files(release)) == 2
    # The first job finished, the second is held at step 1. Cancel it.
    cancel = run_cli(["-m", "tmgg.cli.tmgg_sweep", "cancel", "stage=smoke",
                      *sweep_dirs.overrides])
    assert cancel.returncode == 0, cancel.stderr
    states = sorted(ledger.states().values(), key=lambda s: s.status)
    assert [s.status for s in states] == [CANCELLED, FINISHED]
    assert states[1].metrics["test/mse"] >= 0
    cancelled = states[0]
    process = ProcessIdentity.read(
        ledger.root / "modal_calls/local" / f"{cancelled.call_id}.proc.json")
    assert process is not None and process.argv[-1] == cancelled.call_id
    # Cancel waits for the process it stops; a bound for a broken cancel, not a race.
    deadline = time.monotonic() + BROKEN_RUN_S
    while process.is_live():
        assert time.monotonic() < deadline, "the cancelled call's process still runs"
        time.sleep(0.05)
    assert poll_detached(ledger) == 0  # nothing left to fold


def test_credentials_are_read_from_the_modal_config_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.launch.modal.settings import modal_credentials_available

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MODAL_CONFIG_PATH", raising=False)
    assert not modal_credentials_available()
    (tmp_path / ".modal.toml").write_text('[default]\ntoken_id = "ak-1"\n')
    assert not modal_credentials_available()  # a secret is needed too
    (tmp_path / ".modal.toml").write_text(
        '[default]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    assert modal_credentials_available()


def test_wandb_jobs_on_modal_need_the_secret() -> None:
    from tmgg.jobs.plan import PlannedJob
    from tmgg.launch.modal.settings import check_wandb_secret

    def job(logger: dict) -> PlannedJob:
        return PlannedJob(index=0, job_id="smoke-0", run_name="smoke_x", stage="smoke",
                          overrides=[], sweep_config=None,  # type: ignore[arg-type]
                          task_config={"logger": logger})

    no_secret = ModalSettings(wandb_secret=None)
    with pytest.raises(LauncherSettingError, match=r"hydra\.launcher\.wandb_secret"):
        check_wandb_secret(no_secret, [job({"name": "wandb", "mode": "auto"})])
    check_wandb_secret(no_secret, [job({"name": "wandb", "mode": "offline"})])
    check_wandb_secret(no_secret, [job({"name": "csv"})])
    check_wandb_secret(ModalSettings(wandb_secret="wandb"),
                       [job({"name": "wandb", "mode": "online"})])
    check_wandb_secret(ModalSettings(transport="local", wandb_secret=None),
                       [job({"name": "wandb", "mode": "online"})])


# -- a blocking sweep that loses its connection, or is interrupted with Ctrl-C --------
# With local_calls=true every container call is a detached local process awaited by its
# call id through the runner Modal's calls go through, so it can outlive the launcher
# as a Modal call does.

ONE_LOCAL_CALL = ["-m", "stage=smoke", "logger=csv", "model=linear_pe", "seed=1",
           "hydra/launcher=modal", "hydra.launcher.transport=local",
           "hydra.launcher.local_calls=true"]


def _wait_for(condition, seconds: float, what: str) -> None:  # noqa: ANN001
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_connection_lost_during_a_blocking_sweep_leaves_jobs_in_flight(
        sweep_dirs: SweepDirs) -> None:
    result = run_cli([str(REPO / "tests/apps/dropped_connection.py"), *ONE_LOCAL_CALL,
                      *sweep_dirs.overrides], env={"TMGG_MODAL_RECONNECT_S": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    (state,) = ledger.states().values()
    assert state.status in IN_FLIGHT and state.status != FAILED
    assert state.call_id and state.call_id.startswith("local-fc-")
    assert not [e for e in ledger.events() if e["event"] == "outcome"]
    claim = claims.current(ledger.root, state.job_id)
    assert claim is not None and not claim.released and claim.call_id == state.call_id
    assert "still in flight" in result.stderr and "lost the connection" in result.stderr
    assert "tmgg-sweep status stage=smoke" in result.stderr
    # The call ran on: a later `status` collects its result by call id.
    def collected() -> bool:
        status = tmgg_sweep("status", "stage=smoke", *sweep_dirs.overrides)
        assert status.returncode in (0, 1), status.stderr[-2000:]
        return next(iter(ledger.states().values())).status == FINISHED
    _wait_for(collected, 240, "status to collect the call's result")
    (state,) = ledger.states().values()
    assert state.metrics["test/mse"] >= 0
    assert claims.current(ledger.root, state.job_id).released


@pytest.mark.parametrize("answer", ["s", "l", "second Ctrl-C"])
def test_ctrl_c_during_a_blocking_sweep_stops_or_leaves_the_calls(
        sweep_dirs: SweepDirs, answer: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tmgg.cli.app", *ONE_LOCAL_CALL, "trainer.max_steps=100000",
         "trainer.val_check_interval=50", *sweep_dirs.overrides],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ledger = Ledger(sweep_dirs.experiments, "smoke")

    def dispatched() -> bool:
        assert process.poll() is None, "the sweep ended before it was interrupted"
        return any(e["event"] == "dispatched" and e.get("call_id") for e in ledger.events())
    try:
        _wait_for(dispatched, 120, "the call to be dispatched")
        (state,) = ledger.states().values()
        call_id = state.call_id
        assert call_id is not None
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher
        assert process.stdin is not None and process.stderr is not None
        if answer == "second Ctrl-C":  # pressed again while asked: stop, at once
            seen = ""
            while "[l]eave them running" not in seen:
                seen += process.stderr.read(1)
                assert seen or process.poll() is None
            process.send_signal(signal.SIGINT)
            answer, stderr = "s", seen + process.communicate(timeout=60)[1]
        else:
            process.stdin.write(answer + "\n")
            process.stdin.flush()
            _, stderr = process.communicate(timeout=60)  # exits promptly
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "[s]top them (default) or [l]eave them running" in stderr
    (state,) = ledger.states().values()
    claim = claims.current(ledger.root, state.job_id)
    assert claim is not None
    call = local_call_process(call_id, ledger.root)
    if answer == "s":
        assert state.status == CANCELLED
        assert claim.released
        _wait_for(lambda: local_call_process(call_id, ledger.root) is None, 20,
                  "the call's process to end")
    else:
        assert state.status in IN_FLIGHT and state.call_id == call_id
        assert not claim.released and claim.call_id == call_id
        assert call is not None and call.is_live()  # still training, detached
        assert "tmgg-sweep status stage=smoke" in stderr
        cancel = tmgg_sweep("cancel", "stage=smoke", *sweep_dirs.overrides)
        assert cancel.returncode == 0, cancel.stderr
        assert next(iter(ledger.states().values())).status == CANCELLED
