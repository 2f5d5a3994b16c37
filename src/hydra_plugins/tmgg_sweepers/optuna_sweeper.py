"""``hydra/sweeper=tmgg_optuna``: an adaptive stage's trials chosen by Optuna, each a
complete tmgg job dispatched through the configured launcher (tmgg.launch.adaptive)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 (OmegaConf 2.3 needs typing)

# No `from __future__ import annotations`: Hydra loads plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class TmggOptunaSweeperConf:
    _target_: str = "hydra_plugins.tmgg_sweepers.optuna_sweeper.TmggOptunaSweeper"
    # The search space, in hydra-optuna-sweeper's syntax: interval(a, b) (a float),
    # tag(log, interval(a, b)) (log scale), tag(int, interval(a, b)), range(a, b[, step])
    # (both ends included), choice(x, y, z); a plain value is fixed; a comma list (the
    # seeds: 1,2,3) is run by every trial, one job per value, its value their mean.
    params: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006
    # Trials in all: a resumed sweep, or a second shell, continues toward this total
    # (counted from the ledger).
    n_trials: int = 20
    # Trials run at once (threads, each handing one trial at a time to the launcher; a
    # free one takes a new trial as soon as its last ended).
    n_jobs: int = 1
    # Trials in rounds of n_jobs, their jobs handed to the launcher together so that
    # jobs sharing a batch stream (same seed and data) train as one fused group
    # (needs hydra.launcher.fuse=auto). A round waits for its slowest group: fusion
    # shares each batch, asynchronous trials (false) keep every worker busy
    # (docs/adaptive.md, "Fusion and asynchronous trials").
    fuse_trials: bool = False
    # tpe (Optuna's TPESampler with constant_liar) or random.
    sampler: str = "tpe"
    # The sampler's seed: the same command asks the same first trials.
    seed: Optional[int] = 0  # noqa: UP045
    # minimize or maximize the metric.
    direction: str = "minimize"
    # The job metric a trial is judged by (the mean over its repeats): a key of the
    # job's recorded metrics (val/loss, test/mse, ...).
    metric: str = "val/loss"
    # none, median (Optuna's MedianPruner), percentile (PercentilePruner),
    # successive_halving (SuccessiveHalvingPruner: asynchronous successive halving) or
    # hyperband (HyperbandPruner). A pruning
    # trial's job reports the metric at each validation through the ledger and waits
    # for the decision; a pruned job stops there and is recorded PRUNED (never resumed).
    pruner: str = "none"
    # Trials that complete before any is pruned; steps before a trial may be.
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    # percentile: prune a trial below this percentile of the others at the same step.
    pruner_percentile: float = 25.0
    # successive_halving / hyperband: the steps of the first rung (null: the first
    # validation, trainer.val_check_interval), Hyperband's largest budget (null:
    # trainer.max_steps), and the factor between rungs (the top 1/factor go on).
    pruner_min_resource: Optional[int] = None  # noqa: UP045
    pruner_max_resource: Optional[int] = None  # noqa: UP045
    pruner_reduction_factor: int = 3
    # Seconds a job waits for its sweeper's decision before it trains on (a sweeper
    # that died): never reached while the sweeper runs.
    decision_timeout_s: float = 120.0


ConfigStore.instance().store(group="hydra/sweeper", name="tmgg_optuna",
                             node=TmggOptunaSweeperConf, provider="tmgg")


class TmggOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: Optional[DictConfig] = None  # noqa: UP045
        self.hydra_context: Optional[HydraContext] = None  # noqa: UP045
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:  # noqa: UP006
        from tmgg.launch.adaptive import AdaptiveStudy, launcher_without_live_display

        assert self.config is not None and self.hydra_context is not None
        study = AdaptiveStudy(self.config, self.hydra_context.config_loader, self.launcher,
                              arguments)
        launcher_without_live_display(self.launcher, study.n_jobs)
        return [study.run()]
