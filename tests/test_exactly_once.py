"""One job, one execution: a second sweep or resume never dispatches a claimed job,
a job whose process died is LOST and resumed, and a chaos run proves it end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from claim_helpers import HOLDER as _HOLDER
from claim_helpers import events_of as _events
from claim_helpers import plan_jobs as _plan
from conftest import REPO, SweepDirs, tmgg_sweep, tmgg_train

from tmgg.jobs import claims
from tmgg.jobs.ledger import FAILED, FINISHED, LOST, RUNNING, Ledger
from tmgg.jobs.records import host

LOCAL = ["hydra/launcher=local", "hydra.launcher.n_workers=2"]
TWO_JOBS = ["stage=smoke", "logger=csv", "model=linear_pe"]

def test_a_job_running_elsewhere_is_neither_dispatched_nor_resumed_until_lost(
        sweep_dirs: SweepDirs) -> None:
    overrides = [*TWO_JOBS, *sweep_dirs.overrides]
    held, free = _plan(overrides)
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(sweep_dirs.experiments),
                               held["job_id"], held["run_name"]], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        sweep = tmgg_train("-m", *overrides, *LOCAL)
        # Not a failure: the job is another sweep's, so the exit code is 0.
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        assert f"{held['run_name']}: not dispatched, claimed by {host()}:{holder.pid} since" \
            in sweep.stderr
        assert "SKIPPED (claimed)" in sweep.stderr
        assert len(_events(ledger, "dispatched", held["job_id"])) == 1  # the holder's
        assert ledger.job_record(held["job_id"])["status"] == RUNNING  # untouched
        assert ledger.job_record(free["job_id"])["status"] == FINISHED

        # Hydra's own launcher knows nothing of claims: the job's process sees the live
        # claim in on_job_start and returns without training or touching the record.
        basic = tmgg_train("-m", *overrides, "hydra/launcher=basic")
        assert basic.returncode == 0, basic.stderr[-3000:]
        assert f"not run: claimed by {host()}:{holder.pid}" in basic.stdout + basic.stderr
        assert ledger.job_record(held["job_id"])["status"] == RUNNING
        assert not list(sweep_dirs.outputs.glob(f"smoke/{held['run_name']}-*/metrics.json"))

        dry = tmgg_sweep("resume", "--dry-run", *overrides)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "1 in flight elsewhere, 0 to run" in dry.stdout
        assert f"not run: {held['run_name']}" in dry.stdout
    finally:
        holder.kill()
        holder.wait()

    status = json.loads(tmgg_sweep("status", "--json", *overrides).stdout)
    lost = {row["job_id"]: row for row in status["jobs"]}[held["job_id"]]
    assert lost["status"] == LOST and f"{holder.pid} is gone" in lost["claim"]
    finished_at = ledger.job_record(free["job_id"])["finished_at"]
    resumed = tmgg_sweep("resume", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 to run (0 failed, 1 lost" in resumed.stdout
    assert ledger.job_record(held["job_id"])["status"] == FINISHED
    assert ledger.job_record(free["job_id"])["finished_at"] == finished_at  # not re-run
    released = claims.current(ledger.root, held["job_id"])
    assert released is not None and released.released


def test_a_detached_call_in_flight_is_polled_not_sent_again(sweep_dirs: SweepDirs) -> None:
    modal = ["hydra/launcher=modal", "hydra.launcher.transport=local",
             "hydra.launcher.detach=true", "hydra.launcher.local_containers=1"]
    args = ("-m", *TWO_JOBS, "trainer.max_steps=200", *modal, *sweep_dirs.overrides)
    first = tmgg_train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    calls = {e["job_id"]: e["call_id"] for e in ledger.events() if e["event"] == "dispatched"}
    assert len(calls) == 2
    second = tmgg_train(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    dispatched = [e for e in ledger.events() if e["event"] == "dispatched"]
    assert len(dispatched) == 2  # nothing sent again
    # Each job was either still running (claimed by its call) or had finished and was
    # folded from its call's result when the second sweep polled it.
    for job_id, call_id in calls.items():
        state = ledger.states()[job_id]
        assert (f"call {call_id}" in second.stderr) or state.status == FINISHED, \
            second.stderr[-3000:]
    deadline = time.time() + 300
    while time.time() < deadline:
        from tmgg.launch.modal.calls import poll_detached

        poll_detached(ledger)
        if {s.status for s in ledger.states().values()} == {FINISHED}:
            break
        time.sleep(0.5)
    assert {s.status for s in ledger.states().values()} == {FINISHED}
    assert [ledger.job_record(job_id)["attempts"] for job_id in calls] == [1, 1]


# -- chaos: two sweeps at once, a worker and a launcher killed, then resume ----------

# Each job holds at its first checkpoint (tmgg.task.hold) until the test lets it on:
# the kills land at that step whatever the machine's speed.
CHAOS_STEPS, CHAOS_CHECKPOINT = 8, 4
CHAOS_DISPATCH = {
    # Job by job: each sweep's two workers claim a job each, and hold.
    "solo": ["hydra.launcher.fuse=off", "hydra.launcher.n_workers=2"],
    # The default, fused: a group per seed (three models each). One worker per sweep,
    # so that the first sweep claims one group and the second the other.
    "fused": ["hydra.launcher.n_workers=1"],
}


def _training_starts(output_dir: Path, run_name: str) -> list[int]:
    """The step each training attempt of the job started from, from the job's own log.

    Not from ``console.log`` (branch firsthour): it is the job's console, which repeats
    every line of the job's log, and reading both counted each attempt twice."""
    starts = []
    for log_file in output_dir.glob("*.log"):
        if log_file.name == "console.log":
            continue
        for line in log_file.read_text().splitlines():
            marker = f"Training {run_name} from step "
            if marker in line:
                starts.append(int(line.split(marker, 1)[1].split()[0]))
    return starts


def _history_span(run_file: Path) -> tuple[float, float] | None:
    """First and last ``_timestamp`` of the history rows in a wandb run file."""
    from wandb.proto import wandb_internal_pb2

    from tmgg.cli.reconcile import iter_records

    stamps = []
    for payload in iter_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            stamps += [float(json.loads(item.value_json)) for item in record.history.item
                       if item.key == "_timestamp"]
    return (min(stamps), max(stamps)) if stamps else None


def _jobs_of_worker(ledger: Ledger, pid: int) -> set[str]:
    """The jobs whose claim a job process (a solo job, or a fused group's trainer) holds."""
    return {job_id for job_id in ledger.job_records()
            if (claim := claims.current(ledger.root, job_id)) is not None
            and not claim.released and int(claim.owner["pid"]) == pid}


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", sorted(CHAOS_DISPATCH))
def test_chaos_two_sweeps_kills_and_resume_run_every_job_exactly_once(
        sweep_dirs: SweepDirs, dispatch: str) -> None:
    """Two sweeps of one stage; each holds its first jobs at their first checkpoint. One
    worker of the first sweep (a job, or a whole fused group) is SIGKILLed there, and the
    second sweep's launcher too. Every member of the killed task is FAILED as its worker
    crashed; `resume` finishes all six jobs, each trained once (an interrupted one
    continued from its checkpoint, after the kill) into one W&B run."""
    from holds import hold_env, released, wait_for_holds, wait_until_gone

    from tmgg.cli.reconcile import read_run_file, run_files
    from tmgg.config.identity import wandb_run_id

    overrides = ["stage=smoke", "logger.mode=offline", f"trainer.max_steps={CHAOS_STEPS}",
                 f"trainer.val_check_interval={CHAOS_CHECKPOINT}", "data.val_samples=20",
                 "data.test_samples=20", *sweep_dirs.overrides]
    workers = CHAOS_DISPATCH[dispatch]
    command = [sys.executable, "-m", "tmgg.cli.app", "-m", *overrides, *workers]
    logs = [sweep_dirs.root / f"sweep{n}.log" for n in (1, 2)]
    releases = [sweep_dirs.root / f"release{n}" for n in (1, 2)]
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    holds_per_sweep = 2 if dispatch == "solo" else 1
    ledger = Ledger(sweep_dirs.experiments, "smoke")

    def output() -> str:
        return "\n".join(log.read_text()[-3000:] for log in logs if log.exists())

    def start(n: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, cwd=REPO, stdout=logs[n].open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=hold_env(CHAOS_CHECKPOINT, releases[n], base))

    sweeps: list[subprocess.Popen[bytes]] = []
    try:
        # The second sweep starts once the first holds its jobs: it claims what is left.
        sweeps.append(first := start(0))
        first_workers = wait_for_holds(releases[0], holds_per_sweep, first, describe=output)
        sweeps.append(second := start(1))
        second_workers = wait_for_holds(releases[1], holds_per_sweep, first, second,
                                        describe=output)
        interrupted = set().union(*(_jobs_of_worker(ledger, pid)
                                    for pid in first_workers + second_workers))
        killed_worker = first_workers[0]
        killed_jobs = _jobs_of_worker(ledger, killed_worker)
        assert len(killed_jobs) == (1 if dispatch == "solo" else 3), killed_jobs
        assert len(interrupted) == (4 if dispatch == "solo" else 6), interrupted

        os.kill(second.pid, signal.SIGKILL)  # the second sweep's launcher
        second.wait()
        # Its workers (children of its fork server, which lives while they do) end the
        # job they hold under their own claim, then find no launcher and exit.
        with released(releases[1]):
            for pid in second_workers:
                wait_until_gone(pid)
        os.kill(killed_worker, signal.SIGKILL)  # a worker of the first sweep, held
        with released(releases[0]):  # the first sweep's other jobs train on
            assert first.wait(timeout=900) != 0, output()  # the killed jobs failed
    finally:
        for sweep in sweeps:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait()
    for sweep in sweeps:  # what is left of the killed launcher (fork server, idle workers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)

    # Each member of the killed task: FAILED, as its worker crashed, its checkpoint kept.
    records = ledger.job_records()
    for job_id in killed_jobs:
        record = records[job_id]
        assert record["status"] == FAILED, (record, output())
        assert "WorkerCrashed" in record["error"] and record["run_name"] in record["error"]
    assert not any(s.status == RUNNING for s in ledger.states().values())

    resumed = tmgg_sweep("resume", *overrides, *workers)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    status = json.loads(tmgg_sweep("status", "--json", *overrides).stdout)
    assert status["counts"] == {FINISHED: 6}, (status, output())

    outcomes = [e for e in ledger.events() if e["event"] == "outcome"
                and e["status"] == FINISHED]
    records = ledger.job_records()
    assert len(records) == 6
    job_dirs = {p for p in (sweep_dirs.outputs / "smoke").iterdir() if p.is_dir()}
    assert len(job_dirs) == 6  # one output directory per job
    for job_id, record in records.items():
        assert record["status"] == FINISHED
        # Never two FINISHED outcomes (none when the job finished as its launcher died:
        # then its own record, FINISHED, is the outcome).
        assert [e["job_id"] for e in outcomes].count(job_id) <= 1
        output_dir = Path(record["output_dir"])
        assert output_dir in job_dirs
        # One W&B run: every attempt's run file, read from wandb's own log, has its id.
        run_ids = {read_run_file(path).run_id for path in run_files(output_dir)}
        assert run_ids == {wandb_run_id(job_id)}, (record["run_name"], run_ids)
        # Trained once: one attempt, or an interrupted one and its continuation, which
        # began after the interrupted attempt's last step (never two copies at once).
        starts = _training_starts(output_dir, record["run_name"])
        assert record["metrics"]["global_step"] == CHAOS_STEPS
        assert (record["metrics"].get("fused_members", 1) > 1) is (dispatch == "fused")
        if job_id in killed_jobs:  # resumed from its checkpoint, after the kill
            assert starts == [0, CHAOS_CHECKPOINT], (record["run_name"], starts)
            assert record["metrics"]["resumed_from_step"] == CHAOS_CHECKPOINT
        elif job_id in interrupted:
            assert starts in ([0], [0, CHAOS_CHECKPOINT]), (record["run_name"], starts)
        else:
            assert starts == [0], (record["run_name"], starts)
        spans = sorted(span for span in map(_history_span, run_files(output_dir)) if span)
        for earlier, later in zip(spans, spans[1:], strict=False):
            assert earlier[1] <= later[0], (record["run_name"], spans)
