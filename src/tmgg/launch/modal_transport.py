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
  local call is a session-leader process (``python -m tmgg.launch.modal_transport
  local-call``) that reads its input from a pipe and writes its result as JSON data
  (``<call id>.out``) under the stage's ledger directory, beside a record of the
  process (``<call id>.proc.json``) that lets ``cancel`` prove which process it is.
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

from tmgg.launch.modal_settings import ModalSettings
from tmgg.launch.worker_pool import Died, WorkerPool
from tmgg.orchestration.executor import JobFailure, deserialize, serialize

log = logging.getLogger(__name__)
# Checked against modal 1.6.4 (Function.with_options, starmap's ordering and
# return_exceptions, spawn, Retries' backoff); tests/test_lock.py fails when the lock
# moves modal off it.
MODAL_CHECKED_VERSION = "1.6.4"

LOCAL_CALL_PREFIX = "local-fc-"
_LOCAL_VOLUME_WARNING = ".*executing locally and will not have access to the mounted Volume.*"


# -- the transport boundary --------------------------------------------------------


class Runner(Protocol):
    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        """``(index, output)`` per input as each finishes; a failed input's output is
        its exception. Completion order: one slow job holds back no finished result."""

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """Start one call without waiting; its call id."""


class _ModalRunner:
    def __init__(self, function: Any) -> None:
        self.function = function

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        """Spawned calls, each awaited in its own thread.

        ``starmap(order_outputs=False)`` would yield in completion order too, but
        without telling which input an exception belongs to (modal 1.6.4 drops the
        index), so a lost container could not be pinned on its job.
        """
        from concurrent.futures import ThreadPoolExecutor, as_completed

        calls = [self.function.spawn(*args) for args in inputs]
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(calls), 256)),
                                  thread_name_prefix="tmgg-modal-result")
        try:
            futures = {pool.submit(_output_of, call): index for index, call in enumerate(calls)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        return str(self.function.spawn(*args).object_id)


def _output_of(call: Any) -> Any:
    """A FunctionCall's return value, or the exception it ended with."""
    try:
        return call.get()
    except Exception as error:  # noqa: BLE001 - the input's failure is its output
        return error


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
    os.environ.pop("WANDB_SERVICE", None)  # a container runs its own wandb-core, as on Modal
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


class LocalContainers:
    """Warm worker processes with the semantics of Modal's ``map`` on one function.

    Outputs come as inputs finish, with their index; at most ``size`` containers run
    at once and each takes input after input; an input whose container dies, runs
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

        with WorkerPool(self.context, _container_main, (self.spec,), self.size,
                        "tmgg-local-container") as pool:
            while done < n:
                now = time.monotonic()
                for position in [p for p in queue if ready_at[p] <= now]:
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
    def __init__(self, settings: ModalSettings, size: int, calls_dir: Path | None) -> None:
        self.settings = settings
        self.size = size
        self.calls_dir = calls_dir

    def map(self, inputs: Sequence[tuple[bytes, str | None]]) -> Iterator[tuple[int, Any]]:
        yield from LocalContainers(self.settings, self.size).map(inputs)

    def spawn(self, args: tuple[bytes, str | None]) -> str:
        """A detached local call: a session-leader process that outlives the launcher.

        Its input goes through a pipe (no pickle is left on disk to be read back)."""
        from tmgg.launch.process_identity import ProcessIdentity
        from tmgg.orchestration.ledger import atomic_write_json

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
    return ("-m", "tmgg.launch.modal_transport", "local-call", str(calls_dir), call_id)


@contextlib.contextmanager
def open_runner(settings: ModalSettings, detach: bool, size: int,
            calls_dir: Path | None) -> Iterator[Runner]:
    if settings.transport == "modal":
        with _modal_runner(settings, detach) as runner:
            yield runner
    else:
        yield _LocalRunner(settings, size, calls_dir)


def _local_call_main(calls_dir: Path, call_id: str) -> int:
    """Body of a detached local call: wait for a container slot, run, write the result."""
    import fcntl

    from tmgg.launch.modal_results import result_data

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
    print("usage: python -m tmgg.launch.modal_transport local-call CALLS_DIR CALL_ID",
          file=sys.stderr)
    sys.exit(2)
