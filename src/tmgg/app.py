"""``tmgg-train``: the Hydra application. One job, or a sweep with ``-m``."""

from __future__ import annotations

import logging
import sys
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

    metrics = run_training(cfg)
    print_run_summary(cfg, metrics)
    return metrics


def print_run_summary(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """A single run (no -m) ends with its test metrics and where its files are; a
    sweep's jobs do not print (the launcher's display reports them)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    names = ("test/mse", "test/loss", "test/accuracy", "test/f1")
    shown = [f"{name} {float(metrics[name]):.4f}" for name in names if name in metrics]
    print(f"{cfg.job.run_name} tested: {', '.join(shown) or 'no test metrics'}", flush=True)
    for reference in ("no_edges", "noisy_input"):
        name = f"test_reference_{reference}/mse"
        if name in metrics:
            print(f"  reference {reference}: test/mse {float(metrics[name]):.4f}", flush=True)
    print(f"output: {HydraConfig.get().runtime.output_dir}", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return train(cfg)


def main() -> Any:
    """``tmgg-train``: refuse a misplaced launcher override before Hydra composes."""
    from tmgg.cli_guards import launcher_override_refusal

    refusal = launcher_override_refusal(sys.argv[1:])
    if refusal is not None:
        print(f"tmgg-train: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return hydra_main()
    except KeyboardInterrupt:  # before any job was dispatched (the launcher handles it after)
        print("interrupted: nothing was dispatched", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
