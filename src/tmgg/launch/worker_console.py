"""A local worker's side of a readable sweep: its jobs' terminal output goes to each
job's own ``console.log``, and the training steps it runs are counted for the launcher.

wandb, Lightning, warnings and anything a job prints write to file descriptors 1 and 2
of the worker, below Python (wandb's service writes to them too). The worker points
both at one pipe, once; a thread copies what arrives to the log files of the task it
runs now (every member's, for a fused group). The launcher's terminal shows only its
own display.

The step count is one shared integer for the whole sweep: a Lightning callback adds
one per training step of each job that trained in it (a fused step trains every
active member). The launcher reads it for its totals and its ETA.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import sys
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

CONSOLE_LOG = "console.log"
CALLBACK_FACTORY_ENV = "TMGG_CALLBACK_FACTORY"
STEP_CALLBACKS = f"{__name__}:step_callbacks"

# The sweep's shared step counter (a multiprocessing Value), in a worker process.
_STEPS: Any = None


class OutputCapture:
    """File descriptors 1 and 2 of this process, copied into the current task's logs."""

    def __init__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._lock = threading.Lock()
        self._files: list[IO[bytes]] = []
        threading.Thread(target=self._copy, name="tmgg-job-console", daemon=True).start()

    def _copy(self) -> None:
        while True:
            ready, _, _ = select.select([self._read_end], [], [], 0.2)
            if not ready:
                continue
            with self._lock:  # read and written under the lock: see ``into``
                chunk = os.read(self._read_end, 65536)
                if not chunk:
                    return
                for file in self._files:
                    file.write(chunk)
                    file.flush()

    def _unread(self) -> int:
        size = array.array("i", [0])
        fcntl.ioctl(self._read_end, termios.FIONREAD, size)
        return size[0]

    def _switch(self, files: list[IO[bytes]]) -> list[IO[bytes]]:
        """Point the copy at ``files`` once everything written so far is copied."""
        sys.stdout.flush()
        sys.stderr.flush()
        deadline = time.monotonic() + 2.0
        while True:
            with self._lock:
                if self._unread() == 0 or time.monotonic() > deadline:
                    previous, self._files = self._files, files
                    return previous
            time.sleep(0.01)

    @contextmanager
    def into(self, paths: Sequence[Path]) -> Iterator[None]:
        """While the block runs, what the process writes goes to each of ``paths``."""
        files = []
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(path.open("ab"))
        self._switch(files)
        try:
            yield
        finally:
            for file in self._switch([]):
                file.close()


_CAPTURE: OutputCapture | None = None


@contextmanager
def job_console(paths: Sequence[str]) -> Iterator[None]:
    """In a worker: the task's output into its jobs' logs (no paths: left as it is, for
    apps that are not tmgg's, whose output is theirs to show)."""
    global _CAPTURE
    if not paths:
        yield
        return
    if _CAPTURE is None:
        _CAPTURE = OutputCapture()
    with _CAPTURE.into([Path(path) for path in paths]):
        yield


def count_steps_in(counter: Any) -> None:
    """In a worker: add every training step to the sweep's ``counter``."""
    global _STEPS
    _STEPS = counter
    if counter is not None:
        os.environ.setdefault(CALLBACK_FACTORY_ENV, STEP_CALLBACKS)


def step_callbacks(cfg: Any, output_dir: Path) -> list[Any]:
    """The Lightning callbacks the job gets through ``TMGG_CALLBACK_FACTORY``."""
    if _STEPS is None:
        return []
    from lightning.pytorch.callbacks import Callback

    counter = _STEPS

    class CountSteps(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            members = len(getattr(pl_module, "active", ())) or 1  # a fused group's
            with counter.get_lock():
                counter.value += members

    return [CountSteps()]
