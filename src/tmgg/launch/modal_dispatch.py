"""The Modal launcher's dispatch: blocking or detached, over Modal or a local transport.

Everything that decides what a sweep does lives here once and is shared by both
transports: settings and GPU checks, the cost limit, the credential check, skipping
finished jobs, payloads (cloudpickled exactly as sent), the ledger events, the
outcome table, detached calls with ``status``/``cancel``. The transport boundary is
small — a ``Runner`` with ``map`` (Modal's ``starmap`` with ordered outputs and
``return_exceptions=True``) and ``spawn`` (returns a call id), plus ``poll_call`` and
``cancel_call`` by call id:

- ``modal``: an ephemeral ``app.run()``, ``Function.with_options(...)`` with this
  sweep's GPU, CPU, memory, timeout, retries and max_containers.
- ``local``: worker processes standing in for containers. Each imports the Modal app
  module and runs the remote function's own body with ``Function.local()``; a pool
  bounded by ``max_containers`` keeps containers warm between inputs, keeps outputs
  in input order, retries lost containers and timeouts with ``modal.Retries``'
  backoff, and returns failures as exceptions. Detached calls are session-leader
  processes whose results are files under the stage's ledger directory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tmgg.launch.common import build_payload, prepare_sweep_dir, print_outcome_table
from tmgg.launch.cost import LauncherSettingError, check_cost_limit, normalize_gpu, plan_estimates
from tmgg.orchestration.executor import JobFailure, deserialize, serialize
from tmgg.orchestration.ledger import DISPATCHED, RUNNING, Ledger, atomic_write_json
from tmgg.orchestration.plan import PlanError, PlannedJob
from tmgg.orchestration.records import utc_now
from tmgg.orchestration.sweep import (
    ledger_for,
    planned_jobs,
    record_dispatched,
    record_outcome,
    split_finished,
)

log = logging.getLogger(__name__)

LAUNCHER = "modal"
TRANSPORTS = ("modal", "local")
LOCAL_CALL_PREFIX = "local-fc-"
CALLS_DIR = "modal_calls"  # under experiments/<stage>/: one JSON per detached job
MODAL_TOKEN_HELP = (
    "Modal credentials were not found (no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET in the "
    "environment and no token in {path}). Run `modal token new` to create them, or use "
    "hydra.launcher.transport=local to run the same dispatch on this machine. Nothing "
    "was dispatched.")
_LOCAL_VOLUME_WARNING = ".*executing locally and will not have access to the mounted Volume.*"


class ModalCredentialsError(PlanError):
    """transport=modal without Modal credentials: refused before any network call."""


# -- settings ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModalSettings:
    """``hydra.launcher`` of ``hydra/launcher=modal``, checked (each error names its field)."""

    transport: str = "modal"
    gpu: str | None = "T4"
    cpu: float = 2.0
    memory_mb: int = 4096
    timeout_s: int = 3600
    max_retries: int = 2
    initial_delay: float = 5.0
    backoff_coefficient: float = 2.0
    max_delay: float = 60.0
    max_containers: int | None = 20
    app_name: str = "tmgg"
    wandb_secret: str | None = "wandb"
    volume: str = "tmgg-outputs"
    detach: bool = False
    max_cost_usd: float | None = 25.0
    progress: bool = True
    local_containers: int | None = None
    local_volume_dir: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any] | DictConfig) -> ModalSettings:
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)  # type: ignore[assignment]
        values = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                  for k, v in dict(params).items() if k != "_target_"}
        retries = values.pop("retries", None) or {}
        if isinstance(retries, int) and not isinstance(retries, bool):
            retries = {"max_retries": retries}
        if not isinstance(retries, dict):
            raise LauncherSettingError("hydra.launcher.retries",
                                       f"expected a mapping or an integer, got {retries!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LauncherSettingError(f"hydra.launcher.{unknown[0]}", "unknown setting")
        for key, value in retries.items():
            if key not in ("max_retries", "initial_delay", "backoff_coefficient", "max_delay"):
                raise LauncherSettingError(f"hydra.launcher.retries.{key}", "unknown setting")
            values[key] = value
        settings = cls(**values)
        settings.check()
        return dataclasses.replace(settings, gpu=normalize_gpu(settings.gpu))

    def check(self) -> None:
        def require(field: str, ok: bool, problem: str) -> None:
            if not ok:
                raise LauncherSettingError(f"hydra.launcher.{field}", problem)

        def number(value: Any) -> bool:
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(float(value)))

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require("transport", self.transport in TRANSPORTS,
                f"expected one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        normalize_gpu(self.gpu)
        require("cpu", number(self.cpu) and self.cpu >= 0.125,
                f"expected a number of cores >= 0.125, got {self.cpu!r}")
        require("memory_mb", integer(self.memory_mb) and self.memory_mb >= 128,
                f"expected an integer >= 128 (MiB), got {self.memory_mb!r}")
        require("timeout_s", integer(self.timeout_s) and 10 <= self.timeout_s <= 86400,
                f"expected whole seconds from 10 to 86400 (Modal's limits), got {self.timeout_s!r}")
        require("retries.max_retries", integer(self.max_retries) and 0 <= self.max_retries <= 10,
                f"expected an integer from 0 to 10, got {self.max_retries!r}")
        require("retries.initial_delay", number(self.initial_delay)
                and 0 <= self.initial_delay <= 60,
                f"expected seconds from 0 to 60, got {self.initial_delay!r}")
        require("retries.backoff_coefficient", number(self.backoff_coefficient)
                and 1 <= self.backoff_coefficient <= 10,
                f"expected a number from 1.0 to 10.0, got {self.backoff_coefficient!r}")
        require("retries.max_delay", number(self.max_delay) and 1 <= self.max_delay <= 60,
                f"expected seconds from 1 to 60, got {self.max_delay!r}")
        require("max_containers", self.max_containers is None
                or (integer(self.max_containers) and self.max_containers >= 1),
                f"expected an integer >= 1 or null, got {self.max_containers!r}")
        require("local_containers", self.local_containers is None
                or (integer(self.local_containers) and self.local_containers >= 1),
                f"expected an integer >= 1 or null, got {self.local_containers!r}")
        for field in ("app_name", "volume"):
            value = getattr(self, field)
            require(field, isinstance(value, str) and bool(re.fullmatch(r"[\w.-]+", value)),
                    f"expected a Modal name (letters, digits, '-', '_', '.'), got {value!r}")
        require("wandb_secret", self.wandb_secret is None or (
            isinstance(self.wandb_secret, str) and bool(self.wandb_secret.strip())),
                f"expected a Modal Secret name or null, got {self.wandb_secret!r}")
        require("max_cost_usd", self.max_cost_usd is None
                or (number(self.max_cost_usd) and self.max_cost_usd >= 0),
                f"expected a number >= 0 or null, got {self.max_cost_usd!r}")

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based), as modal.Retries computes it."""
        return min(self.max_delay, self.initial_delay * self.backoff_coefficient ** (attempt - 1))

    def local_size(self, jobs: int) -> int:
        cores = os.cpu_count() or 1
        size = self.local_containers or min(self.max_containers or cores, cores)
        return max(1, min(size, jobs))

    def container_threads(self) -> int:
        """torch threads of a job: the container's cores (one per local container)."""
        return 1 if self.transport == "local" else max(1, int(self.cpu))

    def function_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Function.with_options`` for this sweep."""
        import modal

        options: dict[str, Any] = {
            "cpu": float(self.cpu),
            "memory": int(self.memory_mb),
            "timeout": int(self.timeout_s),
            "retries": modal.Retries(max_retries=int(self.max_retries),
                                     backoff_coefficient=float(self.backoff_coefficient),
                                     initial_delay=float(self.initial_delay),
                                     max_delay=float(self.max_delay)),
        }
        if self.gpu:
            options["gpu"] = self.gpu
        if self.max_containers:
            options["max_containers"] = int(self.max_containers)
        return options

    def container_spec(self) -> dict[str, Any]:
        """What a local container needs to build the same Modal function."""
        env = {}
        if self.local_volume_dir:
            from tmgg.launch.modal_app import LOCAL_COMMIT_LOG_ENV

            env[LOCAL_COMMIT_LOG_ENV] = str(Path(self.local_volume_dir).resolve()
                                            / ".volume-commits.jsonl")
        return {"app_name": self.app_name, "volume": self.volume,
                "wandb_secret": self.wandb_secret, "timeout_s": self.timeout_s, "env": env}


# -- credentials -------------------------------------------------------------------


def modal_config_path() -> Path:
    return Path(os.environ.get("MODAL_CONFIG_PATH") or os.path.expanduser("~/.modal.toml"))


def modal_credentials_available() -> bool:
    """A token in the environment or in ~/.modal.toml; reads files only, no network."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    try:
        text = modal_config_path().read_text()
    except OSError:
        return False
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: a token line is enough of a sign
        return bool(re.search(r"^\s*token_id\s*=\s*\S", text, re.M)
                    and re.search(r"^\s*token_secret\s*=\s*\S", text, re.M))
    try:
        profiles = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return any(isinstance(p, dict) and p.get("token_id") and p.get("token_secret")
               for p in profiles.values())


def require_credentials() -> None:
    if not modal_credentials_available():
        raise ModalCredentialsError(MODAL_TOKEN_HELP.format(path=modal_config_path()))


# -- jobs on the volume ------------------------------------------------------------


def volume_root(settings: ModalSettings) -> str | None:
    """Where the volume is seen by a job: Modal's mount, a local stand-in, or None."""
    if settings.transport == "modal":
        from tmgg.launch.modal_app import VOLUME_MOUNT

        return VOLUME_MOUNT
    if settings.local_volume_dir:
        return str(Path(settings.local_volume_dir).resolve())
    return None


def on_volume(job: PlannedJob, root: str | None) -> PlannedJob:
    """The job as sent: outputs, checkpoints and its own records under the volume.

    The output folder keeps its job-id-derived leaf (hydra.sweep.subdir), so every
    attempt of a job finds the previous attempt's checkpoints.
    """
    if root is None or not job.is_tmgg_job:
        return job
    config = copy.deepcopy(job.sweep_config)
    with read_write(config), open_dict(config):
        config.outputs_dir = f"{root}/outputs"
        config.experiments_dir = f"{root}/experiments"
    with read_write(config.hydra), read_write(config.hydra.sweep):
        config.hydra.sweep.dir = f"{root}/outputs/{job.stage}"
    return dataclasses.replace(job, sweep_config=config)


def _output_dir(result: Any) -> str | None:
    hydra_cfg = getattr(result, "hydra_cfg", None)
    try:
        return str(hydra_cfg.hydra.runtime.output_dir) if hydra_cfg is not None else None
    except Exception:  # noqa: BLE001 - a missing runtime node only loses a detail
        return None


def _record(job: PlannedJob, result: Any, settings: ModalSettings, root: str | None,
            call_id: str | None = None) -> None:
    """Outcome event plus the job's record, written here: the job wrote its own remotely."""
    if not job.is_tmgg_job:
        return
    ledger = ledger_for(job.task_config)
    before = ledger.job_record(job.job_id) or {}
    record_outcome(job, result, LAUNCHER, write_job_record=True)
    record = ledger.job_record(job.job_id) or {}
    if before.get("status") == record.get("status") and before.get("started_at"):
        # transport=local on this disk: the job's own record had its timing and attempts.
        for key in ("started_at", "attempts", "output_dir"):
            if record.get(key) is None:
                record[key] = before.get(key)
    output_dir = _output_dir(result) or record.get("output_dir")
    record["output_dir"] = output_dir
    modal_info: dict[str, Any] = {"transport": settings.transport, "gpu": settings.gpu,
                                  "volume": settings.volume, "call_id": call_id}
    prefix = f"{root.rstrip('/')}/" if root else None
    if prefix and output_dir and output_dir.startswith(prefix):
        modal_info["volume_path"] = output_dir[len(prefix):]
    record["modal"] = modal_info
    ledger.write_job_record(job.job_id, record)


def to_job_return(job: PlannedJob, output: Any) -> Any:
    """A transport's output (pickled JobReturn, or an exception) as a JobReturn."""
    from hydra.core.utils import JobReturn, JobStatus

    if isinstance(output, bytes | bytearray):
        try:
            return deserialize(bytes(output))
        except Exception as error:  # noqa: BLE001 - becomes a FAILED job
            output = error
    if not isinstance(output, BaseException):
        output = RuntimeError(f"unexpected result from the remote function: {output!r}")
    failed = JobReturn(overrides=list(job.overrides), status=JobStatus.FAILED)
    failed.return_value = JobFailure.from_exception(output)
    return failed


# -- the transport boundary --------------------------------------------------------


class Runner(Protocol):
    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[Any]:
        """One output per input, in input order; a failed input yields its exception."""

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """Start one call without waiting; its call id."""


class _ModalRunner:
    def __init__(self, function: Any) -> None:
        self.function = function

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[Any]:
        yield from self.function.starmap(list(inputs), order_outputs=True,
                                         return_exceptions=True)

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        return str(self.function.spawn(*args).object_id)


@contextlib.contextmanager
def _modal_runner(settings: ModalSettings, detach: bool) -> Iterator[Runner]:
    import modal

    from tmgg.launch.modal_app import build_app

    built = build_app(settings.app_name, settings.volume, settings.wandb_secret,
                      settings.timeout_s)
    output = modal.enable_output() if settings.progress else contextlib.nullcontext()
    with output, built.app.run(detach=detach):
        yield _ModalRunner(built.function.with_options(**settings.function_options()))


def _container_main(conn: Any, spec: dict[str, Any]) -> None:
    """A local container: import the Modal app once, then run inputs with Function.local()."""
    import warnings

    os.environ.update(spec.get("env") or {})
    warnings.filterwarnings("ignore", message=_LOCAL_VOLUME_WARNING)
    from tmgg.launch.modal_app import build_app

    function = build_app(spec["app_name"], spec["volume"], spec["wandb_secret"],
                         spec["timeout_s"]).function
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        if args is None:
            return
        conn.send(("started", None))  # the timeout counts from here, as on Modal
        try:
            reply = ("ok", function.local(*args))
        except Exception as error:  # noqa: BLE001 - Modal returns it as the input's failure
            reply = ("error", serialize(JobFailure.from_exception(error)))
        conn.send(reply)


class _Container:
    def __init__(self, context: Any, spec: dict[str, Any]) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_container_main, args=(child, spec),
                                       name="tmgg-local-container")
        self.process.start()
        child.close()
        self.position: int | None = None
        self.started: float | None = None  # when the current input began to run

    def submit(self, position: int, args: tuple[bytes, str | None]) -> None:
        self.position = position
        self.started = None
        self.conn.send(args)

    def stop(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LocalContainers:
    """Warm worker processes with the semantics of Modal's ``starmap`` on one function.

    Outputs come in input order; at most ``size`` containers run at once and each
    takes input after input; an input whose container dies, runs past the timeout
    or raises is retried with modal.Retries' backoff, and after the last retry its
    failure is the output (``return_exceptions=True``).
    """

    def __init__(self, settings: ModalSettings, size: int) -> None:
        self.settings = settings
        self.size = max(1, size)
        self.spec = settings.container_spec()
        self.context = multiprocessing.get_context("spawn")

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[Any]:
        n = len(inputs)
        results: dict[int, Any] = {}
        attempts = [0] * n
        ready_at = [0.0] * n
        queue = list(range(n))
        containers: list[_Container] = []
        next_out = 0
        timeout = float(self.settings.timeout_s)

        def lost(position: int, failure: JobFailure) -> None:
            attempts[position] += 1
            if attempts[position] <= self.settings.max_retries:
                delay = self.settings.retry_delay(attempts[position])
                log.warning("input %d: %s; retry %d of %d in %.1fs", position,
                            failure.error_type, attempts[position],
                            self.settings.max_retries, delay)
                ready_at[position] = time.monotonic() + delay
                queue.append(position)
            else:
                results[position] = failure

        try:
            while next_out < n:
                now = time.monotonic()
                for container in [c for c in containers if c.position is None
                                  and not c.process.is_alive()]:
                    containers.remove(container)  # an idle container that went away
                    container.stop(kill=True)
                for position in [p for p in queue if ready_at[p] <= now]:
                    idle = next((c for c in containers if c.position is None), None)
                    if idle is None and len(containers) < self.size:
                        idle = _Container(self.context, self.spec)
                        containers.append(idle)
                    if idle is None:
                        break
                    queue.remove(position)
                    try:
                        idle.submit(position, inputs[position])
                    except OSError:  # the container died while starting
                        containers.remove(idle)
                        idle.stop(kill=True)
                        lost(position, JobFailure("ContainerCrashed", "the container for "
                                                  f"input {position} died while starting", ""))
                busy = [c for c in containers if c.position is not None]
                waits = [c.started + timeout - now for c in busy if c.started is not None]
                waits += [ready_at[p] - now for p in queue if ready_at[p] > now]
                ready = wait_connections([c.conn for c in busy],
                                         timeout=max(0.0, min([1.0, *waits])))
                for container in busy:
                    position = container.position
                    assert position is not None
                    if container.conn in ready:
                        try:
                            status, value = container.conn.recv()
                        except (EOFError, OSError):
                            container.process.join(timeout=5)
                            code = container.process.exitcode
                            containers.remove(container)
                            container.stop(kill=True)
                            lost(position, JobFailure(
                                "ContainerCrashed", f"the container running input {position} "
                                f"exited (exit code {code}) before returning a result", ""))
                            continue
                        if status == "started":
                            container.started = time.monotonic()
                            continue
                        container.position = None
                        if status == "ok":
                            results[position] = value
                        else:
                            lost(position, deserialize(value))
                    elif (container.started is not None
                          and time.monotonic() - container.started > timeout):
                        containers.remove(container)
                        container.stop(kill=True)
                        lost(position, JobFailure(
                            "FunctionTimeoutError", f"input {position} ran longer than "
                            f"hydra.launcher.timeout_s={self.settings.timeout_s}s", ""))
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
        finally:
            for container in containers:
                container.stop(kill=container.position is not None)


class _LocalRunner:
    def __init__(self, settings: ModalSettings, size: int, calls_dir: Path | None) -> None:
        self.settings = settings
        self.size = size
        self.calls_dir = calls_dir

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[Any]:
        yield from LocalContainers(self.settings, self.size).map(inputs)

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """A detached local call: a session-leader process that outlives the launcher."""
        assert self.calls_dir is not None
        self.calls_dir.mkdir(parents=True, exist_ok=True)
        call_id = f"{LOCAL_CALL_PREFIX}{uuid.uuid4().hex[:20]}"
        spec = {"settings": dataclasses.asdict(self.settings), "args": args,
                "slots": self.size}
        (self.calls_dir / f"{call_id}.in").write_bytes(serialize(spec))
        with open(self.calls_dir / f"{call_id}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "tmgg.launch.modal_dispatch", "local-call",
                 str(self.calls_dir), call_id],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        (self.calls_dir / f"{call_id}.pid").write_text(str(process.pid))
        return call_id


@contextlib.contextmanager
def _runner(settings: ModalSettings, detach: bool, size: int,
            calls_dir: Path | None) -> Iterator[Runner]:
    if settings.transport == "modal":
        with _modal_runner(settings, detach) as runner:
            yield runner
    else:
        yield _LocalRunner(settings, size, calls_dir)


def _local_call_main(calls_dir: Path, call_id: str) -> int:
    """Body of a detached local call: wait for a container slot, run, write the result."""
    import fcntl

    spec = deserialize((calls_dir / f"{call_id}.in").read_bytes())
    settings = ModalSettings(**spec["settings"])
    slots = calls_dir / "slots"
    slots.mkdir(exist_ok=True)
    handle = None
    while handle is None:  # at most `slots` detached calls run at once, like max_containers
        for slot in range(int(spec["slots"])):
            candidate = open(slots / f"{slot}.lock", "w")  # noqa: SIM115 - held until exit
            try:
                fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handle = candidate
                break
            except OSError:
                candidate.close()
        if handle is None:
            time.sleep(0.5)
    output = next(iter(LocalContainers(settings, 1).map([tuple(spec["args"])])))
    reply = ("ok", output) if isinstance(output, bytes) else ("error", serialize(output))
    out = calls_dir / f"{call_id}.out"
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(serialize(reply))
    os.replace(tmp, out)
    (calls_dir / f"{call_id}.in").unlink(missing_ok=True)
    return 0


# -- detached calls: poll and cancel by id ------------------------------------------

PENDING = object()


def _local_calls_dir(ledger_root: Path) -> Path:
    return ledger_root / CALLS_DIR / "local"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of this process is not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """An exited process not yet reaped by its parent (Linux /proc; False elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def poll_call(call_id: str, ledger_root: Path) -> Any:
    """The call's output (pickled JobReturn or exception), or PENDING."""
    if call_id.startswith(LOCAL_CALL_PREFIX):
        calls_dir = _local_calls_dir(ledger_root)
        out = calls_dir / f"{call_id}.out"
        if out.exists():
            status, value = deserialize(out.read_bytes())
            return value if status == "ok" else deserialize(value)
        pid_file = calls_dir / f"{call_id}.pid"
        if pid_file.exists() and pid_alive(int(pid_file.read_text())):
            return PENDING
        if out.exists():  # finished between the two checks
            return poll_call(call_id, ledger_root)
        return JobFailure("ContainerCrashed", f"local call {call_id} ended without a result "
                          f"(see {calls_dir / (call_id + '.log')})", "")
    import modal

    try:
        return modal.FunctionCall.from_id(call_id).get(timeout=0)
    except TimeoutError as error:
        if isinstance(error, modal.exception.Error):  # a function timeout is a result
            return error
        return PENDING
    except Exception as error:  # noqa: BLE001 - the remote failure is the result
        return error


def cancel_call(call_id: str, ledger_root: Path) -> None:
    if call_id.startswith(LOCAL_CALL_PREFIX):
        pid_file = _local_calls_dir(ledger_root) / f"{call_id}.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        return
    import modal

    modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True)


def _call_record_path(ledger_root: Path, job_id: str) -> Path:
    return ledger_root / CALLS_DIR / f"{job_id}.json"


def _job_from_call_record(record: dict[str, Any]) -> PlannedJob:
    task = record["task_config"]
    return PlannedJob(index=int(record.get("index", 0)), job_id=record["job_id"],
                      run_name=record["run_name"], stage=str(task["stage"]["name"]),
                      overrides=list(record.get("overrides") or []),
                      sweep_config=OmegaConf.create({}), task_config=task)


def poll_detached(ledger: Ledger) -> int:
    """Fold the results of finished detached calls into the ledger; how many were folded.

    Used by ``tmgg-sweep status``. Calls on Modal need credentials; without them they
    are left as they are (a warning says so).
    """
    folded = 0
    warned = False
    for state in ledger.states().values():
        if state.status not in (DISPATCHED, RUNNING) or not state.call_id:
            continue
        path = _call_record_path(ledger.root, state.job_id)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("no call record for %s at %s; cannot fold its result",
                        state.run_name, path)
            continue
        if record.get("call_id") != state.call_id:
            continue
        if not state.call_id.startswith(LOCAL_CALL_PREFIX) and not modal_credentials_available():
            if not warned:
                print(MODAL_TOKEN_HELP.format(path=modal_config_path()).replace(
                    "Nothing was dispatched.", "Detached Modal calls were not polled."),
                    file=sys.stderr)
                warned = True
            continue
        output = poll_call(state.call_id, ledger.root)
        if output is PENDING:
            continue
        job = _job_from_call_record(record)
        settings = ModalSettings(**record["settings"])
        _record(job, to_job_return(job, output), settings, record.get("volume_root"),
                call_id=state.call_id)
        folded += 1
    return folded


def cancel_main(argv: list[str]) -> int:
    """``tmgg-sweep cancel stage=...``: cancel a detached sweep's calls still running."""
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep cancel",
        description="Cancel the detached Modal calls of a stage that have not finished "
                    "(finished ones are first folded into the ledger).")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides as for `tmgg-train -m`, e.g. stage=stage1")
    args = parser.parse_args(argv)
    from tmgg.orchestration.compose import stage_ledger

    ledger = stage_ledger(args.overrides)
    running = [s for s in ledger.states().values()
               if s.status in (DISPATCHED, RUNNING) and s.call_id]
    if any(not s.call_id.startswith(LOCAL_CALL_PREFIX) for s in running if s.call_id) \
            and not modal_credentials_available():
        print(MODAL_TOKEN_HELP.format(path=modal_config_path()).replace(
            "Nothing was dispatched.", "Nothing was cancelled."), file=sys.stderr)
        return 1
    poll_detached(ledger)
    cancelled = 0
    for state in ledger.states().values():
        if state.status not in (DISPATCHED, RUNNING) or not state.call_id:
            continue
        try:
            cancel_call(state.call_id, ledger.root)
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            print(f"could not cancel {state.run_name} ({state.call_id}): {error}",
                  file=sys.stderr)
            continue
        ledger.append({"event": "cancelled", "time": utc_now(), "job_id": state.job_id,
                       "run_name": state.run_name, "launcher": LAUNCHER,
                       "call_id": state.call_id})
        cancelled += 1
        print(f"cancelled {state.run_name} ({state.call_id})")
    print(f"{cancelled} call(s) cancelled in stage {ledger.stage}")
    return 0


# -- the launcher ------------------------------------------------------------------


def _detached_return(job: PlannedJob, call_id: str) -> Any:
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=list(job.overrides),
                    cfg=OmegaConf.create(job.task_config) if job.is_tmgg_job else None,
                    status=JobStatus.COMPLETED)
    ret.return_value = {"status": DISPATCHED, "call_id": call_id}
    ret.detached = True  # type: ignore[attr-defined]
    return ret


class _LineProgress:
    """One line per finished job (Modal's own output owns the live display)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.done = enabled, total, completed

    def __enter__(self) -> _LineProgress:
        return self

    def advance(self, job: PlannedJob, result: Any) -> None:
        self.done += 1
        if self.enabled:
            status = "ok" if result.status.name == "COMPLETED" else "FAILED"
            print(f"[{self.done}/{self.total}] {job.run_name}: {status}", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc: Any) -> None:
        return None


def _progress(settings: ModalSettings, total: int, completed: int) -> Any:
    if settings.transport == "local":
        try:  # the local launcher's rich bar: nothing else owns the terminal here
            from tmgg.launch.local import _Progress as rich_progress
        except ImportError:
            pass
        else:
            return rich_progress(settings.progress, total, completed)
    return _LineProgress(settings.progress, total, completed)


def _calls_dir(jobs: Sequence[PlannedJob], config: DictConfig) -> Path:
    tmgg_jobs = [job for job in jobs if job.is_tmgg_job]
    if tmgg_jobs:
        return _local_calls_dir(ledger_for(tmgg_jobs[0].task_config).root)
    return Path(str(config.hydra.sweep.dir)) / f".{CALLS_DIR}"


def check_settings(params: dict[str, Any] | DictConfig) -> ModalSettings:
    """The launcher's settings, checked; for transport=modal, credentials too.

    Runs when Hydra sets the launcher up, before the sweeper composes the jobs again,
    so a bad GPU name or missing credentials fail fast; reads no network.
    """
    settings = ModalSettings.from_params(params)
    if settings.transport == "modal":
        require_credentials()
    return settings


def check_wandb_secret(settings: ModalSettings, jobs: Sequence[PlannedJob]) -> None:
    """Refuse W&B jobs on Modal without a secret: they would silently log offline there."""
    if settings.transport != "modal" or settings.wandb_secret:
        return
    for job in jobs:
        if not job.is_tmgg_job:
            continue
        logger = job.task_config.get("logger") or {}
        if logger.get("name") == "wandb" and logger.get("mode") in ("auto", "online"):
            raise LauncherSettingError(
                "hydra.launcher.wandb_secret",
                f"job {job.run_name} logs to W&B (logger.mode={logger.get('mode')}) but no "
                "Modal Secret is set, so its container has no WANDB_API_KEY; create one with "
                "`modal secret create wandb WANDB_API_KEY=...` and name it here, or use "
                "logger=csv or logger.mode=offline")


def preflight(config: DictConfig, pending: Sequence[PlannedJob]) -> ModalSettings:
    """Every refusal this launcher makes before dispatch, for the jobs still to run.

    Settings, credentials, the cost limit and the W&B secret. The ledger runs it before
    it records the plan (``tmgg.launch.common.launcher_preflight``), so a refused sweep
    leaves no trace; ``launch_modal`` runs it again for apps without the ledger.
    """
    settings = check_settings(config.hydra.launcher)
    check_cost_limit(config, plan_estimates(config, pending))
    check_wandb_secret(settings, pending)
    return settings


def launch_modal(launcher: Any, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[Any]:
    """Check, then dispatch every unfinished job of the sweep; JobReturns in job order."""
    check_settings(launcher.params)
    config = launcher.config
    jobs = planned_jobs(launcher.hydra_context.config_loader, config, job_overrides,
                        initial_job_idx)
    results, pending = split_finished(jobs)
    settings = preflight(config, [jobs[p] for p in pending])
    prepare_sweep_dir(config)
    root = volume_root(settings)
    env = {"TMGG_NUM_THREADS": str(settings.container_threads())}
    inputs = [(build_payload(on_volume(jobs[p], root), launcher.task_function, env),
               settings.volume) for p in pending]
    size = settings.local_size(len(pending))
    where = (f"Modal ({settings.gpu or 'CPU-only'}, app {settings.app_name})"
             if settings.transport == "modal" else f"{size} local containers")
    log.info("Launching %d jobs (%d already finished) on %s", len(pending),
             len(jobs) - len(pending), where)
    if not pending:
        if settings.progress:
            print_outcome_table(jobs, results, title=f"modal launcher: {len(jobs)} jobs")
        return results
    calls_dir = _calls_dir(jobs, config) if settings.detach else None
    with _runner(settings, settings.detach, size, calls_dir) as runner:
        if settings.detach:
            for position, args in zip(pending, inputs, strict=True):
                job = jobs[position]
                call_id = runner.spawn(args)
                record_dispatched(job, LAUNCHER, call_id)
                _write_call_record(job, call_id, settings, root)
                results[position] = _detached_return(job, call_id)
        else:
            for position in pending:
                record_dispatched(jobs[position], LAUNCHER)
            with _progress(settings, len(jobs), len(jobs) - len(pending)) as bar:
                outputs = runner.map(inputs)
                for position, output in zip(pending, outputs, strict=False):
                    job = jobs[position]
                    result = to_job_return(job, output)
                    results[position] = result
                    _record(job, result, settings, root)
                    bar.advance(job, result)
    for position in pending:
        if results[position] is None:  # the transport returned fewer outputs than inputs
            results[position] = to_job_return(jobs[position], RuntimeError(
                "the transport returned no result for this job"))
            _record(jobs[position], results[position], settings, root)
    if settings.detach:
        _print_detached(jobs, pending, results, settings)
    elif settings.progress:
        print_outcome_table(jobs, results, title=f"modal launcher ({settings.transport}): "
                            f"{len(jobs)} jobs")
    return results


def _write_call_record(job: PlannedJob, call_id: str, settings: ModalSettings,
                       root: str | None) -> None:
    """What ``status`` needs to fold the call's result later, beside the ledger."""
    if not job.is_tmgg_job:
        return
    path = _call_record_path(ledger_for(job.task_config).root, job.job_id)
    atomic_write_json(path, {
        "job_id": job.job_id, "run_name": job.run_name, "index": job.index,
        "call_id": call_id, "dispatched_at": utc_now(), "overrides": list(job.overrides),
        "settings": dataclasses.asdict(settings), "volume_root": root,
        "task_config": job.task_config,
    })


def _print_detached(jobs: Sequence[PlannedJob], pending: Sequence[int], results: Sequence[Any],
                    settings: ModalSettings) -> None:
    if not settings.progress:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"modal launcher ({settings.transport}, detached): "
                        f"{len(pending)} jobs dispatched")
    for column in ("job", "call id"):
        table.add_column(column)
    for position in pending:
        table.add_row(jobs[position].run_name, str(results[position].return_value["call_id"]))
    console = Console(stderr=True)
    console.print(table)
    stage = next((job.stage for job in jobs if job.is_tmgg_job), None)
    if stage:
        console.print(f"Follow with `tmgg-sweep status stage={stage}`; stop with "
                      f"`tmgg-sweep cancel stage={stage}` (add the same experiments_dir= "
                      "override if you changed it).")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "local-call":
        sys.exit(_local_call_main(Path(sys.argv[2]), sys.argv[3]))
    print("usage: python -m tmgg.launch.modal_dispatch local-call CALLS_DIR CALL_ID",
          file=sys.stderr)
    sys.exit(2)
