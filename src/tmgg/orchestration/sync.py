"""``tmgg-sweep sync``: upload a stage's offline W&B runs to the pinned destination.

Jobs that ran offline (``logger.mode=offline``, or ``auto`` without a key) leave
wandb's run files in their output dirs (``<job output dir>/wandb/offline-run-*``).
This command hands each job's offline run dirs to wandb's own uploader
(``wandb sync``), always with the job's pinned entity, project and host
(``--entity``/``--project``, ``WANDB_BASE_URL=logger.base_url``): never the API key's
default entity, never a host or destination from the environment. The run keeps
its id (derived from the job id), so ``tmgg-sweep reconcile --online`` then finds
it as the job's run. wandb marks a synced run dir and skips it next time, so
running the command again uploads nothing twice.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tmgg.orchestration.ledger import JobState
from tmgg.orchestration.plan import PlannedJob
from tmgg.orchestration.reconcile import job_output_dirs

# Variables that could point the upload elsewhere; the pinned values replace them.
_REDIRECTING = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_MODE",
                "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RESUME",
                "WANDB_SWEEP_ID", "WANDB_LAUNCH")


@dataclass
class Upload:
    """The offline run dirs that go to one pinned ``host``, ``entity/project``."""

    base_url: str
    entity: str
    project: str
    run_dirs: list[Path] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


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
    return list(uploads.values())


def pinned_environment(upload: Upload, environ: dict[str, str] | None = None
                       ) -> dict[str, str]:
    """This process's environment with the host and destination pinned for wandb."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k not in _REDIRECTING}
    env.update(WANDB_BASE_URL=upload.base_url, WANDB_ENTITY=upload.entity,
               WANDB_PROJECT=upload.project)
    return env


def sync_command(upload: Upload) -> list[str]:
    """``wandb sync`` forced to the pinned entity and project, for these run dirs."""
    return [sys.executable, "-m", "wandb", "sync", "--entity", upload.entity,
            "--project", upload.project, *(str(path) for path in upload.run_dirs)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep sync",
        description="Upload a stage's offline W&B runs to the stage's pinned entity, project "
                    "and host (logger.base_url), with wandb's own uploader; idempotent.")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be uploaded, and where")
    parser.add_argument("overrides", nargs="*",
                        help="the overrides of `tmgg-train -m`, e.g. stage=stage1")
    return parser.parse_intermixed_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """``tmgg-sweep sync stage=... [--dry-run]``: non-zero if an upload failed."""
    from tmgg.orchestration.compose import recorded_or_composed_sweep

    args = parse_args(argv)
    sweep = recorded_or_composed_sweep(args.overrides)
    uploads = plan_uploads(sweep.jobs, sweep.ledger.states())
    if not uploads:
        print(f"stage {sweep.stage}: no offline W&B runs in the jobs' output dirs")
        return 0
    failed = 0
    for upload in uploads:
        print(f"stage {sweep.stage}: {len(upload.run_dirs)} offline run dir(s) of "
              f"{len(upload.jobs)} job(s) -> {upload.entity}/{upload.project} on "
              f"{upload.base_url}")
        if args.dry_run:
            for path in upload.run_dirs:
                print(f"  {path}")
            continue
        result = subprocess.run(sync_command(upload), env=pinned_environment(upload),
                                text=True, capture_output=True)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            failed += 1
            print(f"wandb sync to {upload.entity}/{upload.project} failed "
                  f"(exit {result.returncode})", file=sys.stderr)
    return 1 if failed else 0
