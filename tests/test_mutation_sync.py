"""``tmgg-sweep sync``'s planning and checks (tmgg.cli.sync), pinned down where mutation
testing found them unexamined (issue 25): which run dirs go where, the environment and
command that pin the upload, and what a verification reports and advises.

Fast and in-process: run dirs are plain folders under tmp_path, and the verification
reads a runs listing given as its input (what ``wandb.Api().runs`` returns: objects
with id, state and summary_metrics); the upload through the real wandb client against
the test W&B server is in tests/test_sync.py. Part of ``make mutate``'s selection.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tmgg.cli.reconcile import job_output_dirs
from tmgg.cli.sync import (
    Unverified,
    Upload,
    _unverified,
    deleted_id_advice,
    offline_run_dirs,
    pinned_environment,
    plan_uploads,
    recorded_steps,
    run_steps,
    sync_command,
)
from tmgg.config.identity import wandb_run_id
from tmgg.jobs.ledger import FINISHED, JobState
from tmgg.jobs.plan import PlannedJob

HOST = "http://wandb.local"
OV = ["stage=st"]
SYNC, RELOG = "tmgg-sweep sync stage=st", "tmgg-sweep relog stage=st"


def job(name: str, outputs: Path, entity: str = "team", generation: int = 0,
        logger: str = "wandb", tmgg: bool = True) -> PlannedJob:
    job_id = f"st-{name:0>10}"
    return PlannedJob(index=0, job_id=job_id, run_name=name, stage="st", overrides=[],
                      sweep_config=None, is_tmgg_job=tmgg, task_config={
                          "job": {"id": job_id}, "outputs_dir": str(outputs),
                          "logger": {"name": logger, "entity": entity, "project": "proj",
                                     "mode": "offline", "base_url": HOST,
                                     "run_generation": generation}})


def state(planned: PlannedJob, output_dir: Path | None = None, steps: Any = None) -> JobState:
    record: dict[str, Any] = {"status": FINISHED}
    if output_dir is not None:
        record["output_dir"] = str(output_dir)
    if steps is not None:
        record["metrics"] = {"global_step": steps}
    return JobState(job_id=planned.job_id, run_name=planned.run_name, status=FINISHED,
                    record=record)


def offline_run(output_dir: Path, name: str, synced: bool = False) -> Path:
    run_dir = output_dir / "wandb" / name
    run_dir.mkdir(parents=True)
    log = run_dir / f"run-{name[-8:]}.wandb"
    log.write_bytes(b"")
    if synced:
        Path(f"{log}.synced").write_text("")
    return run_dir


def test_a_jobs_offline_run_dirs_oldest_first_from_both_its_folders(tmp_path: Path) -> None:
    planned = job("a", tmp_path / "outputs")
    planned_dir = job_output_dirs(planned, None)[-1]  # outputs/<stage>/<run>-<suffix>
    recorded_dir = tmp_path / "recorded"
    second = offline_run(planned_dir, "offline-run-20260102_000000-bbbbbbbb")
    first = offline_run(recorded_dir, "offline-run-20260101_000000-aaaaaaaa")
    (planned_dir / "wandb/offline-run-empty").mkdir()  # no transaction log: nothing to sync
    (planned_dir / "wandb/run-20260101-online").mkdir()
    assert offline_run_dirs(planned, state(planned, recorded_dir)) == [first, second]
    assert offline_run_dirs(planned, None) == [second]
    same = state(planned, planned_dir)  # the record names the planned folder: listed once
    assert offline_run_dirs(planned, same) == [second]


def test_uploads_are_grouped_by_pinned_destination(tmp_path: Path) -> None:
    a, b = job("a", tmp_path / "o"), job("b", tmp_path / "o")
    c, csv = job("c", tmp_path / "o", entity="other"), job("d", tmp_path / "o", logger="csv")
    foreign, idle = job("e", tmp_path / "o", tmgg=False), job("f", tmp_path / "o")
    dirs = {}
    for planned in (a, b, c, csv, foreign):
        dirs[planned.run_name] = offline_run(tmp_path / planned.run_name,
                                             f"offline-run-x-{planned.run_name * 8}")
    states = {p.job_id: state(p, tmp_path / p.run_name) for p in (a, b, c, csv, foreign, idle)}
    uploads = plan_uploads([csv, idle, foreign, a, b, c], states)
    assert [(u.base_url, u.entity, u.project, u.jobs, u.run_dirs) for u in uploads] == [
        (HOST, "team", "proj", ["a", "b"], [dirs["a"], dirs["b"]]),
        (HOST, "other", "proj", ["c"], [dirs["c"]])]
    assert uploads[0].planned == [a, b]


def test_the_upload_is_pinned_in_its_environment_and_command() -> None:
    upload = Upload(HOST, "team", "proj", run_dirs=[Path("/r/1"), Path("/r/2")])
    environ = {"WANDB_ENTITY": "personal", "WANDB_PROJECT": "x", "WANDB_MODE": "disabled",
               "WANDB_RUN_ID": "r", "WANDB_BASE_URL": "https://api.wandb.ai",
               "WANDB_SWEEP_ID": "s", "WANDB_API_KEY": "k" * 40, "PATH": "/bin"}
    env = pinned_environment(upload, environ)
    assert env == {"WANDB_BASE_URL": HOST, "WANDB_ENTITY": "team", "WANDB_PROJECT": "proj",
                   "WANDB_API_KEY": "k" * 40, "PATH": "/bin"}
    assert sync_command(upload) == [sys.executable, "-m", "wandb", "sync", "--entity", "team",
                                    "--project", "proj", "/r/1", "/r/2"]


def test_steps_recorded_by_the_job_and_logged_by_its_run(tmp_path: Path) -> None:
    planned = job("a", tmp_path)
    assert recorded_steps(None) == 0
    assert recorded_steps(state(planned, steps=40)) == 40
    assert recorded_steps(state(planned, steps="n/a")) == 0
    assert recorded_steps(state(planned, steps=[1])) == 0

    @dataclass
    class Logged:
        summary_metrics: dict[str, Any] | None

    assert run_steps(Logged({"trainer/global_step": 39.0, "global_step": 7})) == 39
    assert run_steps(Logged({"global_step": 7})) == 7
    assert run_steps(Logged({"trainer/global_step": "x"})) == -1
    assert run_steps(Logged(None)) == -1


def test_a_deleted_run_id_is_advised_a_new_generation(tmp_path: Path) -> None:
    jobs = [job("a", tmp_path, generation=0), job("b", tmp_path, generation=2)]
    assert deleted_id_advice("ok", False, jobs, OV) is None
    advice = deleted_id_advice("409: run was previously created and deleted", False, jobs, OV)
    assert advice == ("if W&B refuses the run id because a run with it was deleted there (it "
                      "never reuses one; wandb retries that refusal without end), re-log the "
                      f"finished jobs into a new run generation with {RELOG} (or relaunch "
                      "with logger.run_generation=3)")
    assert deleted_id_advice("", True, jobs, OV) == advice


@dataclass
class ListedRun:
    id: str
    state: str = "finished"
    summary_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Listing:
    """A runs listing of ``path`` as the server answers it (or an error to raise)."""

    runs_at: dict[str, list[ListedRun]]
    error: Exception | None = None
    asked: list[tuple[str, list[str]]] = field(default_factory=list)
    flushed: int = 0

    def flush(self) -> None:
        self.flushed += 1

    def runs(self, path: str, filters: dict[str, Any]) -> list[ListedRun]:
        self.asked.append((path, filters["name"]["$in"]))
        if self.error is not None:
            raise self.error
        return self.runs_at.get(path, [])


def test_verification_reports_each_jobs_run_and_what_to_do(tmp_path: Path) -> None:
    ok, unfinished, short, later, absent, synced = (
        job(name, tmp_path) for name in ("ok", "unf", "short", "later", "absent", "synced"))
    states = {p.job_id: state(p, tmp_path / p.run_name, steps=40)
              for p in (ok, unfinished, short, later, absent, synced)}
    offline_run(tmp_path / "synced", "offline-run-x-ssssssss", synced=True)
    offline_run(tmp_path / "absent", "offline-run-x-aaaaaaaa")
    rid = {p.run_name: wandb_run_id(p.job_id) for p in (ok, unfinished, short, later)}
    listing = Listing({"team/proj": [
        ListedRun(rid["ok"], summary_metrics={"trainer/global_step": 40}),
        ListedRun(rid["unf"], state="running"),
        ListedRun(rid["short"], summary_metrics={"trainer/global_step": 20}),
        ListedRun(rid["later"], state="crashed"),
        ListedRun(wandb_run_id(later.job_id, 1), summary_metrics={"global_step": 40})]})
    jobs = [ok, unfinished, short, later, absent, synced]
    problems = _unverified(listing, "team", "proj", jobs, states, OV)
    assert problems == [
        Unverified("unf", f"run team/proj/{rid['unf']} is running, not finished", SYNC),
        Unverified("short", f"run team/proj/{rid['short']} logged up to step 20, the job "
                            "recorded 40", RELOG),
        Unverified("absent", "no run with its id at team/proj", SYNC),
        Unverified("synced", "no run with its id at team/proj", RELOG)]
    assert listing.flushed == 1  # asked afresh, not from the client's cache
    (path, ids) = listing.asked[0]
    assert path == "team/proj" and wandb_run_id(ok.job_id, 7) in ids and ids == sorted(ids)


def test_an_unreadable_project_verifies_nothing(tmp_path: Path) -> None:
    jobs = [job("a", tmp_path), job("b", tmp_path)]
    failing = Listing({}, error=PermissionError("403 forbidden"))
    assert _unverified(failing, "team", "proj", jobs, {}, OV) == [
        Unverified(name, "could not read team/proj: PermissionError: 403 forbidden", SYNC)
        for name in ("a", "b")]
    assert shlex.split(SYNC) == ["tmgg-sweep", "sync", "stage=st"]


def test_the_command_line_of_sync_and_relog() -> None:
    from tmgg.cli.sync import DEFAULT_UPLOAD_TIMEOUT, DEFAULT_VERIFY_WAIT, parse_args

    args = parse_args(["stage=st", "--dry-run", "seed=1", "--upload-timeout", "5"])
    assert (args.overrides, args.dry_run, args.upload_timeout, args.verify_wait) == (
        ["stage=st", "seed=1"], True, 5.0, DEFAULT_VERIFY_WAIT)
    plain = parse_args(["stage=st"], prog="tmgg-sweep relog")
    assert (plain.dry_run, plain.upload_timeout, plain.verify_wait) == (
        False, DEFAULT_UPLOAD_TIMEOUT, 30)
    assert parse_args(["--verify-wait", "0.5"]).verify_wait == 0.5


def test_an_upload_past_its_time_limit_is_killed_with_its_group() -> None:
    from tmgg.cli.sync import run_with_time_limit

    code, output = run_with_time_limit([sys.executable, "-c", "print('done')"], {}, 600)
    assert (code, output) == (0, "done\n")
    failing = run_with_time_limit([sys.executable, "-c", "import sys; print('x'); "
                                   "sys.stdout.flush(); sys.exit(3)"], {}, 600)
    assert failing == (3, "x\n")
    hung = run_with_time_limit([sys.executable, "-c", "import signal; print('started', "
                                "flush=True); signal.pause()"], {}, 0.5)
    assert hung == (None, "started\n")  # rc None: stopped at the limit, not an exit


def test_relog_is_needed_only_for_a_run_missing_or_short(tmp_path: Path) -> None:
    from tmgg.cli.sync import relog_needed

    planned = job("a", tmp_path)
    finished = state(planned, tmp_path / "a", steps=40)
    own = wandb_run_id(planned.job_id)
    at_pin = Listing({"team/proj": [ListedRun(own, summary_metrics={"global_step": 40})]})
    assert relog_needed(at_pin, planned, finished) == (
        False, "its run is at the pinned destination, finished")
    running = Listing({"team/proj": [ListedRun(own, state="running")]})
    assert relog_needed(running, planned, finished) == (
        False, f"run team/proj/{own} is running, not finished (wait for it, then reconcile)")
    assert relog_needed(Listing({}), planned, None) == (True, "no run with its id at team/proj")
    short = Listing({"team/proj": [ListedRun(own, summary_metrics={"global_step": 10})]})
    assert relog_needed(short, planned, finished) == (
        True, f"run team/proj/{own} logged up to step 10, the job recorded 40")
    with pytest.raises(RuntimeError, match="^could not read team/proj: OSError: down$"):
        relog_needed(Listing({}, error=OSError("down")), planned, finished)


def test_the_next_generation_follows_every_id_ever_used(tmp_path: Path) -> None:
    from tmgg.cli.sync import next_generation, relogged_ids, remember_relogged_id

    planned = job("a", tmp_path, generation=1)
    output = job_output_dirs(planned, None)[-1]
    assert next_generation(Listing({}), planned, None) == 1
    assert relogged_ids(planned, None) == set()
    output.mkdir(parents=True)
    remember_relogged_id(planned, None, wandb_run_id(planned.job_id, 2))
    remember_relogged_id(planned, None, "zz")
    assert relogged_ids(planned, None) == {wandb_run_id(planned.job_id, 2), "zz"}
    assert (output / "wandb-relogged.json").read_text() == json.dumps(
        sorted({wandb_run_id(planned.job_id, 2), "zz"})) + "\n"
    assert next_generation(Listing({}), planned, None) == 3
    seen = Listing({"team/proj": [ListedRun(wandb_run_id(planned.job_id, 4))]})
    assert next_generation(seen, planned, None) == 5
    assert seen.flushed == 1 and seen.asked[0][0] == "team/proj"
    recorded = JobState(job_id=planned.job_id, run_name="a", status=FINISHED, record={
        "wandb": {"mode": "online", "run_id": wandb_run_id(planned.job_id, 6)}})
    assert next_generation(Listing({}), planned, recorded) == 7
    disabled = JobState(job_id=planned.job_id, run_name="a", status=FINISHED, record={
        "wandb": {"mode": "disabled", "run_id": wandb_run_id(planned.job_id, 6)}})
    assert next_generation(Listing({}), planned, disabled) == 3
    no_project = Listing({}, error=ValueError("project not found"))
    assert next_generation(no_project, planned, None) == 3
    (output / "wandb-relogged.json").write_text('{"not": "a list"}')
    assert relogged_ids(planned, None) == set()
    (output / "wandb-relogged.json").write_text('["ok", 3]')
    assert relogged_ids(planned, None) == {"ok"}
    missing = job("b", tmp_path)
    remember_relogged_id(missing, None, "r")  # no output folder: nothing written
    assert not job_output_dirs(missing, None)[0].exists()


def test_the_relogged_results_name_their_checkpoint(tmp_path: Path) -> None:
    import hashlib

    from tmgg.cli.sync import checkpoint_facts

    planned = job("a", tmp_path)
    assert checkpoint_facts(planned, None) == {}
    recorded = tmp_path / "recorded"
    (recorded / "checkpoints").mkdir(parents=True)
    (recorded / "checkpoints/last.ckpt").write_bytes(b"last")
    facts = checkpoint_facts(planned, state(planned, recorded))
    assert facts == {"tmgg/checkpoint": str(recorded / "checkpoints/last.ckpt"),
                     "tmgg/checkpoint_sha256": hashlib.sha256(b"last").hexdigest()}
    (recorded / "checkpoints/best.ckpt").write_bytes(b"best")
    assert checkpoint_facts(planned, state(planned, recorded))["tmgg/checkpoint"].endswith(
        "best.ckpt")


def test_without_a_key_for_the_host_nothing_is_uploaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tmgg.cli.sync import write_access_problem

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert write_access_problem(HOST, "team", "proj") == (
        f"no W&B API key for {HOST} (WANDB_API_KEY or wandb login)")

    class Broken:
        @property
        def viewer(self) -> Any:
            raise ConnectionError("refused")

    assert write_access_problem(HOST, "team", "proj", api=Broken()) == (
        f"cannot check that the W&B API key may write to 'team' on {HOST}: "
        "ConnectionError: refused")


def test_the_pinned_environment_starts_from_this_process_and_finds_the_hosts_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = Upload(HOST, "team", "proj")
    monkeypatch.setenv("WANDB_PROJECT", "stray")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    env = pinned_environment(upload)
    assert env["WANDB_PROJECT"] == "proj" and env["WANDB_API_KEY"] == "k" * 40
    assert env["PATH"] == os.environ["PATH"]
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine wandb.local\n  login user\n  password {'n' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(netrc))
    assert pinned_environment(upload)["WANDB_API_KEY"] == "n" * 40  # wandb login's key
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert "WANDB_API_KEY" not in pinned_environment(upload)


def test_the_upload_runs_in_the_pinned_environment_with_its_errors_in_the_output() -> None:
    from tmgg.cli.sync import run_with_time_limit

    code, output = run_with_time_limit(
        [sys.executable, "-c", "import os, sys; print(os.environ.get('PIN'), "
         "'HOME' in os.environ, flush=True); print('oops', file=sys.stderr)"], {"PIN": "team"}, 600)
    assert code == 0 and output.splitlines() == ["team False", "oops"]
    silent = run_with_time_limit([sys.executable, "-c", "import signal; signal.pause()"], {},
                                 0.5)
    assert silent == (None, "")


def test_objects_without_the_listings_attributes_and_a_missing_project(tmp_path: Path) -> None:
    from tmgg.cli.sync import fresh

    assert run_steps(object()) == -1
    fresh(object())  # a client without a cache to flush
    planned = job("a", tmp_path)
    absent = Listing({}, error=ValueError("Could not find project team/proj"))
    # No project yet is no run yet; with no offline run left to upload, only relog helps.
    assert _unverified(absent, "team", "proj", [planned], {}, OV) == [
        Unverified("a", "no run with its id at team/proj", RELOG)]
