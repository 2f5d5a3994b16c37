"""A TMGG_CALLBACK_FACTORY that stops a job part-way, as a preempted machine would.

``TMGG_CALLBACK_FACTORY=interrupt:stop_at_step`` with ``TMGG_TEST_STOP_AT_STEP=N``:
the job raises at the start of step N, after its checkpoints up to then were written.
"""

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig


class StopAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected stop at step {self.step}")


def stop_at_step(cfg: DictConfig, output_dir: Path) -> list[Callback]:
    return [StopAtStep(int(os.environ["TMGG_TEST_STOP_AT_STEP"]))]
