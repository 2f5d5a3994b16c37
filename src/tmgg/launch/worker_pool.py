"""Warm worker processes with one pipe each: a dead worker fails its own task only.

``concurrent.futures.ProcessPoolExecutor`` marks the whole pool broken when one
worker dies (the kernel's OOM killer, a SIGKILL), failing every in-flight and queued
task of the healthy workers with it. Here each worker has its own duplex pipe and the
pool waits on every pipe and every process sentinel, so a death is seen as that
worker's alone: its task is reported with the exit code, the worker is dropped, and
the next ``idle_worker`` call starts a fresh one. Used by the local launcher's
workers and by the Modal launcher's local stand-in containers.

Workers run ``target(conn, *args)``: receive a message, send replies, until the pipe
closes or ``None`` arrives. What a task is and what its replies mean is the caller's.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from typing import Any


def exit_description(exitcode: int | None) -> str:
    """How a process ended, in words: 'was killed by SIGKILL (signal 9)', 'exited with code 1'."""
    if exitcode is None:
        return "ended with an unknown exit status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" \
            if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name} (signal {-exitcode}){hint}"
    return f"exited with code {exitcode}"


@dataclass
class Died:
    """What the pool reports for a busy worker whose process ended."""

    pid: int | None
    exitcode: int | None

    def describe(self, what: str = "worker process") -> str:
        return f"the {what} (pid {self.pid}) {exit_description(self.exitcode)}"


class Worker:
    """One process and the parent's end of its pipe; ``task`` is the caller's token."""

    def __init__(self, context: Any, target: Callable[..., None], args: Sequence[Any],
                 name: str) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), name=name)
        self.process.start()
        child.close()
        self.task: Any = None  # set by the caller while the worker runs something

    def send(self, task: Any, message: Any) -> None:
        """Hand the worker a task; OSError if it died while idle."""
        self.task = task
        self.conn.send(message)

    def stop(self, kill: bool = False, timeout: float = 5.0) -> None:
        if not kill:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class WorkerPool:
    """At most ``size`` workers, started on demand and kept warm between tasks."""

    def __init__(self, context: Any, target: Callable[..., None], args: Sequence[Any],
                 size: int, name: str) -> None:
        self.context = context
        self.target = target
        self.args = tuple(args)
        self.size = max(1, size)
        self.name = name
        self.workers: list[Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def busy(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.task is not None]

    def idle_worker(self) -> Worker | None:
        """A warm idle worker, a new one while under ``size``, or None when all are busy."""
        for worker in list(self.workers):
            if worker.task is None:
                if worker.process.is_alive():
                    return worker
                self.discard(worker)  # went away while idle
        if len(self.workers) < self.size:
            worker = Worker(self.context, self.target, self.args, self.name)
            self.workers.append(worker)
            return worker
        return None

    def discard(self, worker: Worker, kill: bool = True) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        worker.stop(kill=kill)

    def wait(self, timeout: float | None = None) -> list[tuple[Worker, Any]]:
        """Replies of busy workers, and ``Died`` for busy workers whose process ended.

        A reply sent just before the process died is delivered first. A dead worker is
        removed from the pool (its task stays set, for the caller to read).
        """
        busy = self.busy()
        if not busy:
            return []
        ready = set(wait_for([w.conn for w in busy] + [w.process.sentinel for w in busy],
                             timeout=timeout))
        events: list[tuple[Worker, Any]] = []
        for worker in busy:
            if worker.conn in ready:
                try:
                    events.append((worker, worker.conn.recv()))
                    continue
                except (EOFError, OSError):
                    pass  # the pipe closed: the process is gone or going
            elif worker.process.sentinel not in ready:
                continue
            worker.process.join(timeout=5)
            events.append((worker, Died(worker.process.pid, worker.process.exitcode)))
            self.discard(worker)
        return events

    def close(self) -> None:
        """Stop idle workers politely and kill busy ones (their tasks are abandoned)."""
        for worker in list(self.workers):
            self.discard(worker, kill=worker.task is not None)
