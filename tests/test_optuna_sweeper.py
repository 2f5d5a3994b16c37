"""hydra/sweeper=tmgg_optuna (issue 23): adaptive stages whose study lives in the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train
from holds import wait_until_group_gone

from tmgg.jobs.ledger import FINISHED, LOST, PRUNED, Ledger
from tmgg.jobs.search_space import SearchSpaceError, parse_space

STAGE = "tiny_search"
TINY = ["stage=tiny_search", "logger=csv", "trainer.max_steps=20",
        "trainer.val_check_interval=10", "data.val_samples=20", "data.test_samples=20",
        "hydra/launcher=local", "hydra.launcher.n_workers=1"]


# -- the search space ------------------------------------------------------------------
def test_search_space_in_hydra_optuna_sweeper_syntax() -> None:
    space = parse_space({"optimizer.lr": "tag(log, interval(1e-4, 3e-1))",
                         "model": "choice(linear_pe, filter_bank)",
                         "model.k": "range(4, 20)",
                         "optimizer.weight_decay": "interval(0.0, 0.1)",
                         "trainer.max_steps": 20, "seed": "1,2,3"})
    by_key = {d.key: d for d in space.dimensions}
    lr = by_key["optimizer.lr"].distribution()
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-1, True)
    k = by_key["model.k"].distribution()
    assert (k.low, k.high, k.step) == (4, 20, 1)  # both ends included
    assert by_key["model"].distribution().choices == ("linear_pe", "filter_bank")
    assert not by_key["optimizer.weight_decay"].log
    assert space.fixed == ["trainer.max_steps=20"]
    jobs = space.trial_overrides({"optimizer.lr": 0.01, "model": "linear_pe", "model.k": 7,
                                  "optimizer.weight_decay": 0.05})
    assert [job[-1] for job in jobs] == ["seed=1", "seed=2", "seed=3"]  # one job per seed
    assert "optimizer.lr=0.01" in jobs[0] and "model.k=7" in jobs[0]
    params, repeat = space.read_overrides(jobs[1])  # type: ignore[misc]
    assert params == {"optimizer.lr": 0.01, "model": "linear_pe", "model.k": 7,
                      "optimizer.weight_decay": 0.05} and repeat == "seed=2"
    # A job of another space (a value outside it) is not one of its trials.
    assert space.read_overrides([o.replace("model.k=7", "model.k=40") for o in jobs[0]]) is None


@pytest.mark.parametrize("value, problem", [
    ("interval(1e-4, ", "cannot parse"),
    ("tag(log, interval(0, 1))", "a log scale needs a positive start"),
    ("interval(0.3, 0.1)", "must be below its end"),
    ("tag(cubic, interval(1, 2))", "unknown tag"),
    ("glob(*)", "cannot be sampled"),
    ("shuffle(range(1, 4))", "shuffle() cannot be sampled"),
])
def test_bad_search_space_is_refused_naming_the_parameter(value: str, problem: str) -> None:
    with pytest.raises(SearchSpaceError) as refused:
        parse_space({"optimizer.lr": value, "model.k": "range(4, 8)"})
    assert "hydra.sweeper.params.optimizer.lr" in str(refused.value)
    assert problem in str(refused.value)


def test_bad_space_refuses_the_sweep_before_any_dispatch(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", *TINY, "optimizer.lr=tag(log,interval(0,1))",
                        *sweep_dirs.overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sweep refused, nothing dispatched" in result.stderr
    assert "optimizer.lr" in result.stderr and "positive start" in result.stderr
    assert not (sweep_dirs.experiments / STAGE / "ledger.jsonl").exists()


# -- a study of complete jobs ----------------------------------------------------------
def _trials(ledger: Ledger) -> dict[str, dict]:
    """FINISHED job records by their searched values (lr, k)."""
    found = {}
    for state in ledger.states().values():
        given = dict(line.split("=", 1) for line in state.overrides)
        found[f"{given['optimizer.lr']},{given['model.k']}"] = state
    return found


def test_small_study_runs_n_trials_each_a_complete_job(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("-m", *TINY, "hydra.sweeper.n_trials=3", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    states = ledger.states()
    assert len(states) == 3 and {s.status for s in states.values()} == {FINISHED}
    assert len(_trials(ledger)) == 3  # three distinct configs
    for state in states.values():
        record = state.record
        assert record["config"]["job"]["id"] == state.job_id  # config-derived id
        assert record["run_name"].startswith("tiny_search_linear_pe_lr")
        assert record["claim"]["generation"] >= 1 and record["attempts"] == 1
        assert isinstance(record["metrics"]["val/loss"], float)
        assert (Path(record["output_dir"]) / "checkpoints" / "last.ckpt").exists()
    plan = ledger.plan()
    assert plan is not None and len(plan["jobs"]) == 3
    assert plan["study"]["n_trials"] == 3 and "optimizer.lr" in plan["study"]["search_space"]
    assert "3/3 trials complete; best val/loss" in result.stderr
    status = tmgg_sweep("status", *TINY, *sweep_dirs.overrides)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("FINISHED") >= 3
    # The same command again: the study is complete in the ledger, nothing runs again.
    dispatched = [e for e in ledger.events() if e["event"] == "dispatched"]
    again = tmgg_train("-m", *TINY, "hydra.sweeper.n_trials=3", *sweep_dirs.overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e for e in ledger.events() if e["event"] == "dispatched"] == dispatched
    # A larger total continues the same study: one more trial, a new config.
    more = tmgg_train("-m", *TINY, "hydra.sweeper.n_trials=4", *sweep_dirs.overrides)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(_trials(ledger)) == 4 and len(ledger.states()) == 4
    assert {s.status for s in ledger.states().values()} == {FINISHED}


def test_sigkilled_study_resumes_to_exactly_n_trials(sweep_dirs: SweepDirs) -> None:
    """The launcher is killed with trial 1 finished and trial 2 held at step 10
    (``tmgg.task.hold``: one release lets one job through); the same command then ends
    the study with exactly 3 trials, trial 2 re-run with its own parameters."""
    overrides = [*TINY, "hydra.sweeper.n_trials=3", *sweep_dirs.overrides]
    release = sweep_dirs.root / "release"
    env = {**os.environ, "TMGG_TEST_HOLD_AT_STEP": "10", "TMGG_TEST_HOLD_FILE": str(release)}
    process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=env)

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 600  # a bound for a broken run, not a race
        while not done():
            assert process.poll() is None, f"the sweep ended before {what}"
            assert time.monotonic() < deadline, f"never {what}"
            time.sleep(0.05)

    def held() -> int:
        return len(list(sweep_dirs.root.glob("release.held.*")))

    try:
        wait_for("trial 1 held", lambda: held() == 1)
        release.touch()  # trial 1 finishes; trial 2 holds
        wait_for("trial 2 held", lambda: held() == 2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        wait_until_group_gone(process.pid)
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    killed = {s.job_id: s for s in ledger.states().values()}
    assert sorted(s.status for s in killed.values()) == [FINISHED, LOST]
    (lost,) = [s for s in killed.values() if s.status == LOST]
    (finished,) = [s for s in killed.values() if s.status == FINISHED]
    finished_record = dict(finished.record)

    resumed = tmgg_train("-m", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = ledger.states()
    assert len(states) == 3 and {s.status for s in states.values()} == {FINISHED}
    assert len(_trials(ledger)) == 3  # no config twice
    assert states[lost.job_id].overrides == lost.overrides  # re-run with its parameters
    assert states[lost.job_id].record["attempts"] == 2
    assert states[finished.job_id].record == finished_record  # never re-run


def test_two_shells_share_one_study(sweep_dirs: SweepDirs) -> None:
    """Two sweeps of one stage at once: n_trials in all, no config run twice."""
    overrides = [*TINY, "hydra.sweeper.n_trials=4", *sweep_dirs.overrides]
    shells = [subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    errors = [shell.communicate(timeout=900)[1] for shell in shells]
    for shell, error in zip(shells, errors, strict=True):
        assert shell.returncode == 0, error[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    states = ledger.states()
    assert len(states) == 4 and {s.status for s in states.values()} == {FINISHED}
    assert len(_trials(ledger)) == 4
    assert all(s.record["attempts"] == 1 for s in states.values())  # none ran twice
    dispatched = [e["job_id"] for e in ledger.events() if e["event"] == "dispatched"]
    assert sorted(set(dispatched)) == sorted(states)


def test_plan_of_an_adaptive_stage(sweep_dirs: SweepDirs) -> None:
    result = tmgg_sweep("plan", "stage=stage1_search", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    assert "optimizer.lr" in text and "tag(log, interval(1e-4, 3e-1))" in text
    assert "log float in [0.0001, 0.3]" in text
    assert "model.k" in text and "int in [4, 20]" in text
    assert "28 trials x 3 jobs (seed=1, seed=2, seed=3) x 10000 steps = 840000 steps" in text
    assert "graph_denoise_team/spectral_denoising/stage1_search" in text
    assert "pruner: median (after 5 complete trials, from step 2000)" in text
    assert "nothing dispatched" in text
    as_json = tmgg_sweep("plan", "--json", "stage=stage1_search", *sweep_dirs.overrides)
    facts = json.loads(as_json.stdout)
    assert facts["budget_steps"] == 840000 and facts["n_trials"] == 28
    assert not (sweep_dirs.experiments / "stage1_search").exists()  # a plan records nothing
    refused = tmgg_sweep("plan", "stage=stage1_search", "model.k=range(20, 4)",
                         *sweep_dirs.overrides)
    assert refused.returncode == 2
    assert "model.k" in refused.stderr and "must be below its end" in refused.stderr


def _wandb_marks(output_dir: Path) -> tuple[int | None, bool, int | None]:
    """A job's offline W&B run: its exit code, whether tagged pruned, pruned_at_step."""
    from wandb.proto import wandb_internal_pb2

    from tmgg.cli.reconcile import iter_records, read_run_file, run_files

    (run_file,) = run_files(output_dir)
    info = read_run_file(run_file)
    assert info is not None
    tags: set[str] = set()
    summary: dict[str, object] = {}
    for payload in iter_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            tags |= set(record.run.tags)
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json)
                            for item in record.summary.update})
    step = summary.get("pruned_at_step")
    return info.exit_code, "pruned" in tags, step if isinstance(step, int) else None


def test_pruner_stops_a_bad_trial_recorded_pruned_never_resumed(sweep_dirs: SweepDirs) -> None:
    """Trial 1 (lr 0.05, the random sampler's first pick for seed 2) learns; trial 2
    (lr 1e-9) does not, and the median pruner stops it at its first validation: the job
    reported val/loss through the ledger, got the decision, stopped at step 10 of 40."""
    overrides = ["stage=tiny_search", "trainer.max_steps=40",  # W&B offline (conftest)
                 "trainer.val_check_interval=10", "data.val_samples=20",
                 "data.test_samples=20", "scheduler=none", "model.k=8",
                 "optimizer.lr=choice(0.05,1e-9)", "hydra/launcher=local",
                 "hydra.launcher.n_workers=1", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.sampler=random", "hydra.sweeper.seed=2",
                 "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_startup_trials=1",
                 *sweep_dirs.overrides]
    result = tmgg_train("-m", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, STAGE)
    by_lr = {dict(o.split("=", 1) for o in s.overrides)["optimizer.lr"]: s
             for s in ledger.states().values()}
    assert set(by_lr) == {"0.05", "1e-09"}
    good, bad = by_lr["0.05"], by_lr["1e-09"]
    assert good.status == FINISHED and good.record["metrics"]["global_step"] == 40
    assert bad.status == PRUNED, bad.record
    assert bad.record["pruned_at_step"] == 10 and bad.record["metrics"]["global_step"] == 10
    assert bad.record["error"] is None and "test/mse" in bad.record["metrics"]
    said = " ".join(result.stderr.split())
    assert "PRUNED tiny_search_linear_pe_lr1e-9" in said and "1 pruned" in said
    # Its W&B run finished (exit 0) and is marked pruned; the good trial's is not.
    assert _wandb_marks(Path(bad.record["output_dir"])) == (0, True, 10)
    assert _wandb_marks(Path(good.record["output_dir"])) == (0, False, None)
    reported = [(e["job_id"], e["step"]) for e in ledger.events() if e["event"] == "reported"]
    assert (bad.job_id, 10) in reported and (good.job_id, 40) in reported
    assert [e["step"] for e in ledger.events()
            if e["event"] == "prune" and e["job_id"] == bad.job_id] == [10]
    # Never resumed: resume has nothing to run, the same command dispatches nothing.
    resume = tmgg_sweep("resume", "--dry-run", *overrides)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert "2 jobs, 2 finished, 0 in flight elsewhere, 0 to run" in resume.stdout
    dispatched = [e for e in ledger.events() if e["event"] == "dispatched"]
    again = tmgg_train("-m", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e for e in ledger.events() if e["event"] == "dispatched"] == dispatched
    assert ledger.states()[bad.job_id].status == PRUNED


def test_trials_are_asynchronous(sweep_dirs: SweepDirs) -> None:
    """n_jobs=2: two trials train at once, and when one ends a third starts while the
    other is still held (not batch by batch). Held at step 10 (``tmgg.task.hold``)."""
    overrides = [*TINY, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
                 *sweep_dirs.overrides]
    release = sweep_dirs.root / "release"
    env = {**os.environ, "TMGG_TEST_HOLD_AT_STEP": "10", "TMGG_TEST_HOLD_FILE": str(release)}
    log = sweep_dirs.root / "sweep.log"
    with log.open("w") as handle:  # a file, not a pipe: nothing blocks the sweep
        process = subprocess.Popen([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=handle,
                                   start_new_session=True, env=env)

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 600  # a bound for a broken run, not a race
        while not done():
            assert process.poll() is None, f"the sweep ended before {what}"
            assert time.monotonic() < deadline, f"never {what}"
            time.sleep(0.05)

    def held() -> list[Path]:
        return sorted(sweep_dirs.root.glob("release.held.*"))

    ledger = Ledger(sweep_dirs.experiments, STAGE)
    try:
        wait_for("two trials held at once", lambda: len(held()) == 2)
        release.touch()  # one of them finishes; the other stays held
        wait_for("a third trial held beside the second", lambda: len(held()) == 3)
        running = [s for s in ledger.states().values() if s.status != FINISHED]
        assert len(running) == 2  # the held second trial and the new third one
        for _ in range(2):
            wait_for("the release taken", lambda: not release.exists())
            release.touch()
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    errors = log.read_text()
    assert process.returncode == 0, errors[-3000:]
    # The launchers' live displays are off; the sweeper prints each job's line.
    assert errors.count("FINISHED tiny_search_linear_pe_lr") == 3, errors[-3000:]
    # A trial one thread is dispatching is not "lost" to the other (it used to be run
    # again beside itself and skipped as claimed by this very process).
    assert "run again" not in errors and "claimed by" not in errors, errors[-3000:]
    assert not [e for e in ledger.events() if e["event"] == "skipped"]
    states = ledger.states()
    assert len(states) == 3 and {s.status for s in states.values()} == {FINISHED}
    assert len(_trials(ledger)) == 3


def test_stage1_search_runs_tiny_and_the_benchmark_counts_its_steps(
        sweep_dirs: SweepDirs) -> None:
    """The committed stage, shrunk (2 trials x 3 seeds, 20 steps, a median pruner):
    six complete jobs; bench_search counts every job's steps, pruned ones included."""
    result = tmgg_train("-m", "stage=stage1_search", "hydra.sweeper.n_trials=2",
                        "trainer.max_steps=20", "trainer.val_check_interval=10",
                        "data.val_samples=20", "data.test_samples=20", "logger=csv",
                        "hydra.launcher.n_workers=2", "hydra.sweeper.pruner=median",
                        "hydra.sweeper.pruner_startup_trials=1",
                        "hydra.sweeper.pruner_warmup_steps=0", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = sweep_dirs.job_records("stage1_search")
    assert len(records) == 6
    assert {r["status"] for r in records.values()} <= {FINISHED, PRUNED}
    seeds = sorted(dict(o.split("=", 1) for o in r["overrides"])["seed"]
                   for r in records.values())
    assert seeds == ["1", "1", "2", "2", "3", "3"]  # every trial runs stage 1's seeds
    out = sweep_dirs.root / "bench.json"
    bench = subprocess.run([sys.executable, "benchmarks/bench_search.py", "--experiments",
                            str(sweep_dirs.experiments), "--json", str(out), "--plots",
                            str(sweep_dirs.root / "plots")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(out.read_text())["search"]
    assert figures["jobs"] == 6
    assert figures["steps"] == sum(r["metrics"]["global_step"] for r in records.values())
    assert figures["pruned_jobs"] == sum(r["status"] == PRUNED for r in records.values())
    assert "training steps" in bench.stdout
    assert (sweep_dirs.root / "plots" / "stage1_search_optimization_history.png").stat().st_size


def test_an_adaptive_stage_without_multirun_is_refused(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("stage=tiny_search", "logger=csv", *sweep_dirs.overrides)
    assert result.returncode == 2
    assert "is an adaptive search over" in result.stderr and "tmgg-train -m" in result.stderr
    assert not (sweep_dirs.outputs / STAGE).exists()


def test_reconcile_counts_a_pruned_job_as_done() -> None:
    """A PRUNED csv job is ok (done, nothing to resume); a LOST one is still missing."""
    from tmgg.cli.reconcile import MISSING, OK, judge
    from tmgg.jobs.ledger import JobState
    from tmgg.jobs.plan import PlannedJob

    job = PlannedJob(index=0, job_id="tiny_search-0123456789", run_name="tiny_search_x",
                     stage=STAGE, overrides=[], sweep_config=None,
                     task_config={"logger": {"name": "csv"}})
    pruned = judge(job, JobState(job.job_id, job.run_name, PRUNED), [])
    assert pruned.status == OK
    assert judge(job, JobState(job.job_id, job.run_name, LOST), []).status == MISSING
