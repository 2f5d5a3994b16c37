"""The Modal launcher's transports: Modal itself, or local processes standing in for it.

The boundary is small — a ``Runner`` with ``map`` (every input's output or exception,
with its index, as each finishes) and ``spawn`` (returns a call id):

- ``modal``: an ephemeral ``app.run()``, ``Function.with_options(...)`` with this
  sweep's GPU, CPU, memory, timeout, retries and max_containers.
- ``local``: worker processes standing in for containers (``LocalContainers``). Each
  imports the Modal app module and runs the remote function's own body with
  ``Function.local()``; a pool bounded by ``max_containers`` keeps containers warm
  between inputs, returns outputs as they finish, retries lost containers and timeouts
  with ``modal.Retries``' backoff, and returns failures as exceptions. A detached
  local call is a session-leader process (``python -m tmgg.launch.modal.transport
  local-call``) that reads its input from a pipe and writes its result as JSON data
  (``<call id>.out``) under the stage's ledger directory, beside a record of the
  process (``<call id>.proc.json``) that lets ``cancel`` prove which process it is.
  With ``local_calls=true`` a blocking sweep runs its inputs as such calls too, awaited
  by call id through the same code as Modal's (``_ModalRunner`` over
  ``modal_calls.LocalFunction``), so they can outlive the launcher as Modal's do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from tmgg.launch.modal.settings import ModalSettings
from tmgg.launch.worker_pool import Died, WorkerPool
from tmgg.run.executor import JobFailure, deserialize, serialize

log = logging.getLogger(__name__)
# Checked against modal 1.6.4 (Function.with_options, starmap's ordering and
# return_exceptions, spawn, Retries' backoff); tests/test_lock.py fails when the lock
# moves modal off it.
MODAL_CHECKED_VERSION = "1.6.4"

LOCAL_CALL_PREFIX = "local-fc-"
_LOCAL_VOLUME_WARNING = ".*executing locally and will not have access to the mounted Volume.*"


# -- the transport boundary --------------------------------------------------------


class Runner(Protocol):
    def start(self, inputs: Sequence[tuple[bytes, str | None]]) -> list[str | None]:
        """Send every input; each one's call id (None where the transport has none,
        e.g. warm local containers, which take inputs as they free up)."""

    def results(self) -> Iterator[tuple[int, Any]]:
        """``(index, output)`` per input started, as each finishes; a failed input's
        output is its exception, a call the client lost touch with is ``CallInFlight``.
        Completion order: one slow job holds back no finished result."""

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        """``start`` then ``results``."""

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """Start one call without waiting; its call id."""

    def cancel(self, call_id: str) -> None:
        """Stop one call and its containers."""


@dataclasses.dataclass(frozen=True)
class CallInFlight:
    """The output of a call the client lost touch with: not the job's outcome. The call
    may still run, so its jobs stay in flight (claims kept) and are collected by call id."""

    call_id: str | None
    cause: str


# Seconds a blocking sweep keeps reconnecting to a call after a client-side error
# before it leaves the call in flight (collected later by `tmgg-sweep status`).
RECONNECT_WINDOW_ENV = "TMGG_MODAL_RECONNECT_S"
DEFAULT_RECONNECT_WINDOW_S = 600.0


def reconnect_window_s() -> float:
    return float(os.environ.get(RECONNECT_WINDOW_ENV) or DEFAULT_RECONNECT_WINDOW_S)


def client_error_cause(error: BaseException) -> str | None:
    """Why ``error`` is the client's trouble rather than the call's outcome; None when the
    call itself ended with it (the function raised, timed out, or Modal failed the input).

    modal 1.6.4's ``FunctionCall.get`` raises the function's own exception, or
    ``FunctionTimeoutError`` / ``InternalFailure`` / ``RemoteError`` for a call that
    ended; anything about reaching the call (unknown id, credentials, the connection,
    an expired output) says nothing about what the job did.
    """
    import modal.exception as modal_error

    if isinstance(error, modal_error.NotFoundError):
        return (f"Modal does not know this call from here (another Modal profile, workspace "
                f"or environment?): {error}")
    if isinstance(error, modal_error.AuthError | modal_error.PermissionDeniedError):
        return f"Modal refused this client's credentials: {type(error).__name__}: {error}"
    if isinstance(error, modal_error.OutputExpiredError):
        return ("the call's output expired at Modal (results are kept for a limited time); "
                "the job's own record on the volume says what it did")
    if isinstance(error, modal_error.ConnectionError | modal_error.ServiceError
                  | modal_error.InternalError | modal_error.ResourceExhaustedError
                  | modal_error.VersionError | ConnectionError | OSError):
        return f"lost the connection to Modal: {type(error).__name__}: {error}"
    try:
        from grpclib import GRPCError
    except ImportError:  # pragma: no cover - modal depends on grpclib
        return None
    if isinstance(error, GRPCError):
        return f"Modal's API answered {type(error).__name__}: {error}"
    return None


class _ModalRunner:
    """Spawned calls, each awaited in its own daemon thread by call id.

    ``starmap(order_outputs=False)`` would yield in completion order too, but without
    telling which input an exception belongs to (modal 1.6.4 drops the index), so a
    lost container could not be pinned on its job. Daemon threads: a Ctrl-C leaves
    no thread blocked in ``get()`` to hold the interpreter open.

    A client-side error while waiting (``client_error_cause``) is not the call's
    outcome: the runner reconnects by call id (``FunctionCall.from_id``) with backoff
    for up to ``reconnect_s``, then reports the call as ``CallInFlight``.
    """

    def __init__(self, function: Any, call_from_id: Any = None,
                 reconnect_s: float | None = None) -> None:
        self.function = function
        self.call_from_id = call_from_id or _modal_call_from_id
        self.reconnect_s = reconnect_window_s() if reconnect_s is None else reconnect_s
        self.calls: list[Any] = []

    def start(self, inputs: Sequence[tuple[bytes, str | None]]) -> list[str | None]:
        import modal.exception  # noqa: F401 - imported now, not by the first failing call

        self.calls = []
        for args in inputs:  # appended one by one: a Ctrl-C here knows what was sent
            self.calls.append(self.function.spawn(*args))
        return [call_id_of(call) for call in self.calls]

    def results(self) -> Iterator[tuple[int, Any]]:
        import queue
        import threading

        finished: queue.Queue[tuple[int, Any]] = queue.Queue()
        for index, call in enumerate(self.calls):
            threading.Thread(target=lambda i=index, c=call: finished.put((i, self._await(c))),
                             daemon=True, name=f"tmgg-modal-call-{index}").start()
        for _ in self.calls:
            while True:
                try:  # a short wait keeps the main thread responsive to Ctrl-C
                    item = finished.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield item
                break

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        self.start(inputs)
        yield from self.results()

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        return str(self.function.spawn(*args).object_id)

    def cancel(self, call_id: str) -> None:
        self.call_from_id(call_id).cancel(terminate_containers=True)

    def _await(self, call: Any) -> Any:
        """The call's return value or the exception it ended with; ``CallInFlight`` when
        the client could not reach it for ``reconnect_s`` seconds."""
        call_id = call_id_of(call)
        first_error: float | None = None
        delay = 1.0
        while True:
            try:
                return call.get()
            except Exception as error:  # noqa: BLE001 - the input's failure is its output
                cause = client_error_cause(error)
                if cause is None:
                    return error
            now = time.monotonic()
            first_error = now if first_error is None else first_error
            left = first_error + self.reconnect_s - now
            if call_id is None or left <= 0:
                log.warning("call %s: %s; left running, collect it with `tmgg-sweep status`",
                            call_id, cause)
                return CallInFlight(call_id, cause)
            log.warning("call %s: %s; reconnecting by call id (for %.0fs more)", call_id,
                        cause, left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)
            try:
                call = self.call_from_id(call_id)
            except Exception as error:  # noqa: BLE001 - tried again until the window ends
                if client_error_cause(error) is None:
                    return error


def call_id_of(call: Any) -> str | None:
    call_id = getattr(call, "object_id", None)
    return str(call_id) if call_id else None


def _modal_call_from_id(call_id: str) -> Any:
    import modal

    return modal.FunctionCall.from_id(call_id)


@contextlib.contextmanager
def _modal_runner(settings: ModalSettings, detach: bool) -> Iterator[Runner]:
    import modal

    from tmgg.launch.modal.app import build_app

    built = build_app(settings.app_name, settings.volume, settings.wandb_secret,
                      settings.timeout_s)
    output = modal.enable_output() if settings.progress else contextlib.nullcontext()
    # Detached even for a blocking sweep: the calls must outlive a lost connection or a
    # Ctrl-C answered "leave them running" (app.run's own Ctrl-C handling would stop
    # the app). A blocking sweep stops its calls itself when told to.
    with output, built.app.run(detach=True):
        yield _ModalRunner(built.function.with_options(**settings.function_options()))


def _container_main(conn: Any, spec: dict[str, Any]) -> None:
    """A local container: import the Modal app once, then run inputs with Function.local()."""
    import warnings

    os.environ.update(spec.get("env") or {})
    os.environ.pop("WANDB_SERVICE", None)  # a container runs its own wandb-core, as on Modal
    _mount_volume_view()
    warnings.filterwarnings("ignore", message=_LOCAL_VOLUME_WARNING)
    from tmgg.launch.modal.app import build_app

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


class ImageLayout:
    """Read-only copies of what the Modal image holds, at the image's paths under a
    temporary root: ``<root>/root/tmgg``, ``<root>/root/hydra_plugins/...``,
    ``<root>/conf`` (``modal_app.ImageSources``, the image's own list). Local
    containers import tmgg from there, not from the checkout, so a file the image
    leaves out, or a path that only exists in a checkout, fails here first.

    ``conf/`` is found from the copied package as in the image (``/root/tmgg`` ->
    ``/conf``), unless ``TMGG_CONF_DIR`` names another.
    """

    IGNORE = ("__pycache__", "*.pyc", ".*")  # as build_image's add_local_dir ignores

    def __init__(self) -> None:
        import shutil
        import tempfile

        from tmgg.launch.modal.app import CONTAINER_CONF_DIR, CONTAINER_ROOT, ImageSources

        sources = ImageSources.installed()
        self.root = Path(tempfile.mkdtemp(prefix="tmgg-image-"))
        self.python_root = self.root / CONTAINER_ROOT.lstrip("/")
        ignore = shutil.ignore_patterns(*self.IGNORE)
        for remote, local in sources.packages.items():
            shutil.copytree(local, self.python_root / remote, ignore=ignore)
        shutil.copytree(sources.conf_dir, self.root / CONTAINER_CONF_DIR.lstrip("/"),
                        ignore=ignore)
        # The checkout directories that hold the packages: left off a container's path.
        self.replaced = {str(local.parents[remote.count("/")]) for remote, local
                         in sources.packages.items()}
        _set_writable(self.root, False)

    @contextlib.contextmanager
    def importing(self) -> Iterator[None]:
        """While a container process starts: multiprocessing's spawn hands the child this
        process's ``sys.path``, here with the copies in place of the checkout."""
        saved = list(sys.path)
        sys.path[:] = [str(self.python_root)] + [
            entry for entry in saved
            if str(Path(entry or ".").resolve()) not in self.replaced]
        try:
            yield
        finally:
            sys.path[:] = saved

    def remove(self) -> None:
        import shutil

        _set_writable(self.root, True)
        shutil.rmtree(self.root, ignore_errors=True)


def _set_writable(root: Path, writable: bool) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            os.chmod(Path(directory) / name, 0o644 if writable else 0o444)
        os.chmod(directory, 0o755 if writable else 0o555)


def _mount_volume_view() -> None:
    """A container's own view of the stand-in volume (``snapshot_volume``), if asked."""
    from tmgg.launch.modal.app import LOCAL_VOLUME_DIR_ENV
    from tmgg.launch.snapshot_volume import SNAPSHOTS_ENV, mount_for_container

    views, volume = os.environ.get(SNAPSHOTS_ENV), os.environ.get(LOCAL_VOLUME_DIR_ENV)
    if not views or not volume:
        return
    try:
        mount_for_container(volume, views)
    except OSError as error:
        log.warning("the stand-in volume %s is written in place: no private mounts here "
                    "(%s); set hydra.launcher.local_volume_snapshots=false to say so",
                    volume, error)


class LocalContainers:
    """Warm worker processes with the semantics of Modal's ``map`` on one function.

    Outputs come as inputs finish, with their index; at most ``size`` containers run
    at once, each from the image's layout (``ImageLayout``), and each takes input after
    input; an input whose container dies, runs
    past the timeout or raises is retried with modal.Retries' backoff in a fresh or
    another warm container, and after the last retry its failure is the output
    (``return_exceptions=True``).
    """

    def __init__(self, settings: ModalSettings, size: int) -> None:
        self.settings = settings
        self.size = max(1, size)
        self.spec = settings.container_spec()
        self.context = multiprocessing.get_context("spawn")

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        n = len(inputs)
        attempts = [0] * n
        ready_at = [0.0] * n
        queue = list(range(n))
        started: dict[int, float] = {}  # when each running input began, as Modal counts
        failed: list[tuple[int, Any]] = []  # inputs out of retries, to yield
        timeout = float(self.settings.timeout_s)
        done = 0

        def lost(position: int, failure: JobFailure) -> None:
            started.pop(position, None)
            attempts[position] += 1
            if attempts[position] <= self.settings.max_retries:
                delay = self.settings.retry_delay(attempts[position])
                log.warning("input %d: %s: %s; retry %d of %d in %.1fs", position,
                            failure.error_type, failure.message, attempts[position],
                            self.settings.max_retries, delay)
                ready_at[position] = time.monotonic() + delay
                queue.append(position)
            else:
                failed.append((position, failure))

        image = ImageLayout()
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(image.remove)
            from tmgg.launch.snapshot_volume import SNAPSHOTS_ENV, remove_stale_views

            views = (self.spec.get("env") or {}).get(SNAPSHOTS_ENV)
            if views:  # after the containers: the views of those gone are dropped
                cleanup.callback(remove_stale_views, Path(views))
            pool = cleanup.enter_context(WorkerPool(
                self.context, _container_main, (self.spec,), self.size,
                "tmgg-local-container"))
            while done < n:
                now = time.monotonic()
                for position in [p for p in queue if ready_at[p] <= now]:
                    with image.importing():  # a fresh container starts from the image
                        container = pool.idle_worker()
                    if container is None:
                        break
                    queue.remove(position)
                    try:
                        container.send(position, inputs[position])
                    except OSError:  # the container died while starting
                        pool.discard(container)
                        lost(position, JobFailure("ContainerCrashed", "the container for "
                                                  f"input {position} died while starting", ""))
                busy = pool.busy()
                waits = [started[c.task] + timeout - now for c in busy if c.task in started]
                waits += [ready_at[p] - now for p in queue if ready_at[p] > now]
                for container, reply in pool.wait(timeout=max(0.0, min([1.0, *waits]))):
                    position = container.task
                    if isinstance(reply, Died):
                        lost(position, JobFailure("ContainerCrashed", reply.describe(
                            f"container running input {position}") + " before returning a "
                            "result", ""))
                        continue
                    status, value = reply
                    if status == "started":
                        started[position] = time.monotonic()
                        continue
                    container.task = None
                    started.pop(position, None)
                    if status == "ok":
                        done += 1
                        yield position, value
                    else:
                        lost(position, deserialize(value))
                for container in pool.busy():
                    position = container.task
                    if position in started and time.monotonic() - started[position] > timeout:
                        pool.discard(container)
                        lost(position, JobFailure(
                            "FunctionTimeoutError", f"input {position} ran longer than "
                            f"hydra.launcher.timeout_s={self.settings.timeout_s}s", ""))
                while failed:
                    done += 1
                    yield failed.pop(0)


class _LocalRunner:
    """Warm local containers for a blocking sweep (no call ids: they end with the
    launcher), detached local calls for ``spawn``."""

    def __init__(self, settings: ModalSettings, size: int, calls_dir: Path | None) -> None:
        self.settings = settings
        self.size = size
        self.calls_dir = calls_dir
        self.inputs: Sequence[tuple[bytes, str | None]] = ()

    def start(self, inputs: Sequence[tuple[bytes, str | None]]) -> list[str | None]:
        self.inputs = inputs
        return [None] * len(inputs)

    def results(self) -> Iterator[tuple[int, Any]]:
        yield from LocalContainers(self.settings, self.size).map(self.inputs)

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        self.start(inputs)
        yield from self.results()

    def cancel(self, call_id: str) -> None:
        from tmgg.launch.modal.calls import cancel_call

        assert self.calls_dir is not None
        cancel_call(call_id, self.calls_dir.parent.parent)

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """A detached local call: a session-leader process that outlives the launcher.

        Its input goes through a pipe (no pickle is left on disk to be read back)."""
        from tmgg.jobs.ledger import atomic_write_json
        from tmgg.jobs.process_identity import ProcessIdentity

        assert self.calls_dir is not None
        self.calls_dir.mkdir(parents=True, exist_ok=True)
        call_id = f"{LOCAL_CALL_PREFIX}{uuid.uuid4().hex[:20]}"
        spec = {"settings": dataclasses.asdict(self.settings), "args": args,
                "slots": self.size}
        with open(self.calls_dir / f"{call_id}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, *local_call_arguments(self.calls_dir, call_id)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        identity = ProcessIdentity.of(process.pid)
        atomic_write_json(self.calls_dir / f"{call_id}.proc.json",
                          identity.to_json() if identity else {"pid": process.pid})
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died at start: polled as crashed
            process.stdin.write(serialize(spec))
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        return call_id


def local_call_arguments(calls_dir: Path, call_id: str) -> tuple[str, ...]:
    """The command line of a detached local call after the interpreter (names the call)."""
    return ("-m", "tmgg.launch.modal.transport", "local-call", str(calls_dir), call_id)


@contextlib.contextmanager
def open_runner(settings: ModalSettings, detach: bool, size: int,
            calls_dir: Path | None) -> Iterator[Runner]:
    if settings.transport == "modal":
        with _modal_runner(settings, detach) as runner:
            yield runner
    elif settings.local_calls and calls_dir is not None:
        from tmgg.launch.modal.calls import LocalFunction

        local = _LocalRunner(settings, size, calls_dir)
        yield _ModalRunner(LocalFunction(local), call_from_id=LocalFunction.call_from_id(
            calls_dir))
    else:
        yield _LocalRunner(settings, size, calls_dir)


def _local_call_main(calls_dir: Path, call_id: str) -> int:
    """Body of a detached local call: wait for a container slot, run, write the result."""
    import fcntl

    from tmgg.launch.modal.results import result_data

    spec = deserialize(sys.stdin.buffer.read())  # from the launcher that started us
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
    _, output = next(iter(LocalContainers(settings, 1).map([tuple(spec["args"])])))
    out = calls_dir / f"{call_id}.out"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result_data(output), default=str))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "local-call":
        sys.exit(_local_call_main(Path(sys.argv[2]), sys.argv[3]))
    print("usage: python -m tmgg.launch.modal.transport local-call CALLS_DIR CALL_ID",
          file=sys.stderr)
    sys.exit(2)
