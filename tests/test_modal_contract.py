"""The Modal client surface tmgg uses, as Modal behaves, with no training and no server.

Modal's servers are out of reach, so ``modal.FunctionCall.from_id`` and
``modal.Volume.from_name`` are replaced by stand-ins that answer as modal 1.6.4's client
does (``get(timeout=0)`` raises the builtin ``TimeoutError`` while a call runs, a
call's failure is raised from ``get``, a client-side problem raises
``modal.exception.NotFoundError`` / ``ConnectionError`` / ``OutputExpiredError`` ...).
What runs for real: ``poll_detached`` (``tmgg-sweep status``), ``cancel_main``
(``tmgg-sweep cancel``), the blocking runner's wait and reconnect, the ledger and
the claims. Also here: every Modal call tmgg makes, checked offline against the
installed modal's signatures, and the image and function built for real.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal
import pytest
from conftest import SweepDirs
from hydra.core.utils import JobReturn, JobStatus

from tmgg.jobs import claims
from tmgg.jobs.ledger import CANCELLED, DISPATCHED, FAILED, FINISHED, Ledger
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.sweep import ledger_for, record_dispatched
from tmgg.launch.modal import calls as modal_calls
from tmgg.launch.modal.calls import PENDING, cancel_main, poll_detached, write_call_record
from tmgg.launch.modal.results import LAUNCHER
from tmgg.launch.modal.settings import ModalSettings
from tmgg.launch.modal.transport import CallInFlight, _ModalRunner, client_error_cause
from tmgg.run.executor import serialize

MODAL = ModalSettings(transport="modal", wandb_secret=None)
RUNNING = "running"  # a call's answer while it runs


class StandInCall:
    """``modal.FunctionCall`` as tmgg uses it: ``get`` answers from a script of outcomes
    (the last one repeats), ``cancel`` is counted."""

    def __init__(self, client: StandInClient, call_id: str) -> None:
        self.client, self.object_id = client, call_id

    def get(self, timeout: float | None = None) -> Any:
        script = self.client.scripts[self.object_id]
        outcome = script.pop(0) if len(script) > 1 else script[0]
        self.client.gets.append(self.object_id)
        if outcome == RUNNING:
            raise TimeoutError()  # modal 1.6.4: the builtin, while the call runs
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def cancel(self, terminate_containers: bool = False) -> None:
        self.client.cancelled.append((self.object_id, terminate_containers))


class StandInClient:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Any]] = {}
        self.gets: list[str] = []
        self.cancelled: list[tuple[str, bool]] = []
        self.from_ids: list[str] = []

    def from_id(self, call_id: str, client: Any = None) -> StandInCall:
        self.from_ids.append(call_id)
        if call_id not in self.scripts:
            raise modal.exception.NotFoundError(f"Function call {call_id} not found")
        return StandInCall(self, call_id)


class StandInVolume:
    """``modal.Volume.read_file``: the committed files of a volume, as bytes chunks."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read_file(self, path: str) -> Iterator[bytes]:
        file = self.root / path
        if not file.is_file():
            raise FileNotFoundError(f"No such file: {path}")
        data = file.read_bytes()
        yield data[: len(data) // 2]
        yield data[len(data) // 2:]


@pytest.fixture
def modal_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StandInClient:
    """Credentials in a config file (never MODAL_TOKEN_* in the environment) and the
    client stand-in in place of modal.FunctionCall.from_id."""
    config = tmp_path / "modal.toml"
    config.write_text('[default]\ntoken_id = "ak-test"\ntoken_secret = "as-test"\n')
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(config))
    client = StandInClient()
    monkeypatch.setattr(modal.FunctionCall, "from_id", client.from_id)
    return client


@pytest.fixture(scope="module")
def smoke_jobs() -> list[PlannedJob]:
    from tmgg.jobs.compose import compose_sweep

    return list(compose_sweep(["stage=smoke", "hydra/launcher=modal",
                               "hydra.launcher.fuse=off", "logger=csv"]).jobs)


def _dispatch(jobs: list[PlannedJob], dirs: SweepDirs, call_id: str, *,
              grouped: bool = False) -> tuple[list[PlannedJob], Ledger]:
    """The jobs planned, claimed and recorded as dispatched in one call, as launch_modal
    records a detached call (group members share the call)."""
    placed = []
    for job in jobs:
        task = copy.deepcopy(job.task_config)
        task["experiments_dir"] = str(dirs.experiments)
        placed.append(dataclasses.replace(job, task_config=task))
    ledger = ledger_for(placed[0].task_config)
    for member, job in enumerate(placed):
        ledger.append({"event": "planned", "time": "t", "job_id": job.job_id,
                       "run_name": job.run_name, "overrides": job.overrides})
        taken, _ = claims.take(ledger.root, job.job_id, ticket=claims.new_ticket(),
                               transport={"kind": LAUNCHER, "call_id": call_id})
        assert taken
        record_dispatched(job, LAUNCHER, call_id)
        write_call_record(job, call_id, MODAL, "/vol", member=member if grouped else None,
                          group_size=len(placed) if grouped else None)
    return placed, ledger


def _completed(job: PlannedJob, mse: float) -> JobReturn:
    result = JobReturn(overrides=list(job.overrides), status=JobStatus.COMPLETED)
    result.return_value = {"test/mse": mse, "job_id": job.job_id}
    return result


def _statuses(ledger: Ledger) -> dict[str, str]:
    return {s.run_name: s.status for s in ledger.states().values()}


def test_pending_call_stays_pending(modal_client: StandInClient, smoke_jobs: list[PlannedJob],
                                    sweep_dirs: SweepDirs) -> None:
    (job,), ledger = _dispatch(smoke_jobs[:1], sweep_dirs, "fc-pending")
    modal_client.scripts["fc-pending"] = [RUNNING]
    assert poll_detached(ledger) == 0 and poll_detached(ledger) == 0
    assert modal_client.gets == ["fc-pending", "fc-pending"]  # polled each time
    assert _statuses(ledger) == {job.run_name: DISPATCHED}
    assert modal_calls.call_in_flight(ledger, "fc-pending")


@pytest.mark.parametrize("error, cause", [
    (modal.exception.NotFoundError("Function call fc-x not found"), "Modal profile"),
    (modal.exception.ConnectionError("Could not connect to the Modal server"),
     "lost the connection"),
    (modal.exception.AuthError("Token invalid"), "credentials"),
    (modal.exception.OutputExpiredError(), "output expired"),
    (ConnectionResetError(104, "Connection reset by peer"), "lost the connection"),
])
def test_client_errors_are_not_job_failures(
        modal_client: StandInClient, smoke_jobs: list[PlannedJob], sweep_dirs: SweepDirs,
        capsys: pytest.CaptureFixture[str], error: BaseException, cause: str) -> None:
    """The job stays in flight with a note naming the cause, and is polled again: the
    next poll that reaches the call collects its result."""
    (job,), ledger = _dispatch(smoke_jobs[:1], sweep_dirs, "fc-x")
    modal_client.scripts["fc-x"] = [error, serialize(_completed(job, 0.25))]
    assert poll_detached(ledger) == 0
    assert _statuses(ledger) == {job.run_name: DISPATCHED}
    note = json.loads(modal_calls.call_record_path(ledger.root, job.job_id).read_text())
    assert note["last_poll"]["collected"] is False and cause in note["last_poll"]["cause"]
    assert f"{job.run_name}: still in flight" in capsys.readouterr().err
    claim = claims.current(ledger.root, job.job_id)
    assert claim is not None and not claim.released  # no second dispatch while it may run
    assert poll_detached(ledger) == 1  # polled again, and this time it answered
    (state,) = ledger.states().values()
    assert state.status == FINISHED and state.metrics["test/mse"] == 0.25


def test_the_functions_own_failure_is_the_jobs_outcome(
        modal_client: StandInClient, smoke_jobs: list[PlannedJob],
        sweep_dirs: SweepDirs) -> None:
    (job,), ledger = _dispatch(smoke_jobs[:1], sweep_dirs, "fc-timeout")
    modal_client.scripts["fc-timeout"] = [modal.exception.FunctionTimeoutError(
        "Function timed out after 600s")]
    assert poll_detached(ledger) == 1
    (state,) = ledger.states().values()
    assert state.status == FAILED and "timed out" in state.error


def test_a_groups_bytes_result_is_split_per_member(
        modal_client: StandInClient, smoke_jobs: list[PlannedJob],
        sweep_dirs: SweepDirs) -> None:
    jobs, ledger = _dispatch(smoke_jobs[:3], sweep_dirs, "fc-group", grouped=True)
    modal_client.scripts["fc-group"] = [serialize([_completed(job, 0.1 * (i + 1))
                                                   for i, job in enumerate(jobs)])]
    assert poll_detached(ledger) == 3
    states = {s.job_id: s for s in ledger.states().values()}
    for i, job in enumerate(jobs):
        assert states[job.job_id].status == FINISHED
        assert states[job.job_id].metrics["test/mse"] == pytest.approx(0.1 * (i + 1))
        assert states[job.job_id].metrics["job_id"] == job.job_id


def test_a_groups_whole_call_failure_fails_only_unfinished_members(
        modal_client: StandInClient, smoke_jobs: list[PlannedJob], sweep_dirs: SweepDirs,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The container was lost after the last retry; the first member had finished and
    committed its own record to the volume, which is read instead of failing it."""
    jobs, ledger = _dispatch(smoke_jobs[:2], sweep_dirs, "fc-lost", grouped=True)
    volume = tmp_path / "volume"
    record = volume / f"experiments/{jobs[0].stage}/jobs/{jobs[0].job_id}.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"job_id": jobs[0].job_id, "status": FINISHED,
                                  "metrics": {"test/mse": 0.125}, "duration_s": 3.0,
                                  "output_dir": "/vol/outputs/smoke/x"}))
    opened: list[str] = []

    def from_name(name: str, **kwargs: Any) -> StandInVolume:
        opened.append(name)
        return StandInVolume(volume)

    monkeypatch.setattr(modal.Volume, "from_name", from_name)
    modal_client.scripts["fc-lost"] = [modal.exception.InternalFailure(
        "the container was lost after the last retry")]
    assert poll_detached(ledger) == 2
    states = {s.job_id: s for s in ledger.states().values()}
    assert states[jobs[0].job_id].status == FINISHED
    assert states[jobs[0].job_id].metrics["test/mse"] == 0.125
    assert states[jobs[1].job_id].status == FAILED
    assert "lost after the last retry" in states[jobs[1].job_id].error
    assert set(opened) == {MODAL.volume}


def test_one_cancel_per_group(modal_client: StandInClient, smoke_jobs: list[PlannedJob],
                              sweep_dirs: SweepDirs) -> None:
    jobs, ledger = _dispatch(smoke_jobs[:3], sweep_dirs, "fc-group", grouped=True)
    _dispatch(smoke_jobs[3:4], sweep_dirs, "fc-solo")
    modal_client.scripts.update({"fc-group": [RUNNING], "fc-solo": [RUNNING]})
    assert cancel_main(["stage=smoke", *sweep_dirs.overrides]) == 0
    assert sorted(modal_client.cancelled) == [("fc-group", True), ("fc-solo", True)]
    assert set(_statuses(ledger).values()) == {CANCELLED}


class _Function:
    """``modal.Function.spawn`` handing out the client's scripted calls in order."""

    def __init__(self, client: StandInClient, call_ids: list[str]) -> None:
        self.client, self.call_ids = client, list(call_ids)

    def spawn(self, *args: Any) -> StandInCall:
        return StandInCall(self.client, self.call_ids.pop(0))


def test_a_get_that_fails_once_with_a_network_error_reconnects_by_call_id(
        modal_client: StandInClient) -> None:
    modal_client.scripts["fc-a"] = [modal.exception.ConnectionError("connection lost"),
                                    b"result"]
    runner = _ModalRunner(_Function(modal_client, ["fc-a"]), reconnect_s=30)
    assert runner.start([(b"payload", "vol")]) == ["fc-a"]
    assert list(runner.results()) == [(0, b"result")]
    assert modal_client.from_ids == ["fc-a"]  # reconnected once, by the call's id


def test_a_get_that_keeps_failing_leaves_the_call_in_flight(
        modal_client: StandInClient) -> None:
    modal_client.scripts.update({"fc-b": [OSError(101, "Network is unreachable")],
                                 "fc-c": [RuntimeError("raised by the function")]})
    runner = _ModalRunner(_Function(modal_client, ["fc-b", "fc-c"]), reconnect_s=0.5)
    outputs = dict(runner.map([(b"1", None), (b"2", None)]))
    assert isinstance(outputs[0], CallInFlight) and outputs[0].call_id == "fc-b"
    assert "Network is unreachable" in outputs[0].cause
    assert isinstance(outputs[1], RuntimeError)  # the function's own: the job's outcome


def test_poll_errors_are_sorted_as_modal_raises_them() -> None:
    assert modal_calls.classify_poll_error("fc-1", TimeoutError()) is PENDING
    timeout = modal.exception.FunctionTimeoutError("timed out")
    assert modal_calls.classify_poll_error("fc-1", timeout) is timeout
    assert client_error_cause(modal.exception.RemoteError("crashed")) is None
    assert client_error_cause(ValueError("the job's")) is None
    lost = modal_calls.classify_poll_error("fc-1", modal.exception.ServiceError("503"))
    assert isinstance(lost, CallInFlight) and lost.call_id == "fc-1"


# -- the Modal API as tmgg calls it, against the installed modal --------------------

# Every call into modal that src/tmgg makes, with the arguments it passes (by name
# where tmgg passes them by name): a modal upgrade that renames or drops one fails here.
MODAL_CALLS: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
    (modal.FunctionCall.from_id, (modal.FunctionCall, "fc-1"), {}),  # cls shows
    (modal.FunctionCall.get, (None,), {"timeout": 0}),
    (modal.FunctionCall.cancel, (None,), {"terminate_containers": True}),
    (modal.Function.spawn, (None, b"payload", "volume"), {}),
    (modal.Function.local, (None, b"payload", "volume"), {}),
    (modal.App.run, (None,), {"detach": True}),
    (modal.Volume.from_name, ("tmgg-outputs",), {"create_if_missing": True}),
    (modal.Volume.commit, (None,), {}),
    (modal.Volume.reload, (None,), {}),
    (modal.Volume.read_file, (None, "experiments/smoke/jobs/x.json"), {}),
    (modal.Secret.from_name, ("wandb",), {"required_keys": ["WANDB_API_KEY"]}),
    (modal.Secret.hydrate, (None,), {}),
    (modal.Retries, (), {"max_retries": 2, "backoff_coefficient": 2.0,
                         "initial_delay": 5.0, "max_delay": 60.0}),
    (modal.Image.debian_slim, (), {"python_version": "3.11"}),
    (modal.Image.uv_pip_install, (None,), {"requirements": ["r.txt"],
                                           "extra_options": "--require-hashes --no-deps",
                                           "uv_version": "0.5.0"}),
    (modal.Image.env, (None, {"PYTHONUNBUFFERED": "1"}), {}),
    (modal.Image.add_local_dir, (None, "src", "/root/tmgg"), {"ignore": ["**/*.pyc"]}),
    (modal.App, ("tmgg",), {"image": None}),
    (modal.App.function, (None,), {"name": "run_job", "volumes": {}, "secrets": [],
                                   "timeout": 600, "serialized": False,
                                   "include_source": False}),
    (modal.enable_output, (), {}),
    (modal.is_local, (), {}),
]


@pytest.mark.parametrize("function, args, kwargs", MODAL_CALLS,
                         ids=[getattr(f, "__qualname__", str(f)) for f, _, _ in MODAL_CALLS])
def test_modal_signatures_accept_tmggs_calls(function: Any, args: tuple, kwargs: dict) -> None:
    inspect.signature(function).bind(*args, **kwargs)


def test_with_options_takes_every_setting_and_the_image_builds_offline() -> None:
    """The function as the launcher configures it, built for real (nothing talks to
    Modal before app.run); every exception class tmgg sorts exists."""
    from tmgg.launch.modal.app import CONTAINER_CONF_DIR, CONTAINER_ROOT, build_app

    built = build_app("tmgg", "tmgg-outputs", "wandb", timeout_s=600)
    settings = ModalSettings(gpu="A100-80GB", max_containers=4, wandb_secret="wandb")
    options = settings.function_options()
    inspect.signature(modal.Function.with_options).bind(None, **options)
    configured = built.function.with_options(**options)
    assert isinstance(configured, modal.Function)
    assert isinstance(built.app, modal.App) and isinstance(built.volume, modal.Volume)
    assert (CONTAINER_ROOT, CONTAINER_CONF_DIR) == ("/root", "/conf")
    for name in ("NotFoundError", "AuthError", "PermissionDeniedError", "ConnectionError",
                 "ServiceError", "InternalError", "ResourceExhaustedError", "VersionError",
                 "OutputExpiredError", "FunctionTimeoutError", "InternalFailure",
                 "RemoteError", "InvalidError", "Error"):
        assert issubclass(getattr(modal.exception, name), Exception), name
    assert not issubclass(modal.exception.OutputExpiredError, TimeoutError)
    assert isinstance(inspect.getattr_static(modal.FunctionCall, "object_id"), property)
