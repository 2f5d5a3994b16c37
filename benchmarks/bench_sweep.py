"""Launcher benchmark: the 12-job ``stage=bench`` sweep through three Hydra launchers.

Runs, one after another in one invocation and each in fresh directories (a finished
job is skipped on re-run):

    tmgg-train -m stage=bench hydra/launcher=<L> experiments_dir=<tmp> outputs_dir=<tmp>

for L = ``local`` (this project's warm worker pool), ``basic`` (Hydra's sequential
in-process launcher) and ``submitit_local`` (hydra-submitit-launcher: one process
per job, all started at once), each launcher with its default settings. Every run
gets the same jobs: by default ``trainer.num_threads=1`` (one torch thread a job, what
the local launcher gives its workers anyway), so that the launchers, not thread
oversubscription, are compared. ``--threads-per-job 0`` leaves torch's default (one
thread per CPU): submitit_local then runs 12 jobs x 2 threads on 2 cores, and was
measured about 19x slower than local here (550 s; OpenMP threads fighting for cores).
Wall time is the whole command, start-up included. Training time per job is the job's own
``train_seconds`` (metrics.json / the ledger record: run_training from job setup to
test and metrics written).

Per-job overhead, as printed (two views):
    overhead/job       = (wall - sum of the run's train_seconds / P) / jobs
    overhead/job ideal = (wall - sum of the *local* run's train_seconds / CPUs) / jobs
P is how many jobs the launcher ran at once, measured from the job records' start and
finish times (local: its workers, basic: 1, submitit_local: all 12). The first is
what a job costs beyond its own training time as this launcher ran it (train_seconds
is wall-clock, so jobs sharing cores have longer ones); the second compares with
packing the same training work (measured under local: one thread and one core a job)
perfectly on every core, so it also charges idle cores and oversubscription.
Issue 3's targets: local >= 1.6x faster than basic and >= 1.5x faster than
submitit_local, per-job overhead of local <= 0.5 s.

Usage: ``python benchmarks/bench_sweep.py [--launchers local basic submitit_local]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "basic", "submitit_local")
STAGE = "bench"
EXPECTED_JOBS = 12  # conf/stage/bench.yaml: 3 models x 2 k x 2 seeds
TARGET_VS_BASIC = 1.6
TARGET_VS_SUBMITIT = 1.5
TARGET_OVERHEAD_S = 0.5


@dataclass
class LauncherRun:
    launcher: str
    threads_per_job: int | None  # None: torch's default
    wall_s: float
    returncode: int
    jobs: int
    finished: int
    train_seconds_total: float
    train_seconds_mean: float
    parallelism: int  # jobs run at once, measured from the job records' start/finish times
    overhead_per_job_s: float
    overhead_vs_ideal_s: float | None  # against the local run's training work on all CPUs
    first_start_s: float | None  # wall time until the first job started training


def _job_records(experiments: Path) -> list[dict[str, Any]]:
    jobs_dir = experiments / STAGE / "jobs"
    return [json.loads(p.read_text()) for p in sorted(jobs_dir.glob("*.json"))]


def _train_seconds(record: dict[str, Any], outputs: Path) -> float | None:
    metrics = record.get("metrics") or {}
    if "train_seconds" in metrics:
        return float(metrics["train_seconds"])
    for path in outputs.glob(f"{STAGE}/{record.get('run_name')}-*/metrics.json"):
        return float(json.loads(path.read_text())["train_seconds"])
    return None


def _max_concurrent(records: list[dict[str, Any]]) -> int:
    events = []
    for record in records:
        if record.get("started_at") and record.get("finished_at"):
            events.append((datetime.fromisoformat(record["started_at"]), 1))
            events.append((datetime.fromisoformat(record["finished_at"]), -1))
    running = best = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        best = max(best, running)
    return best


def run_launcher(launcher: str, root: Path, extra: list[str], timeout: float,
                 threads: int | None) -> LauncherRun:
    experiments, outputs = root / launcher / "experiments", root / launcher / "outputs"
    command = [sys.executable, "-m", "tmgg.cli.app", "-m", f"stage={STAGE}",
               f"hydra/launcher={launcher}", f"experiments_dir={experiments}",
               f"outputs_dir={outputs}",
               *([f"trainer.num_threads={threads}"] if threads else []), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    print(f"[{launcher}] {' '.join(command[2:])}", file=sys.stderr, flush=True)
    launched_at = datetime.now().astimezone()
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(f"[{launcher}] exit code {result.returncode}\n{result.stderr[-3000:]}",
              file=sys.stderr)
    records = _job_records(experiments)
    finished = [r for r in records if r.get("status") == "FINISHED"]
    seconds = [s for s in (_train_seconds(r, outputs) for r in finished) if s is not None]
    total = sum(seconds)
    parallelism = max(1, _max_concurrent(records))
    n = max(len(records), 1)
    starts = [datetime.fromisoformat(r["started_at"]) for r in records if r.get("started_at")]
    first_start = ((min(starts) - launched_at).total_seconds() if starts else None)
    return LauncherRun(
        launcher=launcher, threads_per_job=threads, wall_s=wall,
        returncode=result.returncode, jobs=len(records),
        finished=len(finished), train_seconds_total=total,
        train_seconds_mean=total / len(seconds) if seconds else 0.0,
        parallelism=parallelism, overhead_per_job_s=(wall - total / parallelism) / n,
        overhead_vs_ideal_s=None,
        first_start_s=first_start,
    )


def print_results(runs: list[LauncherRun], threads: int | None
                  ) -> tuple[dict[str, float], bool]:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(130, Console().width))
    by_name = {run.launcher: run for run in runs}
    cpus = os.cpu_count() or 1
    if "local" in by_name:
        work = by_name["local"].train_seconds_total
        for run in runs:
            run.overhead_vs_ideal_s = (run.wall_s - work / cpus) / (run.jobs or 1)
    thread_text = f"{threads} torch thread(s) a job" if threads else "torch's default threads"
    table = Table(title=f"stage={STAGE}: 12 jobs x 500 steps on {os.cpu_count()} CPUs, "
                        f"{thread_text}")
    for column in ("launcher", "wall s", "finished", "train s (sum)", "train s/job",
                   "jobs at once (P)", "first job started at s", "overhead/job s",
                   "overhead/job vs ideal s", "wall / local wall"):
        table.add_column(column, justify="left" if column == "launcher" else "right")
    local = by_name.get("local")
    for run in runs:
        table.add_row(
            run.launcher, f"{run.wall_s:.1f}", f"{run.finished}/{run.jobs}",
            f"{run.train_seconds_total:.1f}", f"{run.train_seconds_mean:.2f}",
            str(run.parallelism),
            "-" if run.first_start_s is None else f"{run.first_start_s:.1f}",
            f"{run.overhead_per_job_s:.2f}",
            "-" if run.overhead_vs_ideal_s is None else f"{run.overhead_vs_ideal_s:.2f}",
            f"{run.wall_s / local.wall_s:.2f}" if local else "-",
        )
    console.print(table)
    ratios: dict[str, float] = {}
    ok = True
    if local:
        overhead_ok = local.overhead_per_job_s <= TARGET_OVERHEAD_S
        ok = ok and overhead_ok
        lines = [f"local per-job overhead {local.overhead_per_job_s:.2f} s "
                 f"(target <= {TARGET_OVERHEAD_S}): " + ("met" if overhead_ok else "NOT met")]
        for name, target in (("basic", TARGET_VS_BASIC), ("submitit_local", TARGET_VS_SUBMITIT)):
            other = by_name.get(name)
            if other is None:
                continue
            ratio = other.wall_s / local.wall_s
            ratios[f"{name}/local"] = ratio
            met = ratio >= target
            ok = ok and met
            lines.append(f"{name}/local = {ratio:.2f} (target >= {target}): "
                         + ("met" if met else "NOT met"))
        console.print("\n".join(lines))
    console.print(
        "overhead/job = (wall - sum(train_seconds) / P) / jobs, P = jobs run at once "
        "(measured); vs ideal = (wall - local's sum(train_seconds) / CPUs) / jobs. "
        "train_seconds is a job's own run_training time (setup, training, validations, "
        "test). Timings on a shared machine are noisy; all launchers ran in this one "
        "invocation, one after another.")
    return ratios, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launcher")
    parser.add_argument("--threads-per-job", type=int, default=1,
                        help="trainer.num_threads for every job; 0 = torch's default")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)

    threads = args.threads_per_job or None
    runs = []
    with tempfile.TemporaryDirectory(prefix="tmgg_bench_sweep_") as tmp:
        for launcher in args.launchers:
            runs.append(run_launcher(launcher, Path(tmp), args.overrides, args.timeout,
                                     threads))
    ratios, ok = print_results(runs, threads)
    failed = any(run.returncode != 0 or run.finished != EXPECTED_JOBS for run in runs)
    if failed:
        print(f"a launcher did not finish all {EXPECTED_JOBS} jobs: the figures above are "
              "not comparable", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "sweep", "stage": STAGE, "cpus": os.cpu_count(),
            "machine": platform.platform(), "overrides": args.overrides,
            "threads_per_job": threads,
            "targets": {"basic/local": TARGET_VS_BASIC, "submitit_local/local":
                        TARGET_VS_SUBMITIT, "overhead_per_job_s": TARGET_OVERHEAD_S},
            "targets_met": ok, "ratios": ratios, "runs": [asdict(run) for run in runs],
        }, indent=2) + "\n")
    if failed:
        return 1
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
