"""``tmgg-train``: the Hydra application. One job, or a sweep with ``-m``."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

import tmgg  # noqa: F401  (registers the tmgg.* resolvers before composition)
from tmgg.config import CONF_DIR

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """The task function every launcher runs: train, test, return the metrics.

    A job the ledger already records as finished is not trained again: re-running a
    stage (with any launcher) only runs what is missing or failed. Nor is a job that
    another dispatch holds the claim of (``tmgg.orchestration.claims``).
    """
    from tmgg.orchestration.sweep import claimed_elsewhere, finished_metrics

    holder = claimed_elsewhere(cfg)
    if holder is not None:  # another sweep or shell runs this job right now
        log.warning("Job %s skipped: %s", cfg.job.run_name, holder)
        return {"claimed_by": holder}
    recorded = finished_metrics(cfg)
    if recorded is not None:
        log.info("Job %s already finished; skipped (its recorded metrics are returned)",
                 cfg.job.run_name)
        return recorded
    from tmgg.task.train import run_training

    return run_training(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return train(cfg)


if __name__ == "__main__":
    main()
