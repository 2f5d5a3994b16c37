"""Adaptive stages on the other launchers (issue 23): a pruned trial under
``hydra/launcher=modal`` (its containers cannot see the ledger: the channel goes through
the app's store, the local transport's stand-in for a modal.Dict), and a study under
hydra-submitit-launcher's local executor."""

from __future__ import annotations

from pathlib import Path

from conftest import SweepDirs, tmgg_train

from tmgg.jobs.ledger import FINISHED, PRUNED, Ledger

STAGE = "tiny_search"
LOCAL_MODAL = ["hydra/launcher=modal", "hydra.launcher.transport=local",
               "hydra.launcher.local_containers=1"]
# lr 0.05 first, then 1e-9 (the random sampler's picks for seed 2); the median pruner
# stops the second at its first validation. A job that got no decision would wait the
# timeout and train on (FINISHED): the assertions below would fail.
PRUNING_STUDY = ["stage=tiny_search", "trainer.max_steps=40", "trainer.val_check_interval=10",
                 "data.val_samples=20", "data.test_samples=20", "scheduler=none",
                 "model.k=8", "optimizer.lr=choice(0.05,1e-9)", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.sampler=random", "hydra.sweeper.seed=2",
                 "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_startup_trials=1",
                 "hydra.sweeper.decision_timeout_s=60"]


def _by_lr(ledger: Ledger) -> dict[str, object]:
    return {dict(o.split("=", 1) for o in s.overrides)["optimizer.lr"]: s
            for s in ledger.states().values()}


def test_a_trial_in_a_modal_container_is_pruned_through_the_store(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    volume = tmp_path / "volume"  # the job's records and ledger view are the volume's
    result = tmgg_train("-m", *PRUNING_STUDY, "logger=csv", *LOCAL_MODAL,
                        f"hydra.launcher.local_volume_dir={volume}", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    by_lr = _by_lr(ledger)
    good, bad = by_lr["0.05"], by_lr["1e-09"]
    assert good.status == FINISHED and good.record["metrics"]["global_step"] == 40
    assert bad.status == PRUNED, bad.record
    assert bad.record["pruned_at_step"] == 10 and bad.record["metrics"]["global_step"] == 10
    # The container's reports reached the launcher's ledger (relayed from the store),
    # and the decision files and store keys were consumed.
    reported = [(e["job_id"], e["step"]) for e in ledger.events() if e["event"] == "reported"]
    assert (bad.job_id, 10) in reported and (good.job_id, 40) in reported
    assert [e["step"] for e in ledger.events()
            if e["event"] == "prune" and e["job_id"] == bad.job_id] == [10]
    assert not list((ledger.root / "trials").rglob("*.decision"))
    assert not list((ledger.root / "trials" / "relay").glob("*.json"))
    # The job's own view of the ledger is on the volume, never the launcher's.
    assert (volume / "experiments" / STAGE).is_dir()
    assert "no pruning decision" not in result.stderr


def test_an_adaptive_stage_runs_under_submitit_local(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", *PRUNING_STUDY, "logger=csv",
                        "hydra/launcher=submitit_local_tmgg", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    by_lr = _by_lr(ledger)
    assert set(by_lr) == {"0.05", "1e-09"}
    assert by_lr["0.05"].status == FINISHED
    assert by_lr["1e-09"].status == PRUNED and by_lr["1e-09"].record["pruned_at_step"] == 10


def test_a_fused_member_in_a_modal_container_is_pruned_through_the_store(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    """Fused rounds on Modal (local transport, a stand-in volume): round 2's fused
    group of two, one member pruned at step 10 through the store, the other trained on."""
    from test_optuna_fused import FUSED_STUDY

    study = [o for o in FUSED_STUDY if not o.startswith(("hydra/launcher=",
                                                          "hydra.launcher."))]
    result = tmgg_train("-m", *study, "logger=csv", *LOCAL_MODAL,
                        f"hydra.launcher.local_volume_dir={tmp_path / 'volume'}",
                        *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    by_lr = _by_lr(Ledger(sweep_dirs.experiments, STAGE))
    assert {lr: s.record["metrics"]["fused_members"] for lr, s in by_lr.items()} == {
        "0.05": 2, "1e-08": 2, "1e-09": 2, "0.03": 2}
    assert by_lr["1e-09"].status == PRUNED and by_lr["1e-09"].record["pruned_at_step"] == 10
    assert by_lr["0.05"].status == FINISHED
    assert by_lr["0.05"].record["metrics"]["global_step"] == 40
