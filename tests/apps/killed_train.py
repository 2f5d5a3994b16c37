"""tmgg-train where one job's process is SIGKILLed mid-training, as the OOM killer would.

The job whose run name is ``TMGG_TEST_KILL_RUN`` sends itself SIGKILL at the
start of step ``TMGG_TEST_KILL_STEP`` (default 40), after its checkpoints up to then
were written: no Python clean-up, no record, no reply to its launcher. With
``TMGG_TEST_KILL_ONCE=<path>`` it does so only while that file does not exist; it then
writes there the step of the ``last.ckpt`` it leaves behind, so a retry can be checked
to resume from exactly that step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tmgg.cli.app import train
from tmgg.config import CONF_DIR


def _kill_at_step(step: int, marker: str | None) -> Any:
    from lightning.pytorch.callbacks import Callback

    class KillAtStep(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step != step:
                return
            if marker:
                import torch

                last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
                saved = torch.load(last, map_location="cpu", weights_only=False)
                Path(marker).write_text(json.dumps({"killed_at": step,
                                                    "checkpoint_step": saved["global_step"]}))
            os.kill(os.getpid(), signal.SIGKILL)

    return KillAtStep()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    marker = os.environ.get("TMGG_TEST_KILL_ONCE")
    chosen = str(cfg.job.run_name) == os.environ.get("TMGG_TEST_KILL_RUN")
    if chosen and not (marker and Path(marker).exists()):
        from tmgg.task.train import run_training

        step = int(os.environ.get("TMGG_TEST_KILL_STEP", "40"))
        return run_training(cfg, extra_callbacks=[_kill_at_step(step, marker)])
    return train(cfg)


if __name__ == "__main__":
    main()
