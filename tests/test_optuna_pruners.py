"""hydra.sweeper.pruner: successive_halving and hyperband (issue 23), decided like the
median pruner on a study rebuilt from the ledger's reported values."""

from __future__ import annotations

import random

import optuna
import pytest
from conftest import SweepDirs, tmgg_train
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from tmgg.jobs.ledger import FINISHED, PRUNED, Ledger
from tmgg.jobs.search_space import SearchSpaceError, stage_space
from tmgg.launch.adaptive import (
    COMPLETE,
    IN_FLIGHT,
    PRUNED_TRIAL,
    LedgerTrial,
    make_pruner,
    prune_decision,
)

STAGE = "tiny_search"


@pytest.mark.parametrize("kind", ["median", "successive_halving", "hyperband"])
def test_decisions_rebuilt_from_the_reports_are_optunas_own(kind: str) -> None:
    """Optuna's own study, its pruner called live at every report (keeping its rung
    bookkeeping in the trials), against the decision tmgg rebuilds from the reported
    values alone: the same at every report of 14 trials with noisy learning curves."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {"pruner": kind, "direction": "minimize", "pruner_startup_trials": 2,
                "pruner_warmup_steps": 0, "pruner_min_resource": 10,
                "pruner_max_resource": 80, "pruner_reduction_factor": 2}
    distributions = {"x": FloatDistribution(0.0, 1.0)}
    live = optuna.create_study(study_name=STAGE, direction="minimize",
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               pruner=make_pruner(settings))
    noise = random.Random(kind)
    trials: dict[tuple[str, ...], LedgerTrial] = {}
    decisions: list[tuple[bool, bool]] = []
    for _ in range(14):
        asked = live.ask(distributions)
        trial = LedgerTrial((f"x={asked.params['x']}",), dict(asked.params), status=IN_FLIGHT)
        trials[trial.key] = trial
        floor = noise.random()
        value = 0.0
        for step in range(10, 90, 10):
            value = floor + 2.0 / step + 0.05 * noise.random()
            asked.report(value, step)
            trial.reported[step] = value
            said = asked.should_prune()
            decisions.append((said, prune_decision(trial, trials, step, settings,
                                                   distributions, STAGE)))
            if said:
                break
        if decisions[-1][0]:
            live.tell(asked, state=TrialState.PRUNED)
            trial.status = PRUNED_TRIAL
        else:
            live.tell(asked, value)
            trial.status, trial.value = COMPLETE, value
    assert [rebuilt for _, rebuilt in decisions] == [said for said, _ in decisions]
    pruned = sum(said for said, _ in decisions)
    assert 0 < pruned < 14, decisions  # the comparison saw both answers


def test_bad_pruner_settings_are_refused_naming_the_field() -> None:
    from omegaconf import OmegaConf

    def config(**sweeper: object) -> object:
        return OmegaConf.create({"stage": {"name": STAGE}, "hydra": {"sweeper": {
            "n_trials": 2, "n_jobs": 1, "direction": "minimize", "sampler": "tpe",
            "pruner": "successive_halving", "params": {"optimizer.lr": "interval(0.1, 1)"},
            **sweeper}}})

    with pytest.raises(SearchSpaceError, match="hydra.sweeper.pruner: one of .*hyperband"):
        stage_space(config(pruner="asha"), [])
    with pytest.raises(SearchSpaceError, match="hydra.sweeper.pruner_reduction_factor"):
        stage_space(config(pruner_reduction_factor=1), [])
    with pytest.raises(SearchSpaceError, match="hydra.sweeper.pruner_min_resource"):
        stage_space(config(pruner_min_resource="ten"), [])
    assert stage_space(config(), []).dimensions  # the defaults are fine


def test_successive_halving_prunes_a_bad_trial(sweep_dirs: SweepDirs) -> None:
    """Trial 1 (lr 0.05) learns and is promoted at every rung (10, 30 steps); trial 2
    (lr 1e-9) is worse than it at the first rung and, with a reduction factor of 3,
    only the best third goes on: PRUNED at step 10, its rung values derived from the
    ledger's reported events."""
    overrides = ["stage=tiny_search", "trainer.max_steps=40", "logger=csv",
                 "trainer.val_check_interval=10", "data.val_samples=20",
                 "data.test_samples=20", "scheduler=none", "model.k=8",
                 "optimizer.lr=choice(0.05,1e-9)", "hydra/launcher=local",
                 "hydra.launcher.n_workers=1", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.sampler=random", "hydra.sweeper.seed=2",
                 "hydra.sweeper.pruner=successive_halving", *sweep_dirs.overrides]
    result = tmgg_train("-m", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    by_lr = {dict(o.split("=", 1) for o in s.overrides)["optimizer.lr"]: s
             for s in ledger.states().values()}
    good, bad = by_lr["0.05"], by_lr["1e-09"]
    assert good.status == FINISHED and good.record["metrics"]["global_step"] == 40
    assert bad.status == PRUNED, bad.record
    assert bad.record["pruned_at_step"] == 10
    assert [e["step"] for e in ledger.events()
            if e["event"] == "prune" and e["job_id"] == bad.job_id] == [10]
