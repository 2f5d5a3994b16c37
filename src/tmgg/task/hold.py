"""A test-side hook: hold a job at a training step until the test lets it through.

With ``TMGG_TEST_HOLD_AT_STEP=N`` and ``TMGG_TEST_HOLD_FILE=<path>`` set, a job (a solo
job, or a fused group's one trainer) that reaches the start of training step N, its
checkpoints up to then written, creates ``<path>.held.<pid>.<n>`` (its pid inside) and
waits until ``<path>`` exists, then takes it (renames it away, atomically): one release
file lets exactly one held job through, and the next job to reach step N holds again.
A test kills, cancels or releases jobs at known points instead of racing the clock
with sleeps. Outside tests neither variable is set and no callback is added.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOLD_AT_STEP_ENV = "TMGG_TEST_HOLD_AT_STEP"
HOLD_FILE_ENV = "TMGG_TEST_HOLD_FILE"
_holds = itertools.count()


def hold_callbacks() -> list[Any]:
    """The hold callback when the environment asks for one, else nothing."""
    step, path = os.environ.get(HOLD_AT_STEP_ENV), os.environ.get(HOLD_FILE_ENV)
    if not step or not path:
        return []
    from lightning.pytorch.callbacks import Callback

    class HoldAtStep(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == int(step):
                # Lightning's own SIGTERM handler only flags the trainer: a held job
                # stops holding on it, so a cancelled job still stops at this step.
                hold(Path(path), lambda: bool(getattr(trainer, "received_sigterm", False)))

    return [HoldAtStep()]


def hold(release: Path, stopped: Callable[[], bool] = lambda: False) -> None:
    """Say this process is held, then wait until ``release`` exists and take it (or
    until ``stopped()``: the process was told to stop)."""
    pid = os.getpid()
    release.with_name(f"{release.name}.held.{pid}.{next(_holds)}").write_text(str(pid))
    taken = release.with_name(f"{release.name}.taken.{pid}.{time.monotonic_ns()}")
    while not stopped():
        try:
            os.rename(release, taken)
            return
        except FileNotFoundError:
            time.sleep(0.01)
