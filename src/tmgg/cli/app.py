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


def train(cfg: DictConfig) -> Any:
    """The task function every launcher runs: train, test, return the metrics.

    First the job is begun here, not in a Hydra callback (whose exceptions Hydra turns
    into warnings): its claim taken and its RUNNING record written, or the job is not
    run. A job the ledger records as finished, or whose claim another dispatch holds,
    returns a ``JobSkipped`` (never a result: launchers record it as skipped). While it
    trains, losing the claim (a newer generation, a lease not renewed) stops it with
    ``ClaimLost`` within one renewal interval.
    """
    from tmgg.jobs.sweep import HeldJob, JobSkipped, begin_job

    begun = begin_job(cfg)
    if isinstance(begun, JobSkipped):
        log.warning("Job %s skipped: %s", cfg.job.run_name, begun.detail)
        return begun
    from tmgg.jobs.trials import PRUNED_AT_KEY, trial_reporter
    from tmgg.task.train import run_training

    # A trial of a pruning study reports each validation to its sweeper (tmgg.jobs.trials).
    reporter = trial_reporter(cfg)
    extra = [reporter] if reporter is not None else []
    if isinstance(begun, HeldJob) and begun.holds_own_claim:
        from tmgg.jobs.claims import lightning_fence, verify

        latest = begun.latest_claim()
        assert latest is not None
        verify(latest)  # fenced: nothing (W&B run included) starts after a loss
        metrics = run_training(cfg, extra_callbacks=[lightning_fence(begun.check), *extra])
    else:
        metrics = run_training(cfg, extra_callbacks=extra)
    if reporter is not None and reporter.pruned_at is not None:
        metrics[PRUNED_AT_KEY] = reporter.pruned_at  # recorded PRUNED (tmgg.jobs.sweep)
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
    from tmgg.cli.guards import launcher_override_refusal

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
