"""``tmgg-train``: the Hydra application. One job, or a sweep with ``-m``."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

import tmgg  # noqa: F401  (registers the tmgg.* resolvers before composition)
from tmgg.config import CONF_DIR

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> Any:
    """The task function every launcher runs: train, test, return the metrics.

    First the job is begun here, not in a Hydra callback (whose exceptions Hydra turns
    into warnings): its claim taken and its RUNNING record written, or the job is not
    run. A job the ledger records as finished, or whose claim another dispatch holds,
    returns a ``JobSkipped`` (never a result: launchers record it as skipped). While it
    trains, losing the claim (a newer generation, a lease not renewed) stops it with
    ``ClaimLost`` within one renewal interval.
    """
    from tmgg.orchestration.sweep import HeldJob, JobSkipped, begin_job

    begun = begin_job(cfg)
    if isinstance(begun, JobSkipped):
        log.warning("Job %s skipped: %s", cfg.job.run_name, begun.detail)
        return begun
    from tmgg.task.train import run_training

    if isinstance(begun, HeldJob):
        from tmgg.orchestration.claims import lightning_fence, verify

        verify(begun.latest_claim())  # fenced: nothing (W&B run included) starts after a loss
        return run_training(cfg, extra_callbacks=[lightning_fence(begun.check)])
    return run_training(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return train(cfg)


if __name__ == "__main__":
    main()
