"""What the local launcher's terminal shows: one live line of totals and one line per
job as it ends, then a count. The jobs' own output (wandb, Lightning) is in each job's
``console.log`` (``tmgg.launch.worker_console``), so a 108-job stage prints about 110
lines, not thousands.

The live line: jobs finished, running and failed, training steps done across every
job (fused members each count), elapsed time and an ETA from the step rate. On a
terminal it redraws in place; piped, only the per-job lines and the count are written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from tmgg.launch.worker_console import CONSOLE_LOG


def job_log_path(job: Any) -> Path | None:
    """Where a planned job's terminal output goes: ``<its output dir>/console.log``."""
    from omegaconf import OmegaConf

    if not getattr(job, "is_tmgg_job", False) or job.sweep_config is None:
        return None
    try:
        parts = [OmegaConf.select(job.sweep_config, key)
                 for key in ("hydra.sweep.dir", "hydra.sweep.subdir")]
    except Exception:  # noqa: BLE001 - unresolvable here: the output stays on the terminal
        return None
    if any(part is None for part in parts):
        return None
    return Path(*map(str, parts)).absolute() / CONSOLE_LOG


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class SweepConsole:
    """The launcher's display for one sweep; ``enabled=False`` shows nothing."""

    def __init__(self, jobs: Sequence[Any], pending: Sequence[int], steps: Any,
                 enabled: bool = True) -> None:
        self.jobs = jobs
        self.enabled = enabled
        self.steps = steps  # the workers' shared step counter, or None
        self.already = len(jobs) - len(pending)
        self.expected_steps = sum(_max_steps(jobs[p]) for p in pending)
        self.running: set[int] = set()
        self.finished = 0
        self.failed = 0
        self.claimed = 0
        self.started = time.monotonic()
        self._live: Any = None
        self.console: Any = None

    def __enter__(self) -> SweepConsole:
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.enabled and self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self, console=self.console, refresh_per_second=2,
                              transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def steps_done(self) -> int:
        return 0 if self.steps is None else int(self.steps.value)

    def totals(self) -> str:
        done = self.steps_done()
        elapsed = time.monotonic() - self.started
        line = (f"jobs {self.finished + self.already}/{len(self.jobs)} finished, "
                f"{len(self.running)} running, {self.failed} failed")
        if self.expected_steps:
            line += f" · steps {done}/{self.expected_steps}"
        line += f" · {_clock(elapsed)}"
        if 0 < done < self.expected_steps:
            line += f" · ETA {_clock(elapsed * (self.expected_steps - done) / done)}"
        return line

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.totals(), style="bold")

    def started_task(self, positions: Sequence[int]) -> None:
        self.running.update(positions)

    def ended(self, position: int, result: Any) -> None:
        """One line for a job that ended (finished, failed, or left to another sweep)."""
        self.running.discard(position)
        job = self.jobs[position]
        claimed_by = getattr(result, "claimed_by", None)
        duration = getattr(result, "duration_s", None)
        took = "" if duration is None else f"  {duration:.1f} s"
        if claimed_by:
            self.claimed += 1
            status, style, detail = "SKIPPED (claimed)", "yellow", str(claimed_by)
        elif result.status.name == "COMPLETED":
            if getattr(result, "skipped", False):
                self.already += 1
                return
            self.finished += 1
            status, style, detail = "FINISHED", "green", _metric(result._return_value) + took
            pruned_at = _pruned_at(result._return_value)
            if pruned_at is not None:  # an adaptive stage's trial its pruner stopped
                status, style = "PRUNED", "yellow"
                detail = f"at step {pruned_at}  {detail}"
        else:
            self.failed += 1
            log = job_log_path(job)
            status, style = "FAILED", "red"
            detail = _error_line(result._return_value) + (f"  (log: {log})" if log else "")
        if not self.enabled:
            return
        from rich.text import Text

        line = Text(f"{status:<8} ", style=style)
        line.append(f"{job.run_name}  {detail}")
        self.console.print(line, soft_wrap=True, highlight=False)

    def interrupted_line(self, stage: str, arguments: Sequence[str]) -> str:
        finished = self.finished + self.already
        rest = " ".join(a for a in arguments if not a.startswith("stage="))
        command = f"tmgg-sweep resume stage={stage}" + (f" {rest}" if rest else "")
        return (f"interrupted: {finished} finished, {len(self.jobs) - finished} not "
                f"finished → {command}")


def _max_steps(job: Any) -> int:
    try:
        return int(job.task_config["trainer"]["max_steps"])
    except (KeyError, TypeError, ValueError):
        return 0


def _metric(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("test/mse", "test/loss"):
            if key in value:
                return f"{key}={float(value[key]):.4f}"
    return ""


def _error_line(error: Any) -> str:
    error_type = getattr(error, "error_type", type(error).__name__)
    message = str(getattr(error, "message", error)).strip()
    return f"{error_type}: {message.splitlines()[0] if message else ''}"[:200]


def _pruned_at(value: Any) -> int | None:
    """The step a pruned trial's job stopped at (tmgg.jobs.trials), else None."""
    return value.get("pruned_at_step") if isinstance(value, dict) else None
