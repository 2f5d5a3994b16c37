"""``tmgg-sweep plan``, ``status`` and ``resume``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from typing import Any

from tmgg.jobs.ledger import (
    CANCELLED,
    FAILED,
    FINISHED,
    IN_FLIGHT,
    LOST,
    MISSING,
    PLANNED,
    SKIPPED,
    SUPERSEDED,
    Ledger,
)

OVERRIDES_HELP = "Hydra overrides as for `tmgg-train -m`, e.g. stage=stage1 model=linear_pe"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tmgg-sweep {prog}", description=description)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _console() -> Any:
    """Rich console; wide when piped so a table's columns are never truncated, unless
    ``COLUMNS`` says how wide."""
    import os
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") \
        else Console(width=220)


def _optional(module: str, name: str) -> Any:
    """A function of another part of the product, when that part is installed."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def required_check(module: str, name: str) -> Any:
    """A check the plan cannot go without; one that cannot be loaded refuses the plan."""
    import importlib

    from tmgg.jobs.plan import PlanError

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise PlanError(f"the plan check {module}.{name} cannot run ({type(error).__name__}: "
                        f"{error}); nothing is planned without it") from error


def build_plan_rows(overrides: list[str]) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Compose and check every job; rows for the plan table plus sweep-level facts."""
    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(overrides)
    # The destination and cost checks are part of the plan, not optional extras: one
    # that cannot be imported refuses the plan (required_check raises PlanError).
    check_wandb = required_check("tmgg.jobs.wandb_check", "check_wandb_destinations")
    plan_estimates = required_check("tmgg.launch.cost", "plan_estimates")
    check_limit = required_check("tmgg.launch.cost", "check_cost_limit")
    check_wandb(sweep.jobs, sweep.master_config)
    # The launcher's own refusals, as the launch makes them (less credentials and network).
    run_checks = required_check("tmgg.jobs.launcher_hooks", "run_checks")
    run_checks(sweep.master_config, sweep.jobs)
    estimates: list[dict[str, Any]] = plan_estimates(sweep.master_config, sweep.jobs)
    resources = None
    groups = fused_groups(sweep)
    describe = _optional("tmgg.launch.slurm_resources", "describe_launcher")
    if describe is not None:
        resources = describe(sweep.master_config,
                             max((group["members"] for group in groups), default=1))
    rows = []
    for job, estimate in zip(sweep.jobs, estimates, strict=True):
        row = {**job.summary(), "launcher": sweep.launcher, **estimate}
        if resources:
            row["resources"] = resources
        rows.append(row)
    container_totals = required_check("tmgg.launch.cost", "container_totals")
    facts = {"stage": sweep.stage, "launcher": sweep.launcher, "jobs": len(rows),
             "resources": resources, "fused_groups": groups,
             # Tasks the launcher dispatches (containers on Modal, array tasks on SLURM).
             **container_totals(estimates), **supersede_facts(sweep)}
    totals = [r.get("est_cost_usd") for r in rows if r.get("est_cost_usd") is not None]
    if totals:
        facts["est_cost_usd"] = round(sum(totals), 4)
    cpu_totals = [r.get("est_cost_cpu_usd") for r in rows if r.get("est_cost_cpu_usd") is not None]
    if cpu_totals:
        facts["est_cost_cpu_usd"] = round(sum(cpu_totals), 4)
    check_limit(sweep.master_config, estimates)
    return sweep, rows, facts


def fused_groups(sweep: Any) -> list[dict[str, Any]]:
    """The tasks the launcher will dispatch when it fuses (none when it does not)."""
    from tmgg.jobs.fusion import describe_groups, fusion_settings
    from tmgg.launch.cost import launcher_groups

    mode, _ = fusion_settings(sweep.master_config)
    if mode == "off":
        return []
    return describe_groups(sweep.jobs, launcher_groups(sweep.master_config, sweep.jobs))


def supersede_facts(sweep: Any) -> dict[str, Any]:
    """What recording this plan would mark superseded (a stage or group was edited)."""
    from tmgg.jobs.supersede import describe, superseded_records

    found = superseded_records(sweep.jobs, sweep.ledger.states(), sweep.stage)
    return {
        "superseded_finished": sum(1 for s in found if s.old.status == FINISHED),
        "superseded": [{"job_id": s.old.job_id, "run_name": s.old.run_name,
                        "status": s.old.status, "by": s.new.job_id} for s in found],
        "superseded_note": describe(found),
    }


def plan_main(argv: list[str]) -> int:
    parser = _parser("plan", "Compose and validate every job of a sweep; dispatch nothing.")
    args = parser.parse_args(argv)
    from tmgg.cli.adaptive_plan import adaptive_plan_main, is_adaptive_stage
    from tmgg.jobs.plan import PlanError

    if is_adaptive_stage(args.overrides):
        return adaptive_plan_main(args.overrides, args.json)
    try:
        sweep, rows, facts = build_plan_rows(args.overrides)
    except PlanError as error:
        print(f"plan refused: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - Hydra composition errors name the field
        print(f"plan refused: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**facts, "count": len(rows), "jobs": rows}, indent=2, default=str))
        return 0
    from rich.table import Table

    table = Table(title=f"plan: stage {facts['stage']} on {facts['launcher']}")
    for column in ("#", "job id", "run name", "W&B entity/project/group (mode)", "launcher", "GPU",
                   "est. s", "est. USD"):
        table.add_column(column)
    for row in rows:
        wandb = row.get("wandb")
        destination = (f"{wandb['entity']}/{wandb['project']}/{wandb['group']} "
                       f"({wandb['mode']})" if wandb else "(csv, no W&B)")
        cost = row.get("est_cost_usd")
        seconds = row.get("est_gpu_seconds")
        table.add_row(str(row["index"]), row["job_id"], row["run_name"], destination,
                      row["launcher"], str(row.get("gpu") or "-"),
                      "" if seconds is None else f"{seconds:.0f}",
                      "" if cost is None else f"{cost:.4f}")
    console = _console()
    console.print(table)
    if facts.get("superseded_note"):
        console.print(f"[yellow]{facts['superseded_note']}[/yellow]")
    if facts.get("resources"):
        format_resources = _optional("tmgg.launch.slurm_resources", "format_resources")
        text = format_resources(facts["resources"]) if format_resources else facts["resources"]
        console.print(f"resources per job: {text}")
    cost_text = f", estimated cost ${facts['est_cost_usd']:.2f}" if "est_cost_usd" in facts else ""
    if "est_cost_cpu_usd" in facts and facts["launcher"] == "modal":
        cost_text += (f" (on CPU-only containers, hydra.launcher.gpu=null: "
                      f"${facts['est_cost_cpu_usd']:.2f})")
    groups = facts.get("fused_groups") or []
    if groups:
        fused = Table(title="fused groups (hydra.launcher.fuse=auto): one task each")
        for column in ("group", "members", "seed", "batch", "steps", "stacked models"):
            fused.add_column(column)
        for group in groups:
            fused.add_row(str(group["group"]), str(group["members"]), str(group["seed"]),
                          str(group["batch_size"]), str(group["max_steps"]),
                          group["stacked_models"])
        console.print(fused)
    tasks = facts.get("containers")
    if tasks is not None and tasks != len(rows):
        unit = {"modal": "containers"}.get(facts["launcher"], "tasks")
        if facts.get("resources"):
            unit = "array tasks"
        cost_text = (f" in {tasks} {unit} (about {facts['est_container_seconds']:.0f} s of "
                     f"{unit} run time in all){cost_text}")
    console.print(f"{len(rows)} jobs{cost_text}; nothing dispatched; ledger {sweep.ledger.root}",
                  soft_wrap=True)  # a path is never cut in two (it is copied)
    return 0


def _ledger_for(overrides: list[str]) -> Ledger:
    from tmgg.jobs.compose import stage_ledger

    return stage_ledger(overrides)


def status_rows(ledger: Ledger) -> list[dict[str, Any]]:
    rows = []
    for state in ledger.states().values():
        metrics = state.metrics
        rows.append({
            "job_id": state.job_id,
            "run_name": state.run_name or state.record.get("run_name", ""),
            "status": SUPERSEDED if state.superseded_by else state.status,
            "superseded_by": state.superseded_by,
            "duration_s": state.duration_s,
            "test_mse": metrics.get("test/mse"),
            "call_id": state.call_id,
            "claim": state.claim,
            "error": (state.error or "").strip().splitlines()[-1:] or None,
        })
    return rows


def status_main(argv: list[str]) -> int:
    parser = _parser("status", "Show a stage's ledger: every job's state, with counts of "
                     "the stage's current grid and, apart, of every other record.")
    parser.add_argument("--no-poll", action="store_true",
                        help="do not poll detached Modal calls")
    parser.add_argument("--summary", action="store_true",
                        help="only the counts, no table")
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, default=None,
                        metavar="SECONDS",
                        help="redraw every SECONDS (default 5) until Ctrl-C")
    args = parser.parse_args(argv)
    ledger, grid = _ledger_and_grid(args.overrides)
    if not args.no_poll:
        poll = _optional("tmgg.launch.modal.calls", "poll_detached")
        if poll is not None and any(s.call_id for s in ledger.states().values()):
            poll(ledger)
    if args.json:
        print(json.dumps(status_facts(ledger, grid), indent=2, default=str))
        return 0
    console = _console()
    if args.watch is None:
        for part in status_view(ledger, grid, args.summary):
            console.print(part)
        return 0
    import time

    from rich.console import Group
    from rich.live import Live

    def view() -> Any:
        return Group(*status_view(ledger, grid, args.summary),
                     f"[dim]every {args.watch:g} s; Ctrl-C ends[/dim]")

    try:
        if not console.is_terminal:  # piped: each view after the last, as a log
            while True:
                console.print(view())
                sys.stdout.flush()
                time.sleep(args.watch)
        with Live(view(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(view(), refresh=True)
    except KeyboardInterrupt:
        return 0


def _ledger_and_grid(overrides: list[str]) -> tuple[Ledger, dict[str, str] | None]:
    """The stage's ledger and its current grid (job id -> run name), read from plan.json
    when that matches, else composed; None when the grid cannot be composed here."""
    from tmgg.jobs.compose import recorded_or_composed_sweep
    from tmgg.jobs.plan import PlanError
    from tmgg.jobs.workdirs import WorkDirError

    try:
        sweep = recorded_or_composed_sweep(overrides)
    except WorkDirError:
        raise  # the shell is elsewhere: no ledger is the right one to show
    except PlanError:
        return _ledger_for(overrides), None
    return sweep.ledger, {job.job_id: job.run_name for job in sweep.jobs}


def status_facts(ledger: Ledger, grid: dict[str, str] | None) -> dict[str, Any]:
    """What ``status`` says, as data: every record, the grid's counts (MISSING for a grid
    job with no record), and the other records counted apart."""
    rows = status_rows(ledger)
    # Current jobs only: records of an earlier config are listed, counted apart.
    counts = Counter(row["status"] for row in rows if row["status"] != SUPERSEDED)
    facts: dict[str, Any] = {
        "stage": ledger.stage, "ledger": str(ledger.root), "counts": dict(counts),
        "superseded": sum(1 for row in rows if row["status"] == SUPERSEDED),
        "jobs": rows, "damaged_lines": damaged_line_notes(ledger)}
    if grid is not None:
        by_id = {row["job_id"]: row for row in rows}
        grid_counts = Counter(by_id[job_id]["status"] if job_id in by_id else MISSING
                              for job_id in grid)
        facts["grid"] = {"jobs": len(grid), "counts": dict(grid_counts)}
        facts["other_records"] = dict(Counter(
            row["status"] for row in rows
            if row["job_id"] not in grid and row["status"] != SUPERSEDED))
    return facts


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status.lower()}" for status, count in sorted(counts.items()))


def status_view(ledger: Ledger, grid: dict[str, str] | None, summary: bool) -> list[Any]:
    """The table (unless ``summary``) and the count lines, as rich renderables. The
    table fits 80 columns: run names are never cut, the note column wraps."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    facts = status_facts(ledger, grid)
    rows = facts["jobs"]
    parts: list[Any] = []
    if not summary:
        if grid is not None:  # the grid's jobs first (missing ones too), then the rest
            known = {row["job_id"] for row in rows}
            rows = [*(row for row in rows if row["job_id"] in grid),
                    *({"job_id": job_id, "run_name": name, "status": MISSING,
                       "superseded_by": None, "duration_s": None, "test_mse": None,
                       "claim": None, "error": None}
                      for job_id, name in grid.items() if job_id not in known),
                    *(row for row in rows if row["job_id"] not in grid)]
        table = Table(title=f"status: stage {ledger.stage} ({ledger.root})",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        names = [row["run_name"] or row["job_id"] for row in rows]
        table.add_column("run name", no_wrap=True, min_width=max(map(len, names), default=8))
        for column in ("status", "s", "test mse"):
            table.add_column(column, no_wrap=True, justify="left" if column == "status"
                             else "right")
        table.add_column("note", overflow="fold")
        styles = {FINISHED: "green", FAILED: "red", LOST: "red"}
        for name, row in zip(names, rows, strict=True):
            style = styles.get(row["status"], "yellow")
            detail = row["error"][0] if row["error"] else ""
            if row["status"] in (*IN_FLIGHT, LOST, SKIPPED) and row["claim"]:
                detail = row["claim"] if row["status"] != LOST else f"lost: {row['claim']}"
            if row["superseded_by"]:
                detail = f"earlier config; replaced by {row['superseded_by']}"
            elif grid is not None and row["job_id"] not in grid:
                detail = ("not in this grid; " + detail).strip("; ")
            table.add_row(name, Text(row["status"], style=style),
                          "" if row["duration_s"] is None else f"{row['duration_s']:.0f}",
                          "" if row["test_mse"] is None else f"{row['test_mse']:.4f}",
                          detail[:200])
        parts.append(table)
    if grid is not None:
        parts.append(f"stage {ledger.stage}, its grid of {facts['grid']['jobs']} jobs: "
                     f"{_count_text(facts['grid']['counts']) or 'empty'}")
        if facts["other_records"]:
            parts.append(f"other records, not in this grid (other overrides or settings): "
                         f"{_count_text(facts['other_records'])}")
    else:
        parts.append(_count_text(facts["counts"]) or "no jobs recorded")
    for note in facts["damaged_lines"]:
        parts.append(Text(note["text"], style="red"))
    lost = facts["counts"].get(LOST)
    if lost:
        parts.append(f"{lost} job(s) LOST: their process died without recording an "
                     "outcome. `tmgg-sweep resume` runs them again (from their last "
                     "checkpoint, into the same W&B run).")
    if facts["superseded"]:
        parts.append(f"{facts['superseded']} superseded records of earlier configs "
                     "(not counted)")
    return parts


def damaged_line_notes(ledger: Ledger) -> list[dict[str, Any]]:
    """Damaged ledger lines (a write cut short, a line of the wrong shape) by number,
    then every other damaged file of the stage (job records, claims, plan.json)."""
    notes = [{"file": str(ledger.events_path), "line": number, "excerpt": excerpt,
              "text": f"{ledger.events_path} line {number} is damaged (a write cut short, "
                      f"or not a ledger event) and was skipped; every other line was "
                      f"read: {excerpt!r}"}
             for number, excerpt in ledger.damaged_lines()]
    for damaged in ledger.damaged_files():
        if damaged.path == ledger.events_path:
            continue  # listed above with its text
        notes.append({"file": str(damaged.path), "line": damaged.line, "excerpt": "",
                      "text": f"{damaged} (skipped; a damaged claim counts as held until "
                              f"its lease has run out)"})
    return notes


# What `resume` runs: never a finished job, never one in flight under a live claim.
RESUMABLE = frozenset({MISSING, PLANNED, FAILED, LOST, CANCELLED})


def resume_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep resume",
        description="Launch only the missing, failed and lost jobs of a sweep (finished "
                    "jobs, and jobs in flight under a live claim, are skipped by every "
                    "launcher).")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    args = parser.parse_args(argv)
    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(args.overrides)
    poll = _optional("tmgg.launch.modal.calls", "poll_detached")
    if poll is not None and any(s.call_id for s in sweep.ledger.states().values()):
        poll(sweep.ledger)  # ended detached calls count as finished or failed, not in flight
    states = sweep.ledger.states()

    def status_of(job: Any) -> str:
        return states[job.job_id].status if job.job_id in states else MISSING

    todo = [job for job in sweep.jobs if status_of(job) in RESUMABLE]
    # SKIPPED: left to another dispatch whose claim still lives (dead ones are LOST)
    in_flight = [job for job in sweep.jobs if status_of(job) in (*IN_FLIGHT, SKIPPED)]
    finished = len(sweep.jobs) - len(todo) - len(in_flight)
    by_status = Counter(status_of(job) for job in todo)
    print(f"stage {sweep.stage}: {len(sweep.jobs)} jobs, {finished} finished, "
          f"{len(in_flight)} in flight elsewhere, {len(todo)} to run ({by_status[FAILED]} "
          f"failed, {by_status[LOST]} lost, {by_status[CANCELLED]} cancelled, "
          f"{by_status[MISSING] + by_status[PLANNED]} missing)")
    for job in todo:
        print(f"  {job.run_name} ({job.job_id}, {status_of(job).lower()})")
    for job in in_flight:
        print(f"  not run: {job.run_name} ({job.job_id}) {states[job.job_id].claim or ''}")
    from tmgg.jobs.search_space import is_adaptive

    adaptive = is_adaptive(sweep.master_config)
    if adaptive:
        # Its trials so far are listed above; the study itself continues toward n_trials
        # (re-running LOST and FAILED trials, never a finished or PRUNED one).
        print(f"stage {sweep.stage} is adaptive: the study continues with its own command")
    if args.dry_run or not (todo or adaptive):
        return 0
    command = [sys.executable, "-m", "tmgg.cli.app", "-m", *args.overrides]
    return subprocess.call(command)
