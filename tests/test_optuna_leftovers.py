"""Issue 23's leftovers: a space whose ends give refused jobs is refused before any
dispatch (naming the parameter), and the study reads the ledger's reports
incrementally."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs.ledger import Ledger
from tmgg.jobs.trials import REPORTED_EVENT, ReportTail

STAGE = "tiny_search"
TINY = ["stage=tiny_search", "logger=csv", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "data.val_samples=20", "data.test_samples=20",
        "hydra/launcher=local", "hydra.launcher.n_workers=1", "hydra.sweeper.n_trials=2"]


@pytest.mark.parametrize("searched, named, problem", [
    # The low end: a negative weight decay is not a valid job.
    ("optimizer.weight_decay=interval(-0.01,0.01)", "optimizer.weight_decay",
     "expected a number >= 0, got -0.01"),
    # A choice that is not the first: the model config group has no such option.
    ("model=choice(linear_pe,nonexistent)", "hydra.sweeper.params.model=nonexistent",
     "Could not find 'model/nonexistent'"),
])
def test_a_space_whose_ends_give_refused_jobs_is_refused_before_dispatch(
        sweep_dirs: SweepDirs, searched: str, named: str, problem: str) -> None:
    result = tmgg_train("-m", *TINY, searched, *sweep_dirs.overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sweep refused, nothing dispatched" in result.stderr
    assert named in result.stderr and problem in result.stderr, result.stderr[-3000:]
    assert not (sweep_dirs.experiments / STAGE).exists()
    # tmgg-sweep plan refuses it the same way.
    plan = tmgg_sweep("plan", *TINY, searched, *sweep_dirs.overrides)
    assert plan.returncode != 0, plan.stdout[-2000:]
    assert named in plan.stderr + plan.stdout and problem in plan.stderr + plan.stdout


def _report(ledger: Ledger, job: str, step: int, value: float | None) -> None:
    ledger.append({"event": REPORTED_EVENT, "job_id": job, "step": step, "value": value,
                   "metric": "val/loss", "time": "2026-01-01T00:00:00Z"})


def test_reports_are_read_incrementally_each_handed_out_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, STAGE)
    tail = ReportTail(ledger)
    assert tail.refresh() == {} and tail.take_new() == []  # no ledger yet
    _report(ledger, "a", 10, 0.5)
    ledger.append({"event": "planned", "job_id": "b", "overrides": []})
    _report(ledger, "b", 10, None)  # a non-finite value: handed out, no value kept
    assert [(e["job_id"], e["step"]) for e in tail.take_new()] == [("a", 10), ("b", 10)]
    assert tail.take_new() == []  # each once
    offset = tail.offset
    assert offset == ledger.events_path.stat().st_size  # read up to the end, no further
    # A line being written (no newline yet) waits for its end.
    with ledger.events_path.open("a") as handle:
        handle.write('{"event": "reported", "job_id": "a", "step": 20, ')
    assert tail.refresh() == {"a": {10: 0.5}} and tail.offset == offset
    with ledger.events_path.open("a") as handle:
        handle.write('"value": 0.25, "metric": "val/loss"}\n')
    _report(ledger, "a", 10, 0.4)  # a re-run job reports step 10 again: answered again
    assert tail.refresh() == {"a": {10: 0.4, 20: 0.25}}
    assert [(e["job_id"], e["step"]) for e in tail.take_new()] == [("a", 20), ("a", 10)]


def test_the_incremental_fold_gives_the_ledgers_own_states(tmp_path: Path) -> None:
    """LedgerFold (what the study reads at every ask and decision) against a full
    ``Ledger.states()`` after each change: events, records written and rewritten, a
    record that is done (not read again), a line still being written."""
    from tmgg.jobs.ledger import FINISHED, PLANNED, RUNNING, LedgerFold

    ledger = Ledger(tmp_path, STAGE)
    fold = LedgerFold(ledger)
    assert fold.states() == ledger.states() == {}

    def planned(job: str) -> dict:
        return {"event": "planned", "job_id": job, "run_name": job, "overrides": [f"x={job}"]}

    ledger.append_many([planned("a"), planned("b"),
                        {"event": "dispatched", "job_id": "a", "run_name": "a"}])
    assert fold.states() == ledger.states()
    ledger.write_job_record("a", {"job_id": "a", "status": RUNNING, "run_name": "a"})
    assert fold.states() == ledger.states() and fold.states()["a"].status == RUNNING
    ledger.write_job_record("a", {"job_id": "a", "status": FINISHED, "run_name": "a",
                                  "metrics": {"val/loss": 0.5}})
    ledger.append_many([{"event": "outcome", "job_id": "a", "status": FINISHED},
                        planned("c"), {"event": "superseded", "job_id": "b", "by": "c"}])
    states = fold.states()
    assert states == ledger.states()
    assert (states["a"].status, states["a"].metrics) == (FINISHED, {"val/loss": 0.5})
    assert states["b"].superseded_by == "c" and states["c"].status == PLANNED
    with ledger.events_path.open("a") as handle:  # a line being written
        handle.write('{"event": "planned", "job_id": "d", ')
    assert fold.states() == ledger.states() and "d" not in fold.states()
    with ledger.events_path.open("a") as handle:
        handle.write('"run_name": "d", "overrides": []}\n')
    assert fold.states() == ledger.states() and fold.states()["d"].status == PLANNED
    # A record read once FINISHED is not read again (it no longer changes).
    (ledger.jobs_dir / "a.json").write_text("not json")
    assert fold.states()["a"].status == FINISHED


def test_a_refused_value_between_the_ends_is_a_failed_trial_and_the_study_goes_on(
        sweep_dirs: SweepDirs) -> None:
    """9-node 3-regular graphs do not exist (9 x 3 is odd), 2- and 4-regular ones do:
    the ends of degree range(2, 4) pass the check before the study, 3 is refused when
    asked (seed 0 asks it twice): told Optuna as failed, named on stderr, never a job;
    the study still ends with its 2 trials."""
    result = tmgg_train("-m", *TINY, "hydra.sweeper.sampler=random", "hydra.sweeper.seed=0",
                        "data=regular", "data.num_nodes=9", "data.degree=range(2,4)",
                        "model.k=4", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    refusals = [line for line in result.stderr.splitlines()
                if "refused, told Optuna as failed" in line]
    assert refusals and all("data.degree=3" in line and "data.degree: 3-regular graphs"
                            in line for line in refusals), result.stderr[-3000:]
    states = Ledger(sweep_dirs.experiments, STAGE).states()
    degrees = sorted(dict(o.split("=", 1) for o in s.overrides)["data.degree"]
                     for s in states.values())
    assert len(degrees) == 2 and "3" not in degrees
    assert "2/2 trials complete" in result.stderr
