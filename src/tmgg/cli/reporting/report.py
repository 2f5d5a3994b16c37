"""``tmgg-sweep report``: a stage's results as ``experiments/<stage>/REPORT.md`` plus plots.

The expected jobs are the stage's grid composed by Hydra (or read back from its
plan.json when that is safe: ``compose.recorded_or_composed_sweep``), or,
from the records alone, every job the ledger ever planned. Each expected job is
folded with its ledger state; finished jobs are grouped by every swept key except
the seed (model, lr, weight decay, k, plus any other key the grid varies, such as
``data`` in stage 2) and summarised as the mean over seeds with its 95 % t confidence
interval (``precision``: rounded to what the interval supports) beside the reference
scores of SPEC.md §6.

REPORT.md is a pure function of the records: rows and columns in a fixed order,
floats in fixed formats, no generation timestamp. Regenerating it from the
committed ledger gives the same bytes, so a diff shows only what the runs changed.
Matplotlib is imported only while plotting (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tmgg.cli.reporting.fields import (
    BASE_KEYS,
    F1,
    LABELS,
    LR,
    MODEL,
    MSE,
    NO_EDGES,
    NOISY_INPUT,
    NONE_TEXT,
    SEED_KEY,
    SUBSPACE,
    WD,
    K,
    as_number,
    format_value,
    hashable,
    sort_key,
)
from tmgg.cli.reporting.plots import write_plots
from tmgg.cli.reporting.precision import Interval, interval, paired_difference
from tmgg.config.identity import NON_IDENTITY_KEYS
from tmgg.jobs.ledger import (
    CANCELLED,
    DISPATCHED,
    FAILED,
    FINISHED,
    PLANNED,
    PRUNED,
    RUNNING,
    JobState,
    Ledger,
)
from tmgg.jobs.supersede import superseded_ids

REPORT_FILE = "REPORT.md"
NOTES_FILE = "NOTES.md"

# Report categories, in the order the outcome table lists them.
CATEGORIES = ("finished", "failed", "running", "cancelled", "missing")
_CATEGORY_OF = {FINISHED: "finished", FAILED: "failed", RUNNING: "running",
                DISPATCHED: "running", CANCELLED: "cancelled", PRUNED: "pruned"}
# An adaptive stage's trials its pruner stopped: listed only where there are some.
PRUNED_CATEGORY = "pruned"


def shown_categories(counts: dict[str, int]) -> tuple[str, ...]:
    return (*CATEGORIES, PRUNED_CATEGORY) if counts.get(PRUNED_CATEGORY) else CATEGORIES
WARNING = "⚠"


# --------------------------------------------------------------------------------------
# The model of a report: expected jobs, their states, rows of configurations
# --------------------------------------------------------------------------------------
@dataclass
class JobEntry:
    """One expected job and what the ledger knows of it."""

    job_id: str
    run_name: str
    status: str | None  # the ledger's status; None when the ledger never heard of it
    overrides: list[str]
    config: dict[str, Any] | None  # what the job ran: its record's config, else the plan's
    record: dict[str, Any] = field(default_factory=dict)
    superseded_by: str | None = None

    @property
    def category(self) -> str:
        return _CATEGORY_OF.get(self.status or "", "missing")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}

    @property
    def has_metrics(self) -> bool:
        return self.category == "finished" and as_number(self.metrics.get(MSE)) is not None

    @property
    def seed(self) -> Any:
        return select(self.config, SEED_KEY)

    @property
    def ledger_state(self) -> str:
        """Why a job is not finished, in words (for the missing and running lists)."""
        if self.status is None:
            return "not in the ledger"
        if self.status == PLANNED:
            return "planned, never dispatched"
        if self.status == DISPATCHED:
            return "dispatched, not started"
        if self.status == RUNNING:
            started = self.record.get("started_at")
            return f"running since {_utc(started)}" if started else "running"
        if self.status == FINISHED and not self.has_metrics:
            return "finished, but its record has no test metrics"
        return self.status.lower()


@dataclass
class Row:
    """One configuration (every swept key but the seed) and its jobs."""

    key: tuple[Any, ...]  # values of StageReport.group_keys, in that order
    jobs: list[JobEntry]
    keys: tuple[str, ...] = BASE_KEYS

    def value(self, path: str) -> Any:
        return self.key[self.keys.index(path)]

    @property
    def finished(self) -> list[JobEntry]:
        done = [job for job in self.jobs if job.has_metrics]
        return sorted(done, key=lambda job: (sort_key(job.seed), job.job_id))

    def values(self, metric: str) -> list[float]:
        found = (as_number(job.metrics.get(metric)) for job in self.finished)
        return [value for value in found if value is not None]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    def paired(self, minuend: str, subtrahend: str) -> Interval | None:
        """``minuend - subtrahend`` per finished job (the same seed's test set), with its
        interval: how far a row is from its own reference."""
        pairs = [(as_number(job.metrics.get(minuend)), as_number(job.metrics.get(subtrahend)))
                 for job in self.finished]
        complete = [(a, b) for a, b in pairs if a is not None and b is not None]
        return paired_difference([a for a, _ in complete], [b for _, b in complete])

    def count(self, category: str) -> int:
        return sum(1 for job in self.jobs if job.category == category)

    @property
    def learned_nothing(self) -> bool:
        """Mean test mse not below the "no edges" reference of the same seeds."""
        mse, no_edges = self.mean(MSE), self.mean(f"{NO_EDGES}/mse")
        return mse is not None and no_edges is not None and mse >= no_edges


@dataclass
class StageReport:
    """Everything REPORT.md says, computed from the expected jobs and the ledger."""

    stage: str
    jobs: list[JobEntry]
    outside_grid: list[JobEntry]
    notes: str | None = None
    superseded: list[JobEntry] = field(default_factory=list)  # earlier configs' records

    def __post_init__(self) -> None:
        self.extra_keys = swept_keys(self.jobs)
        # Model, then other swept keys (data ...), then lr, wd, k: the row order.
        self.group_keys = (MODEL, *self.extra_keys, LR, WD, K)
        groups: dict[tuple[Any, ...], list[JobEntry]] = {}
        self.unplaced: list[JobEntry] = []
        for job in self.jobs:
            if job.config is None:
                self.unplaced.append(job)
                continue
            key = tuple(hashable(select(job.config, path)) for path in self.group_keys)
            groups.setdefault(key, []).append(job)
        self.rows = [Row(key, groups[key], self.group_keys) for key in
                     sorted(groups, key=lambda k: tuple(sort_key(v) for v in k))]

    # -- facts -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((*CATEGORIES, PRUNED_CATEGORY), 0)
        for job in self.jobs:
            counts[job.category] += 1
        return counts

    def by_category(self, category: str) -> list[JobEntry]:
        return sorted((job for job in self.jobs if job.category == category),
                      key=lambda job: (job.run_name, job.job_id))

    def compute_seconds(self) -> tuple[float, int]:
        durations = [d for d in (as_number(job.record.get("duration_s")) for job in self.jobs)
                     if d is not None]
        return math.fsum(durations), len(durations)

    def wall_clock(self) -> tuple[datetime, datetime] | None:
        starts = [_parse_time(job.record.get("started_at")) for job in self.jobs]
        ends = [_parse_time(job.record.get("finished_at")) for job in self.jobs]
        starts = [s for s in starts if s is not None]
        ends = [e for e in ends if e is not None]
        if not starts or not ends:
            return None
        return min(starts), max(ends)

    def panels(self) -> dict[tuple[Any, ...], list[Row]]:
        """Rows by (model, other swept keys): one panel of each plot."""
        panels: dict[tuple[Any, ...], list[Row]] = {}
        for row in self.rows:
            panels.setdefault(self.panel_key(row), []).append(row)
        return panels

    def panel_key(self, row: Row) -> tuple[Any, ...]:
        return (row.value(MODEL), *(row.value(key) for key in self.extra_keys))

    def best_rows(self) -> list[Row]:
        """Lowest mean test mse per model (and per value of any other swept key)."""
        best = []
        for rows in self.panels().values():
            scored = [row for row in rows if row.mean(MSE) is not None]
            if scored:
                best.append(min(scored, key=lambda row: row.mean(MSE)))  # first wins ties
        return best

    # -- markdown ----------------------------------------------------------------------
    def markdown(self, plots: Sequence[tuple[str, str, str]] = ()) -> str:
        """REPORT.md; ``plots`` are (file name, title, caption) of the written PNGs."""
        out: list[str] = [f"# Stage `{self.stage}`: results", ""]
        out += [
            "Written by `tmgg-sweep report` from this folder's records (`ledger.jsonl`, "
            "`plan.json`, `jobs/*.json`); it is a pure function of them, so regenerating "
            "gives the same file. Regenerate with "
            f"`tmgg-sweep report stage={self.stage}` (plus any identity overrides the "
            "sweep ran with, e.g. `logger=csv`), or from the records alone with "
            f"`tmgg-sweep report --ledger experiments/{self.stage}`.",
            "",
        ]
        out += self._outcome_section()
        out += self._results_section()
        out += self._best_section()
        out += self._noise_level_section()
        out += self._reference_section()
        out += self._plots_section(plots)
        out += self._job_lists()
        out += ["## Discussion", ""]
        if self.notes is not None and self.notes.strip():
            out.append(self.notes.rstrip("\n"))
        else:
            out.append(f"_No discussion yet: write `{NOTES_FILE}` in this folder and "
                       "regenerate; its text appears here verbatim._")
        return "\n".join(out) + "\n"

    def _outcome_section(self) -> list[str]:
        counts = self.counts()
        lines = ["## Outcome", "", "| outcome | jobs |", "|---|---:|"]
        lines += [f"| {category} | {counts[category]} |"
                  for category in shown_categories(counts)]
        lines += [f"| **expected** | **{len(self.jobs)}** |", ""]
        total, with_duration = self.compute_seconds()
        raw = f" ({total:.1f} s)" if total >= 60 else ""
        lines.append(f"- Total compute time (sum of job durations): {_duration(total)}{raw} "
                     f"over {with_duration} jobs"
                     + (f", {_duration(total / with_duration)} a job on average."
                        if with_duration else "."))
        span = self.wall_clock()
        if span is None:
            lines.append("- Wall-clock span: no job has both started and finished yet.")
        else:
            first, last = span
            lines.append(f"- Wall-clock span (first start to last finish): "
                         f"{_format_time(first)} to {_format_time(last)} "
                         f"({_duration((last - first).total_seconds())}).")
        code = self._code_versions()
        if code:
            lines.append(f"- Code: {code}.")
        lines.append("")
        return lines

    def _code_versions(self) -> str:
        commits: dict[str, int] = {}
        dirty = 0
        for job in self.jobs:
            version = job.record.get("code") or {}
            if version.get("git_commit"):
                commits[str(version["git_commit"])[:12]] = (
                    commits.get(str(version["git_commit"])[:12], 0) + 1)
                dirty += bool(version.get("git_dirty"))
        if not commits:
            return ""
        text = ", ".join(f"git `{commit}` ({count} jobs)" for commit, count in
                         sorted(commits.items(), key=lambda item: (-item[1], item[0])))
        return text + (f"; {dirty} of them ran with local changes" if dirty else "")

    def _config_headers(self, with_model: bool) -> list[str]:
        keys = self.group_keys if with_model else self.group_keys[1:]
        return [LABELS.get(key, key) for key in keys]

    def _config_cells(self, row: Row, with_model: bool) -> list[str]:
        values = row.key if with_model else row.key[1:]
        cells = [format_value(value) for value in values]
        if with_model:
            cells[0] = f"`{cells[0]}`"
        return cells

    def _results_section(self) -> list[str]:
        lines = [
            "## Results",
            "",
            "Mean over the finished seeds of the test metrics (each averaged over the "
            "noise levels) ± the half-width of its 95 % Student-t confidence interval, "
            "with the number of seeds *n*; mean and half-width are rounded to the "
            "half-width's second significant digit (a single seed has no interval and "
            "shows four decimals). Beside them the two reference scores of SPEC.md §6 "
            "averaged over the same seeds: \"no edges\" predicts the empty graph, "
            "\"noisy input\" returns the corrupted graph. *seeds* = finished / expected. "
            f"{WARNING} marks a row whose mean test mse does not beat \"no edges\": "
            "that configuration learned nothing.",
            "",
        ]
        if not self.rows:
            return [*lines, "No expected job has a known configuration yet.", ""]
        headers = [*self._config_headers(with_model=False), "seeds", "test mse", "test f1",
                   "subspace distance", "no edges mse", "noisy input mse", "notes"]
        align = ["---:"] * (len(headers) - 7) + [":---:", "---", "---", "---", "---:",
                                                 "---:", "---"]
        for model, rows in _by_model(self.rows).items():
            lines += [f"### `{format_value(model)}`", "", _md_row(headers),
                      "|" + "|".join(align) + "|"]
            for row in rows:
                lines.append(_md_row([
                    *self._config_cells(row, with_model=False),
                    f"{len(row.finished)}/{len(row.jobs)}",
                    _mean_std(row, MSE), _mean_std(row, F1), _mean_std(row, SUBSPACE),
                    _fixed(row.mean(f"{NO_EDGES}/mse")),
                    _fixed(row.mean(f"{NOISY_INPUT}/mse")),
                    _row_notes(row),
                ]))
            lines.append("")
        return lines

    def _best_section(self) -> list[str]:
        lines = ["## Best configuration per model", "",
                 "Lowest mean test mse of each model"
                 + (" and " + ", ".join(LABELS.get(k, k) for k in self.extra_keys)
                    if self.extra_keys else "") + ". *vs no edges*: \"no edges\" mse "
                 "minus the model's test mse, per seed on that seed's test set, as mean ± "
                 "95 % interval; it beats \"no edges\" where the whole interval is above 0.",
                 ""]
        best = self.best_rows()
        if not best:
            return [*lines, "No finished job with test metrics yet.", ""]
        headers = [*self._config_headers(with_model=True), "seeds", "test mse", "test f1",
                   "subspace distance", "vs no edges"]
        lines += [_md_row(headers), "|" + "|".join(["---"] * len(headers)) + "|"]
        for row in best:
            verdict = beats_text(row.paired(f"{NO_EDGES}/mse", MSE))
            lines.append(_md_row([
                *self._config_cells(row, with_model=True),
                f"{len(row.finished)}/{len(row.jobs)}",
                _mean_std(row, MSE), _mean_std(row, F1), _mean_std(row, SUBSPACE), verdict,
            ]))
        return [*lines, ""]

    def _noise_level_section(self) -> list[str]:
        """The best rows per noise level beside "noisy input" at that level: a model may
        beat the noisy input at one ε and not at another (issue 24)."""
        best = [row for row in self.best_rows() if row.finished]
        levels = sorted({name[len("test_eps"):-len("/mse")] for row in best
                         for job in row.finished for name in job.metrics
                         if name.startswith("test_eps") and name.endswith("/mse")
                         and "_reference_" not in name}, key=float)
        lines = ["## Best configurations per noise level", "",
                 "Test mse of each best configuration at each noise level ε (mean ± 95 % "
                 "interval over seeds) beside \"noisy input\" at the same ε; *vs noisy "
                 "input* is noisy input's mse minus the model's, per seed, as in *vs no "
                 "edges* above.", ""]
        if not best or not levels:
            return [*lines, "No finished job with per-level test metrics yet.", ""]
        with_reference = any(f"test_eps{levels[0]}_{NOISY_INPUT[len('test_'):]}/mse"
                             in job.metrics for row in best for job in row.finished)
        if not with_reference:
            return [*lines, "These records were made before the per-level \"noisy input\" "
                    "reference was logged (issue 24); re-running the stage adds it.", ""]
        headers = [*self._config_headers(with_model=True), "ε", "test mse",
                   "noisy input mse", "vs noisy input"]
        lines += [_md_row(headers), "|" + "|".join(["---"] * len(headers)) + "|"]
        for row in best:
            for level in levels:
                metric = f"test_eps{level}/mse"
                reference = f"test_eps{level}_{NOISY_INPUT[len('test_'):]}/mse"
                found = interval(row.values(metric))
                lines.append(_md_row([
                    *self._config_cells(row, with_model=True), level,
                    NONE_TEXT if found is None else found.text(),
                    _fixed(row.mean(reference)),
                    beats_text(row.paired(reference, metric))]))
        return [*lines, ""]

    def _reference_section(self) -> list[str]:
        """The references depend on the test set (seed, data), not on the model."""
        groups: dict[tuple[Any, ...], list[JobEntry]] = {}
        for row in self.rows:
            for job in row.finished:
                extras = self.panel_key(row)[1:]
                groups.setdefault((hashable(job.seed), *extras), []).append(job)
        lines = ["## Reference scores per seed", "",
                 "The two trivial predictions of SPEC.md §6 on each seed's test set (they do "
                 "not depend on the model), averaged over that seed's finished jobs.", ""]
        if not groups:
            return [*lines, "No finished job with test metrics yet.", ""]
        headers = ["seed", *[LABELS.get(k, k) for k in self.extra_keys], "jobs",
                   "no edges mse", "no edges f1", "no edges subspace distance",
                   "noisy input mse", "noisy input f1", "noisy input subspace distance"]
        lines += [_md_row(headers), "|" + "|".join(["---:"] * len(headers)) + "|"]
        for key in sorted(groups, key=lambda k: tuple(sort_key(v) for v in k)):
            jobs = groups[key]
            cells = [format_value(value) for value in key] + [str(len(jobs))]
            for prefix in (NO_EDGES, NOISY_INPUT):
                for metric in ("mse", "f1", "subspace_distance"):
                    values = [v for v in (as_number(j.metrics.get(f"{prefix}/{metric}"))
                                          for j in jobs) if v is not None]
                    cells.append(_fixed(statistics.fmean(values) if values else None))
            lines.append(_md_row(cells))
        return [*lines, ""]

    def _plots_section(self, plots: Sequence[tuple[str, str, str]]) -> list[str]:
        lines = ["## Plots", ""]
        if not plots:
            return [*lines, "No finished job with test metrics yet: no plots.", ""]
        for name, title, caption in plots:
            lines += [f"![{title}]({name})", "", caption, ""]
        return lines

    def _job_lists(self) -> list[str]:
        lines: list[str] = []
        failed = self.by_category("failed")
        lines += [f"## Failed jobs ({len(failed)})", ""]
        if failed:
            lines += ["| run name | job id | attempts | error |", "|---|---|---:|---|"]
            lines += [_md_row([f"`{job.run_name}`", f"`{job.job_id}`",
                               str(job.record.get("attempts", NONE_TEXT)),
                               _code_cell(error_line(job.record.get("error")))])
                      for job in failed]
        else:
            lines.append("None.")
        lines.append("")
        missing = self.by_category("missing")
        lines += [f"## Missing jobs ({len(missing)})", ""]
        if missing:
            lines += ["Expected by the stage's grid, never finished nor failed.", "",
                      "| run name | job id | ledger |", "|---|---|---|"]
            lines += [_md_row([f"`{job.run_name}`", f"`{job.job_id}`", job.ledger_state])
                      for job in missing]
        else:
            lines.append("None.")
        lines.append("")
        for title, jobs in (
            ("Running or dispatched jobs", self.by_category("running")),
            ("Cancelled jobs", self.by_category("cancelled")),
            ("Finished jobs without test metrics",
             [job for job in self.by_category("finished") if not job.has_metrics]),
            ("Jobs without a known configuration (not in the table)",
             sorted(self.unplaced, key=lambda job: (job.run_name, job.job_id))),
            ("Ledger jobs outside this grid (not in the table)",
             sorted(self.outside_grid, key=lambda job: (job.run_name, job.job_id))),
        ):
            if not jobs:
                continue
            lines += [f"## {title} ({len(jobs)})", "", "| run name | job id | ledger |",
                      "|---|---|---|"]
            lines += [_md_row([f"`{job.run_name}`", f"`{job.job_id}`", job.ledger_state])
                      for job in jobs]
            lines.append("")
        if self.superseded:
            lines += [f"## Superseded records of earlier configs (not in the table) "
                      f"({len(self.superseded)})", "",
                      "Their grid point now composes to another config; the job that "
                      "replaces each one runs under a new job id.", "",
                      "| run name | job id | ledger | replaced by |", "|---|---|---|---|"]
            lines += [_md_row([f"`{job.run_name}`", f"`{job.job_id}`", job.ledger_state,
                               f"`{job.superseded_by}`"])
                      for job in sorted(self.superseded, key=lambda j: (j.run_name, j.job_id))]
            lines.append("")
        return lines


# --------------------------------------------------------------------------------------
# Building a report from a composed sweep or from the ledger alone
# --------------------------------------------------------------------------------------
def select(config: dict[str, Any] | None, path: str) -> Any:
    """``a.b.c`` of a plain nested dict, None where absent."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def swept_keys(jobs: Iterable[JobEntry]) -> list[str]:
    """Config paths of swept override keys, beyond the base keys and the seed.

    An override key counts when the jobs' configs hold at least two values for it; a
    config-group override (``data=er``) is reported by the group's ``name``.
    """
    jobs = [job for job in jobs if job.config is not None]
    candidates: set[str] = set()
    for job in jobs:
        for override in job.overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            if not key or key.startswith("hydra") or key in NON_IDENTITY_KEYS:
                continue
            value = select(job.config, key)
            candidates.add(f"{key}.name" if isinstance(value, dict) and "name" in value
                           else key)
    candidates -= {*BASE_KEYS, SEED_KEY, "model", "optimizer"}
    swept = []
    for path in sorted(candidates):
        values = {hashable(select(job.config, path)) for job in jobs}
        if len(values) > 1:
            swept.append(path)
    return swept


def _plan_configs(ledger: Ledger) -> dict[str, dict[str, Any]]:
    plan = ledger.plan() or {}
    return {str(job["job_id"]): job["config"] for job in plan.get("jobs", [])
            if isinstance(job, dict) and job.get("job_id") and isinstance(job.get("config"),
                                                                          dict)}


def _entry_from_state(state: JobState, config: dict[str, Any] | None,
                      superseded_by: str | None = None) -> JobEntry:
    return JobEntry(job_id=state.job_id,
                    run_name=state.run_name or str(state.record.get("run_name", "")),
                    status=state.status, overrides=list(state.overrides),
                    config=config, record=dict(state.record),
                    superseded_by=superseded_by or state.superseded_by)


def _read_notes(ledger: Ledger) -> str | None:
    path = ledger.root / NOTES_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def build_report(source: Any) -> StageReport:
    """A report from a ``ComposedSweep`` (its grid), a ``Ledger``, or a stage folder.

    With a composed sweep the expected jobs are the grid; jobs of the ledger outside
    it are listed apart. With a ledger alone they are every job it ever planned or
    recorded, configured from the job's own record or else from ``plan.json``.
    Either way a result is labelled with the config its job ran (the record's), and
    records of an earlier config (superseded) are listed apart, never counted.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        source = Ledger(path.parent, path.name)
    if isinstance(source, Ledger):
        ledger = source
        states = ledger.states()
        plan_configs = _plan_configs(ledger)
        entries = [_entry_from_state(state, state.record.get("config")
                                     or plan_configs.get(state.job_id))
                   for state in states.values()]
        return StageReport(stage=ledger.stage,
                           jobs=[entry for entry in entries if not entry.superseded_by],
                           outside_grid=[], notes=_read_notes(ledger),
                           superseded=[entry for entry in entries if entry.superseded_by])
    ledger = source.ledger
    states = ledger.states()
    jobs = []
    grid_ids = set()
    for planned in source.jobs:
        if not getattr(planned, "is_tmgg_job", True):
            continue
        grid_ids.add(planned.job_id)
        state = states.get(planned.job_id)
        record = dict(state.record) if state else {}
        jobs.append(JobEntry(job_id=planned.job_id, run_name=planned.run_name,
                             status=state.status if state else None,
                             overrides=list(planned.overrides),
                             config=record.get("config") or dict(planned.task_config),
                             record=record))
    replaced_by = superseded_ids(source.jobs, states, ledger.stage)
    others = [_entry_from_state(state, state.record.get("config"), replaced_by.get(job_id))
              for job_id, state in states.items() if job_id not in grid_ids]
    return StageReport(stage=ledger.stage, jobs=jobs,
                       outside_grid=[job for job in others if not job.superseded_by],
                       notes=_read_notes(ledger),
                       superseded=[job for job in others if job.superseded_by])


def write_report(source: Any, out_dir: str | Path | None = None) -> Path:
    """Write REPORT.md and its plots (default: into the stage's ledger folder)."""
    report = source if isinstance(source, StageReport) else build_report(source)
    if out_dir is None:
        if isinstance(source, StageReport):
            raise ValueError("out_dir is needed when writing a prebuilt StageReport")
        ledger = source.ledger if hasattr(source, "ledger") else (
            source if isinstance(source, Ledger) else None)
        out_dir = ledger.root if ledger is not None else Path(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out)
    path = out / REPORT_FILE
    _atomic_write_text(path, report.markdown(plots))
    return path


# --------------------------------------------------------------------------------------
# Formatting helpers (fixed formats: the report must not change unless the records do)
# --------------------------------------------------------------------------------------
def _fixed(value: float | None) -> str:
    return NONE_TEXT if value is None else f"{value:.4f}"


def _mean_std(row: Row, metric: str) -> str:
    """The row's mean with its 95 % interval and n, rounded to what the interval supports."""
    found = interval(row.values(metric))
    return NONE_TEXT if found is None else found.text()


def beats_text(margin: Interval | None) -> str:
    """A reference minus a model's score (lower is better), as a verdict: beaten where the
    whole interval is above 0, not beaten where it is below, else not resolved."""
    if margin is None:
        return NONE_TEXT
    if margin.half_width is None:
        verdict = "beats it" if margin.mean > 0 else f"{WARNING} does not beat it"
        return f"{verdict} (one seed: {margin.text(signed=True)})"
    if margin.mean - margin.half_width > 0:
        return f"beats it by {margin.text()}"
    if margin.mean + margin.half_width < 0:
        return f"{WARNING} does not beat it ({margin.text(signed=True)})"
    return f"not resolved ({margin.text(signed=True)})"


def _row_notes(row: Row) -> str:
    notes = []
    if row.learned_nothing:
        notes.append(f"{WARNING} not below no edges")
    for category in ("failed", "running", "cancelled", "missing"):
        count = row.count(category)
        if count:
            notes.append(f"{count} {category}")
    without = sum(1 for job in row.jobs if job.category == "finished" and not job.has_metrics)
    if without:
        notes.append(f"{without} finished without metrics")
    return "; ".join(notes)


def _by_model(rows: Sequence[Row]) -> dict[Any, list[Row]]:
    grouped: dict[Any, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row.value(MODEL), []).append(row)
    return grouped


def _cell(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _code_cell(text: str) -> str:
    """Error text as code: underscores and asterisks in it must not turn into emphasis."""
    text = _cell(text).replace("`", "'")
    return f"`{text}`" if text else ""


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def error_line(text: Any) -> str:
    """The line that says what went wrong: a traceback's exception line, else the first."""
    if not text:
        return ""
    lines = [line.rstrip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback (most recent call last)"):
        # The exception line is the first unindented line after the last frame (a
        # multi-line message continues below it; a chained exception's is the last).
        frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
        after = frames[-1] + 1 if frames else 1
        stated = [line for line in lines[after:] if not line[0].isspace()]
        if stated:
            return stated[0]
    return lines[0]


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc(value: Any) -> str:
    moment = _parse_time(value)
    return _format_time(moment) if moment else str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s"


def _atomic_write_text(path: Path, text: str) -> None:
    """Readers (and a concurrent regeneration) see a whole report, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep report",
        description="Write experiments/<stage>/REPORT.md and PNG plots: results per "
                    "configuration (mean ± 95 % t interval over seeds) beside the reference "
                    "scores, the best configuration per model, outcome counts, failed and missing "
                    "jobs. The expected jobs are the stage's grid, composed from the same "
                    "overrides as `tmgg-train -m`.")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides as for `tmgg-train -m`, e.g. stage=stage1")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for REPORT.md and the plots (default: the stage's "
                             "ledger folder, experiments/<stage>/)")
    parser.add_argument("--ledger", type=Path, default=None, metavar="DIR",
                        help="report a stage folder (experiments/<stage>) from its records "
                             "alone; composes no config")
    parser.add_argument("--ledger-only", action="store_true",
                        help="take the expected jobs from the ledger's plan instead of "
                             "composing the stage's grid")
    return parser


def _source(args: argparse.Namespace) -> Any:
    """The composed grid, or the ledger when asked or when composition fails."""
    if args.ledger is not None:
        root = args.ledger.resolve()
        if not (root / "ledger.jsonl").exists() and not (root / "jobs").is_dir():
            raise FileNotFoundError(f"no ledger under {root}")
        return Ledger(root.parent, root.name)
    from tmgg.jobs.compose import stage_ledger

    if args.ledger_only:
        return stage_ledger(args.overrides)
    try:
        from tmgg.jobs.compose import recorded_or_composed_sweep

        return recorded_or_composed_sweep(args.overrides)
    except Exception as error:  # noqa: BLE001 - fall back to the records, say why
        print(f"tmgg-sweep report: cannot compose the grid ({type(error).__name__}: "
              f"{error}); reporting the jobs the ledger planned instead", file=sys.stderr)
        return stage_ledger(args.overrides)


def _warn_on_identity_mismatch(source: Any, report: StageReport) -> None:
    """A grid none of whose jobs the ledger knows: the overrides differ from the sweep's."""
    if isinstance(source, Ledger) or any(job.status is not None for job in report.jobs):
        return
    if report.superseded and not report.outside_grid:
        print(f"tmgg-sweep report: the ledger's {len(report.superseded)} records are of an "
              "earlier config of this grid (superseded); `tmgg-sweep resume` runs the "
              "current one", file=sys.stderr)
        return
    if not report.outside_grid:
        return
    arguments = (source.ledger.plan() or {}).get("arguments")
    print("tmgg-sweep report: none of the grid's jobs is in the ledger, which holds "
          f"{len(report.outside_grid)} other jobs; the sweep ran with "
          f"{arguments or 'other overrides'}; pass the same identity overrides, or "
          "use --ledger-only", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        source = _source(args)
    except Exception as error:  # noqa: BLE001 - a CLI answer, not a traceback
        print(f"tmgg-sweep report: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    report = build_report(source)
    _warn_on_identity_mismatch(source, report)
    path = write_report(report, args.out or (source.root if isinstance(source, Ledger)
                                             else source.ledger.root))
    counts = report.counts()
    print(f"wrote {path}: {len(report.rows)} configurations; "
          + ", ".join(f"{counts[c]} {c}" for c in shown_categories(counts))
          + f" of {len(report.jobs)} expected jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
