"""``tmgg-sweep sync`` and ``tmgg-sweep relog``: put a stage's runs at the pinned
destination, and prove they are there.

``sync``: jobs that ran offline (``logger.mode=offline``, or ``auto`` without a key)
leave wandb's run files in their output dirs (``<job output dir>/wandb/offline-run-*``).
This command hands each destination's offline run dirs to wandb's own uploader
(``wandb sync``), always with the job's pinned entity, project and host
(``--entity``/``--project``, ``WANDB_BASE_URL=logger.base_url``): never the API key's
default entity, never a host or destination from the environment. The run keeps its
id (derived from the job id), so ``tmgg-sweep reconcile --online`` finds it.

It never trusts ``wandb sync``'s exit code (0 when the server refused the upload with
a 403; a deleted run's id is retried forever) nor its ``.synced`` marker (a second
sync skips the run without asking the server):

1. before uploading, the key (found as wandb finds it) must be able to write to the
   pinned entity: refused with the key's user named otherwise;
2. every upload has a time limit (``--upload-timeout``); a run id the server refuses
   because a run with that id was deleted gets the ``logger.run_generation`` advice;
3. after uploading, the W&B API must show every job's run id at the pinned entity,
   project and host, state finished, with at least the job's recorded steps; every
   job that is not is named, with what to do, and the exit code is non-zero.

``relog``: a FINISHED job whose W&B run is missing (logged with
``logger.mode=disabled``, deleted afterwards, or misrouted) gets its results re-logged
from its ledger record and checkpoint into a new run generation at the pinned
destination, then verified the same way; ``reconcile`` counts a later generation as
the job's own run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmgg.cli.reconcile import job_output_dirs, own_run_ids
from tmgg.config.identity import run_generation, wandb_run_id
from tmgg.jobs.ledger import FINISHED, JobState
from tmgg.jobs.plan import PlannedJob

# Variables that could point the upload elsewhere; the pinned values replace them.
_REDIRECTING = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_MODE",
                "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RESUME",
                "WANDB_SWEEP_ID", "WANDB_LAUNCH")
DEFAULT_UPLOAD_TIMEOUT = 600  # seconds one destination's `wandb sync` may take
DEFAULT_VERIFY_WAIT = 30  # seconds a lagging runs listing gets to show a finish
DELETED_RUN_MESSAGE = "was previously created and deleted"


@dataclass
class Upload:
    """The offline run dirs that go to one pinned ``host``, ``entity/project``."""

    base_url: str
    entity: str
    project: str
    run_dirs: list[Path] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    planned: list[PlannedJob] = field(default_factory=list)


@dataclass
class Unverified:
    """A job whose run is not where, or not what, it must be; and what to do."""

    job: str
    problem: str
    advice: str


def offline_run_dirs(job: PlannedJob, state: JobState | None) -> list[Path]:
    """The job's offline run dirs, oldest first (a resumed job has several)."""
    found: dict[Path, Path] = {}
    for directory in job_output_dirs(job, state):
        root = Path(directory) / "wandb"
        if root.is_dir():
            for run_dir in root.glob("offline-run-*"):
                if run_dir.is_dir() and any(run_dir.glob("run-*.wandb")):
                    found.setdefault(run_dir.resolve(), run_dir)
    return sorted(found.values(), key=lambda path: path.name)


def plan_uploads(jobs: Sequence[PlannedJob], states: dict[str, JobState]) -> list[Upload]:
    """Group every W&B job's offline run dirs by its pinned host and destination."""
    uploads: dict[tuple[str, str, str], Upload] = {}
    for job in jobs:
        if not job.is_tmgg_job or job.wandb is None:
            continue
        run_dirs = offline_run_dirs(job, states.get(job.job_id))
        if not run_dirs:
            continue
        key = (str(job.wandb["base_url"]), str(job.wandb["entity"]), str(job.wandb["project"]))
        upload = uploads.setdefault(key, Upload(*key))
        upload.run_dirs += run_dirs
        upload.jobs.append(job.run_name)
        upload.planned.append(job)
    return list(uploads.values())


def pinned_environment(upload: Upload, environ: dict[str, str] | None = None
                       ) -> dict[str, str]:
    """This process's environment with the host, destination and key pinned for wandb."""
    from tmgg.task.loggers import find_wandb_api_key

    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k not in _REDIRECTING}
    env.update(WANDB_BASE_URL=upload.base_url, WANDB_ENTITY=upload.entity,
               WANDB_PROJECT=upload.project)
    found = find_wandb_api_key(upload.base_url, source)
    if found is not None:  # the key wandb finds for the host, under whatever name
        env["WANDB_API_KEY"] = found.api_key
    return env


def sync_command(upload: Upload) -> list[str]:
    """``wandb sync`` forced to the pinned entity and project, for these run dirs."""
    return [sys.executable, "-m", "wandb", "sync", "--entity", upload.entity,
            "--project", upload.project, *(str(path) for path in upload.run_dirs)]


def run_with_time_limit(command: list[str], env: dict[str, str], seconds: float
                        ) -> tuple[int | None, str]:
    """Run ``command``; kill its whole process group after ``seconds`` (rc None)."""
    process = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output or ""


# -- the key, before anything is uploaded -------------------------------------------
def write_access_problem(base_url: str, entity: str, project: str,
                         api: Any | None = None) -> str | None:
    """Why the key wandb finds for the host cannot write to ``entity/project`` (None:
    it can)."""
    from tmgg.jobs.wandb_check import write_refusal
    from tmgg.task.loggers import find_wandb_api_key

    found = find_wandb_api_key(base_url)
    if found is None and api is None:
        return f"no W&B API key for {base_url} (WANDB_API_KEY or wandb login)"
    try:
        if api is None:
            import wandb

            api = wandb.Api(overrides={"base_url": base_url}, api_key=found.api_key,
                            timeout=60)
        return write_refusal(api, entity, project, base_url)
    except Exception as error:  # noqa: BLE001 - unproven access is refused
        return (f"cannot check that the W&B API key may write to {entity!r} on {base_url}: "
                f"{type(error).__name__}: {error}")


# -- verification through the API --------------------------------------------------
def recorded_steps(state: JobState | None) -> int:
    """The training steps the job's record says it ran (0 when it says nothing)."""
    metrics = (state.record if state else {}).get("metrics") or {}
    try:
        return int(metrics.get("global_step") or 0)
    except (TypeError, ValueError):
        return 0


def run_steps(run: Any) -> int:
    """The last training step a W&B run logged (Lightning's ``trainer/global_step``)."""
    summary = getattr(run, "summary_metrics", None) or {}
    for key in ("trainer/global_step", "global_step"):
        if isinstance(summary.get(key), (int, float)):
            return int(summary[key])
    return -1


def verify_at_destination(api: Any, entity: str, project: str, jobs: Sequence[PlannedJob],
                          states: dict[str, JobState], overrides: Sequence[str],
                          wait: float = DEFAULT_VERIFY_WAIT, poll: float = 2.0,
                          ) -> list[Unverified]:
    """Every job's run at ``entity/project``: one of its ids, finished, all its steps.

    A listing may lag behind a finish: what is not yet right is asked again until
    ``wait`` seconds have passed. A path that cannot be read verifies nothing.
    """
    deadline = time.monotonic() + wait
    while True:
        problems = _unverified(api, entity, project, jobs, states, overrides)
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(poll)


def _unverified(api: Any, entity: str, project: str, jobs: Sequence[PlannedJob],
                states: dict[str, JobState], overrides: Sequence[str]) -> list[Unverified]:
    from tmgg.cli.reconcile import is_missing_project, shell_command

    path = f"{entity}/{project}"
    ids = sorted({run_id for job in jobs for run_id in own_run_ids(job)})
    retry = shell_command("tmgg-sweep", "sync", *overrides)
    fresh(api)
    try:
        runs = {str(run.id): run for run in api.runs(path, filters={"name": {"$in": ids}})}
    except Exception as error:  # noqa: BLE001 - unread is unverified
        if is_missing_project(error):
            runs = {}
        else:
            return [Unverified(job.run_name, f"could not read {path}: "
                               f"{type(error).__name__}: {error}", retry) for job in jobs]
    problems = []
    for job in jobs:
        state = states.get(job.job_id)
        own = [runs[run_id] for run_id in reversed(own_run_ids(job)) if run_id in runs]
        steps = recorded_steps(state)
        if not own:
            # wandb skips a run dir it marked synced: then only a relog puts it back.
            marked = all(Path(f"{log}.synced").exists() for run_dir in
                         offline_run_dirs(job, state) for log in run_dir.glob("run-*.wandb"))
            problems.append(Unverified(
                job.run_name, f"no run with its id at {path}",
                shell_command("tmgg-sweep", "relog", *overrides) if marked else retry))
            continue
        run = own[0]
        if str(run.state) != "finished":
            problems.append(Unverified(job.run_name, f"run {path}/{run.id} is {run.state}, "
                                       "not finished", retry))
        elif run_steps(run) < steps:
            problems.append(Unverified(
                job.run_name, f"run {path}/{run.id} logged up to step {run_steps(run)}, the "
                f"job recorded {steps}", shell_command("tmgg-sweep", "relog", *overrides)))
    return problems


def fresh(api: Any) -> None:
    """``wandb.Api`` keeps every listing it made; a check must ask the server again."""
    flush = getattr(api, "flush", None)
    if callable(flush):
        flush()


def report_unverified(problems: Sequence[Unverified], destination: str) -> None:
    for problem in problems:
        print(f"NOT VERIFIED job {problem.job}: {problem.problem} ({destination}); "
              f"to fix: {problem.advice}", file=sys.stderr)


def deleted_id_advice(output: str, timed_out: bool, jobs: Sequence[PlannedJob],
                      overrides: Sequence[str]) -> str | None:
    """A deleted run id refused by the server: start a new ``logger.run_generation``.

    wandb 0.31 retries that 409 without end and prints nothing about it, so an upload
    stopped at its time limit gets this advice too.
    """
    if DELETED_RUN_MESSAGE not in output and not timed_out:
        return None
    from tmgg.cli.reconcile import shell_command

    generation = max(run_generation(job.task_config) for job in jobs) + 1
    return ("if W&B refuses the run id because a run with it was deleted there (it never "
            "reuses one; wandb retries that refusal without end), re-log the finished jobs "
            "into a new run generation with "
            + shell_command("tmgg-sweep", "relog", *overrides)
            + f" (or relaunch with logger.run_generation={generation})")


def parse_args(argv: Sequence[str], prog: str = "tmgg-sweep sync") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Upload a stage's offline W&B runs to the stage's pinned entity, project "
                    "and host (logger.base_url), with wandb's own uploader, then verify "
                    "through the W&B API that every job's run is there, finished, with all "
                    "its steps." if prog.endswith("sync") else
                    "Re-log each FINISHED job whose W&B run is missing from its ledger "
                    "record and checkpoint, into a new run generation at the pinned "
                    "destination; then verify through the W&B API.")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be uploaded, and where")
    parser.add_argument("--upload-timeout", type=float, default=DEFAULT_UPLOAD_TIMEOUT,
                        metavar="S", help="seconds one upload may take (default %(default)s)")
    parser.add_argument("--verify-wait", type=float, default=DEFAULT_VERIFY_WAIT,
                        metavar="S", help="seconds a lagging W&B listing gets to show each "
                                          "run finished (default %(default)s)")
    parser.add_argument("overrides", nargs="*",
                        help="the overrides of `tmgg-train -m`, e.g. stage=stage1")
    return parser.parse_intermixed_args(list(argv))


def _api(base_url: str) -> Any:
    import wandb

    from tmgg.task.loggers import find_wandb_api_key

    found = find_wandb_api_key(base_url)
    return wandb.Api(overrides={"base_url": base_url}, timeout=60,
                     api_key=found.api_key if found else None)


def main(argv: Sequence[str]) -> int:
    """``tmgg-sweep sync stage=... [--dry-run]``: non-zero unless every run is verified."""
    from tmgg.jobs.compose import recorded_or_composed_sweep

    args = parse_args(argv)
    sweep = recorded_or_composed_sweep(args.overrides)
    states = sweep.ledger.states()
    uploads = plan_uploads(sweep.jobs, states)
    if not uploads:
        print(f"stage {sweep.stage}: no offline W&B runs in the jobs' output dirs")
        return 0
    failed = 0
    for upload in uploads:
        destination = f"{upload.entity}/{upload.project} on {upload.base_url}"
        print(f"stage {sweep.stage}: {len(upload.run_dirs)} offline run dir(s) of "
              f"{len(upload.jobs)} job(s) -> {upload.entity}/{upload.project} on "
              f"{upload.base_url}")
        if args.dry_run:
            for path in upload.run_dirs:
                print(f"  {path}")
            continue
        refused = write_access_problem(upload.base_url, upload.entity, upload.project)
        if refused is not None:
            failed += 1
            print(f"sync refused, nothing uploaded to {destination}: {refused}; jobs: "
                  f"{', '.join(upload.jobs)}", file=sys.stderr)
            continue
        code, output = run_with_time_limit(sync_command(upload), pinned_environment(upload),
                                           args.upload_timeout)
        sys.stdout.write(output)
        if code is None:
            print(f"wandb sync to {destination} did not finish within "
                  f"{args.upload_timeout:g} s and was stopped", file=sys.stderr)
        elif code != 0:
            print(f"wandb sync to {destination} failed (exit {code})", file=sys.stderr)
        problems = verify_at_destination(_api(upload.base_url), upload.entity,
                                         upload.project, upload.planned, states,
                                         args.overrides, wait=args.verify_wait)
        if problems:
            failed += 1
            advice = deleted_id_advice(output, code is None, upload.planned, args.overrides)
            if advice is not None:
                problems = [Unverified(p.job, p.problem, advice) for p in problems]
            report_unverified(problems, destination)
        else:
            print(f"verified: {len(upload.planned)} job(s)' runs at {destination}, "
                  "finished, with their recorded steps")
    return 1 if failed else 0


# -- relog: a finished job's results into a new run generation -------------------------
def relog_needed(api: Any, job: PlannedJob, state: JobState | None) -> tuple[bool, str]:
    """Whether a FINISHED job needs its results re-logged, and why (or why not)."""
    problems = _unverified(api, str(job.wandb["entity"]), str(job.wandb["project"]), [job],
                           {job.job_id: state} if state else {}, ())
    if not problems:
        return False, "its run is at the pinned destination, finished"
    if " is running," in problems[0].problem:
        return False, problems[0].problem + " (wait for it, then reconcile)"
    if problems[0].problem.startswith("could not read"):
        raise RuntimeError(problems[0].problem)
    return True, problems[0].problem


def next_generation(api: Any, job: PlannedJob, state: JobState | None) -> int:
    """The first run generation after every id of the job that W&B has seen or the
    record says was used (a deleted run's id can never be used again)."""
    ids = own_run_ids(job)
    path = f"{job.wandb['entity']}/{job.wandb['project']}"
    fresh(api)
    try:
        present = {str(run.id) for run in api.runs(path, filters={"name": {"$in": ids}})}
    except ValueError:  # no project yet
        present = set()
    record = (state.record if state else {}) or {}
    recorded = record.get("wandb") or {}
    if str(recorded.get("mode") or "") not in ("", "disabled"):
        present.add(str(recorded.get("run_id") or ""))
    present.update(relogged_ids(job, state))  # earlier relogs' ids, maybe deleted since
    used = [ids.index(run_id) for run_id in present if run_id in ids]
    return run_generation(job.task_config) + (max(used) + 1 if used else 0)


RELOG_FILE = "wandb-relogged.json"  # in the job's output dir: run ids relog has used


def relogged_ids(job: PlannedJob, state: JobState | None) -> set[str]:
    """Run ids earlier relogs of the job used (read as data, never trusted further)."""
    import json

    ids: set[str] = set()
    for directory in job_output_dirs(job, state):
        try:
            data = json.loads((Path(directory) / RELOG_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, list):
            ids.update(str(item) for item in data if isinstance(item, str))
    return ids


def remember_relogged_id(job: PlannedJob, state: JobState | None, run_id: str) -> None:
    """Note a run id as used before the run starts: W&B never takes it again once the
    run is deleted, and says so only by retrying the refusal until init times out."""
    import json

    directory = Path(job_output_dirs(job, state)[0])
    if not directory.is_dir():
        return
    ids = sorted(relogged_ids(job, state) | {run_id})
    (directory / RELOG_FILE).write_text(json.dumps(ids) + "\n")


def checkpoint_facts(job: PlannedJob, state: JobState | None) -> dict[str, str]:
    """The job's checkpoint the re-logged results belong to: its path and sha256."""
    for directory in job_output_dirs(job, state):
        for name in ("best.ckpt", "last.ckpt"):
            path = Path(directory) / "checkpoints" / name
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                return {"tmgg/checkpoint": str(path), "tmgg/checkpoint_sha256": digest}
    return {}


def relog_job(job: PlannedJob, state: JobState | None, generation: int) -> str:
    """Log the job's recorded results as run ``generation`` at its pinned destination;
    the live run is checked like a training run's before anything is logged."""
    import tempfile

    import wandb

    from tmgg.task.loggers import ModeDecision, find_wandb_api_key, pinned_wandb_environment
    from tmgg.task.wandb_destination import destination_problem

    pin = job.wandb
    entity, project, base_url = str(pin["entity"]), str(pin["project"]), str(pin["base_url"])
    run_id = wandb_run_id(job.job_id, generation)
    record = (state.record if state else {}) or {}
    metrics = {key: value for key, value in (record.get("metrics") or {}).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    step = int(metrics.get("global_step") or 0)
    found = find_wandb_api_key(base_url)
    remember_relogged_id(job, state, run_id)
    with tempfile.TemporaryDirectory(prefix="tmgg-relog-") as workdir, \
            pinned_wandb_environment(entity, project, job=job.run_name, base_url=base_url,
                                     mode=ModeDecision("online")):
        run = wandb.init(
            entity=entity, project=project, id=run_id, name=job.run_name,
            group=str(pin.get("group") or job.stage), config=job.task_config,
            resume="never", mode="online", dir=workdir, job_type="relog",
            tags=["relogged"], reinit="create_new",
            settings=wandb.Settings(base_url=base_url, init_timeout=60, silent=True,
                                    api_key=found.api_key if found else None))
        problem = destination_problem(run.entity, run.project, run.id, entity, project,
                                      run_id, live_base_url=str(run.settings.base_url),
                                      base_url=base_url)
        if problem is not None:
            run.finish(exit_code=1)
            raise RuntimeError(f"job {job.run_name}: {problem}; nothing re-logged")
        run.log({**metrics, "trainer/global_step": step}, step=step)
        run.summary.update({"tmgg/relogged": True, "tmgg/job_id": job.job_id,
                            **checkpoint_facts(job, state)})
        run.finish()
    return f"{entity}/{project}/{run_id}"


def relog_main(argv: Sequence[str]) -> int:
    """``tmgg-sweep relog stage=...``: non-zero unless every FINISHED job is verified."""
    from tmgg.jobs.compose import recorded_or_composed_sweep

    args = parse_args(argv, prog="tmgg-sweep relog")
    sweep = recorded_or_composed_sweep(args.overrides)
    states = sweep.ledger.states()
    finished = [job for job in sweep.jobs if job.is_tmgg_job and job.wandb is not None
                and states.get(job.job_id) is not None
                and states[job.job_id].status == FINISHED]
    failed = 0
    apis: dict[str, Any] = {}
    relogged: list[PlannedJob] = []
    for job in finished:
        state = states[job.job_id]
        base_url, entity = str(job.wandb["base_url"]), str(job.wandb["entity"])
        try:
            if base_url not in apis:
                refused = write_access_problem(base_url, entity, str(job.wandb["project"]))
                if refused is not None:
                    print(f"relog refused, nothing logged: {refused}", file=sys.stderr)
                    return 1
                apis[base_url] = _api(base_url)
            needed, why = relog_needed(apis[base_url], job, state)
            if not needed:
                print(f"job {job.run_name}: not re-logged: {why}")
                continue
            generation = next_generation(apis[base_url], job, state)
            if args.dry_run:
                print(f"job {job.run_name}: would re-log ({why}) as run generation "
                      f"{generation}")
                continue
            path = relog_job(job, state, generation)
            print(f"job {job.run_name}: re-logged ({why}) as {path}")
            relogged.append(job)
        except Exception as error:  # noqa: BLE001 - one job's failure stops only that job
            failed += 1
            print(f"job {job.run_name}: relog failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
    for job in relogged:
        problems = verify_at_destination(
            apis[str(job.wandb["base_url"])], str(job.wandb["entity"]),
            str(job.wandb["project"]), [job], states, args.overrides, wait=args.verify_wait)
        if problems:
            failed += 1
            report_unverified(problems, str(job.wandb["base_url"]))
    print(f"stage {sweep.stage}: {len(relogged)} job(s) re-logged, {failed} failed")
    return 1 if failed else 0
