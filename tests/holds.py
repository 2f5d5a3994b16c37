"""Test-side helpers for ``tmgg.task.hold``: wait for jobs held at a step, let them on.

A job started with ``TMGG_TEST_HOLD_AT_STEP=N`` and ``TMGG_TEST_HOLD_FILE=<release>``
writes ``<release>.held.<pid>.<n>`` when it reaches step N and waits for ``<release>``.
Tests wait for those files (a state, not a time) and kill, cancel or release the held
jobs at a known step, whatever the machine's speed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tmgg.task.hold import HOLD_AT_STEP_ENV, HOLD_FILE_ENV

#: A bound for a broken run (a job that never reaches its step), not a race.
BROKEN_RUN_S = 600.0


def hold_env(step: int, release: Path, base: Mapping[str, str] | None = None
             ) -> dict[str, str]:
    """The environment of a process whose jobs hold at ``step`` until ``release``."""
    return {**(os.environ if base is None else base), HOLD_AT_STEP_ENV: str(step),
            HOLD_FILE_ENV: str(release)}


def held_files(release: Path) -> list[Path]:
    """The hold announcements of ``release`` so far (taken or not)."""
    return sorted(release.parent.glob(f"{release.name}.held.*"))


def held_pids(release: Path) -> list[int]:
    """The pids of the processes that announced a hold on ``release``, in order."""
    return [int(path.read_text()) for path in held_files(release)]


def wait_for_holds(release: Path, count: int, *processes: subprocess.Popen[bytes],
                   describe: Callable[[], str] = lambda: "") -> list[int]:
    """Wait until ``count`` holds on ``release`` were announced; their pids.

    Fails at once when one of ``processes`` ends first (it can no longer hold)."""
    deadline = time.monotonic() + BROKEN_RUN_S
    while len(held := held_files(release)) < count:
        for process in processes:
            assert process.poll() is None, \
                f"process {process.pid} ended before {count} holds on {release.name}\n" \
                f"{describe()}"
        assert time.monotonic() < deadline, \
            f"never {count} holds on {release.name} ({len(held)})\n{describe()}"
        time.sleep(0.02)
    return [int(path.read_text()) for path in held[:count]]


@contextmanager
def released(release: Path) -> Iterator[None]:
    """While in the block, every hold on ``release`` is let through (the release file
    is put back as soon as a held job takes it)."""
    stop = threading.Event()

    def keep_released() -> None:
        while not stop.is_set():
            if not release.exists():
                release.write_text("go")
            stop.wait(0.02)

    thread = threading.Thread(target=keep_released, name=f"release-{release.name}",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + BROKEN_RUN_S
    while not pid_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def wait_until_group_gone(group: int) -> None:
    """Until every process of a SIGKILLed group is reaped: a killed worker stays a zombie
    (whose pid still answers, so its claim still looks alive) until init reaps it."""
    deadline = time.monotonic() + BROKEN_RUN_S  # a bound for a broken kill, not a race
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process group {group} still has members after SIGKILL")
