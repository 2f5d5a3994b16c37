"""A test-side hook: hold a job at a training step until a file exists.

With ``TMGG_TEST_HOLD_AT_STEP=N`` and ``TMGG_TEST_HOLD_FILE=<path>`` set, a job (a solo
job, or a fused group's one trainer) that reaches the start of training step N, its
checkpoints up to then written, creates ``<path>.held.<pid>`` and waits until ``<path>``
exists. A test then kills, cancels or releases it at a known point instead of racing
the clock with sleeps: the job cannot finish before the test has acted. Outside tests
neither variable is set and no callback is added.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

HOLD_AT_STEP_ENV = "TMGG_TEST_HOLD_AT_STEP"
HOLD_FILE_ENV = "TMGG_TEST_HOLD_FILE"


def hold_callbacks() -> list[Any]:
    """The hold callback when the environment asks for one, else nothing."""
    step, path = os.environ.get(HOLD_AT_STEP_ENV), os.environ.get(HOLD_FILE_ENV)
    if not step or not path:
        return []
    from lightning.pytorch.callbacks import Callback

    class HoldAtStep(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step != int(step):
                return
            release = Path(path)
            Path(f"{path}.held.{os.getpid()}").write_text(str(os.getpid()))
            while not release.exists():
                time.sleep(0.01)

    return [HoldAtStep()]
