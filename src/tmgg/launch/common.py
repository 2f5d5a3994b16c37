"""Launcher plumbing shared by the local and Modal launchers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.jobs.plan import PlannedJob
from tmgg.run.executor import JobPayload, serialize

log = logging.getLogger(__name__)

CLAIMED_ELSEWHERE = "SKIPPED (claimed)"


def prepare_sweep_dir(config: DictConfig) -> None:
    """Create the sweep dir and save multirun.yaml, as Hydra's launchers do."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")


def build_payload(job: PlannedJob, task_function: Any, env: dict[str, str] | None = None,
                  claim_ticket: str | None = None) -> bytes:
    from hydra.core.singleton import Singleton

    return serialize(JobPayload(task_function=task_function, sweep_config=job.sweep_config,
                                singleton_state=Singleton.get_state(), env=env,
                                claim_ticket=claim_ticket))


def outcome_rows(jobs: Sequence[PlannedJob], results: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for job, result in zip(jobs, results, strict=True):
        skipped = getattr(result, "skipped", False)
        claimed_by = getattr(result, "claimed_by", None)
        ok = result.status.name == "COMPLETED"
        value = result._return_value
        reason = getattr(value, "reason", None)  # a JobSkipped from the job's process
        if reason == "finished":
            skipped, value = True, getattr(value, "metrics", None)
        elif reason == "claimed":
            claimed_by = getattr(value, "detail", None)
        status = "SKIPPED (finished)" if skipped else ("FINISHED" if ok else "FAILED")
        if status == "FINISHED" and isinstance(value, dict) and "pruned_at_step" in value:
            status = "PRUNED"  # an adaptive stage's trial its pruner stopped
        rows.append({
            "job": job.run_name,
            "status": CLAIMED_ELSEWHERE if claimed_by else status,
            "duration_s": getattr(result, "duration_s", None),
            "detail": claimed_by or (_detail(value) if ok else _error_line(value)),
        })
    return rows


def _detail(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("test/mse", "test/loss"):
            if key in value:
                return f"{key}={float(value[key]):.4f}"
    return "" if value is None else str(value)[:60]


def _error_line(error: Any) -> str:
    error_type = getattr(error, "error_type", type(error).__name__)
    message = getattr(error, "message", str(error))
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return f"{error_type}: {first}"[:160]


def print_outcome_table(jobs: Sequence[PlannedJob], results: Sequence[Any], title: str,
                        summary: bool = True) -> None:
    """The outcome of every job as a table that fits 80 columns without cutting a run
    name (the name column takes what it needs; the detail column wraps)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = outcome_rows(jobs, results)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job", no_wrap=True, min_width=max((len(r["job"]) for r in rows),
                                                        default=3))
    table.add_column("status", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in rows:
        style = {"FINISHED": "green", "FAILED": "red"}.get(row["status"], "yellow")
        duration = "" if row["duration_s"] is None else f"{row['duration_s']:.1f}"
        table.add_row(row["job"], f"[{style}]{row['status']}[/{style}]", duration,
                      row["detail"])
    console = Console(stderr=True)
    console.print(table)
    if summary:
        console.print(outcome_summary(rows))


def outcome_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's counts, one line (and what a claimed job means, when there is one)."""
    failed = sum(1 for r in rows if r["status"] == "FAILED")
    claimed = sum(1 for r in rows if r["status"] == CLAIMED_ELSEWHERE)
    skipped = sum(1 for r in rows if r["status"].startswith("SKIPPED")) - claimed
    pruned = sum(1 for r in rows if r["status"] == "PRUNED")
    text = (f"{len(rows) - failed - skipped - claimed - pruned} finished, {skipped} skipped "
            f"(already finished), {claimed} left to the sweep that holds them, "
            f"{failed} failed")
    if pruned:
        text += f", {pruned} pruned"
    if claimed:
        text += ("\nJobs held by another sweep are not failures (exit code 0 if nothing "
                 "failed); follow them with `tmgg-sweep status`.")
    return text


def dispatch_tasks(jobs: Sequence[PlannedJob], pending: Sequence[int],
                   config: DictConfig, task_function: Any = None) -> list[list[int]]:
    """The launcher's tasks: positions of ``jobs`` (among ``pending``), one list per task.

    Jobs of one batch stream form a fused group (``tmgg.jobs.fusion``) when
    the launcher's ``fuse`` is auto and the task is tmgg's own training (an app with
    its own task function is run job by job); every other job is a task of its own.
    """
    from tmgg.jobs.fusion import fusion_settings, group_jobs

    mode, cap = fusion_settings(config)
    if not is_tmgg_training(task_function):
        mode = "off"
    groups = group_jobs([jobs[p] for p in pending], mode, cap)
    return [[pending[i] for i in group] for group in groups]


def task_payload(task_jobs: Sequence[PlannedJob], task_function: Any,
                 env: dict[str, str] | None = None, claim_ticket: str | None = None) -> bytes:
    """A solo job's payload, or a fused group's (one JobReturn per member comes back).

    ``claim_ticket``: the ticket every job of the task was claimed with, so that the
    jobs' own process takes their claims over (``tmgg.jobs.claims``).
    """
    if len(task_jobs) == 1:
        return build_payload(task_jobs[0], task_function, env, claim_ticket=claim_ticket)
    from tmgg.run.fused_jobs import build_group_payload

    return build_group_payload(list(task_jobs), task_function, env,
                               claim_ticket=claim_ticket)


def task_results(returned: Any) -> list[Any]:
    """A task's JobReturns: a group returns a list, a solo job one JobReturn."""
    return list(returned) if isinstance(returned, list) else [returned]


def is_tmgg_training(task_function: Any) -> bool:
    """Whether a task function is ``tmgg-train``'s own (also when run as ``-m tmgg.cli.app``)."""
    import tmgg

    code = getattr(task_function, "__code__", None)
    if code is None:
        return False
    app = Path(tmgg.__file__).parent / "cli" / "app.py"
    return Path(code.co_filename).resolve() == app.resolve()
