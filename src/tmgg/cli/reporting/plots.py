"""The report's PNG plots (matplotlib on an Agg canvas, no pyplot state).

Matplotlib is imported inside the plotting functions, only when a report with
finished jobs is written, so it stays out of every other ``tmgg-sweep`` command.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmgg.cli.reporting.fields import (
    LABELS,
    LR,
    MSE,
    NO_EDGES,
    WD,
    K,
    as_number,
    format_value,
    hashable,
    sort_key,
)
from tmgg.config.identity import short_float

if TYPE_CHECKING:
    from tmgg.cli.reporting.report import StageReport

MSE_PLOT = "test_mse_vs_lr.png"
SPREAD_PLOT = "test_mse_seed_spread.png"


def write_plots(report: StageReport, out: Path) -> list[tuple[str, str, str]]:
    """Both PNGs, when some job has test metrics; their (file, title, caption)."""
    if not any(row.finished for row in report.rows):
        return []
    plot_mse_vs_lr(report, out / MSE_PLOT)
    plot_seed_spread(report, out / SPREAD_PLOT)
    return [
        (MSE_PLOT, "Test mse against learning rate",
         "Mean test mse against learning rate: one panel per model, one colour per k, one "
         "line style per weight decay; error bars are the std over seeds; the dashed grey "
         "line is the \"no edges\" reference."),
        (SPREAD_PLOT, "Per-seed test mse of every configuration",
         "Spread over seeds: every finished seed's test mse per configuration (colour = "
         "seed), the black bar is the mean; the x labels say how many seeds finished; "
         "the dashed grey line is the \"no edges\" reference."),
    ]


_WD_STYLES = ("-", ":", "-.", (0, (5, 1, 1, 1)))
_WD_MARKERS = ("o", "s", "^", "D")


def _panel_title(key: tuple[Any, ...], extra_keys: Sequence[str]) -> str:
    title = format_value(key[0])
    extras = [f"{LABELS.get(k, k)}={format_value(v)}" for k, v in zip(extra_keys, key[1:],
                                                                        strict=True)]
    return title + (f" ({', '.join(extras)})" if extras else "")


def _panel_grid(report: StageReport) -> tuple[list[Any], list[tuple[Any, ...]]]:
    panels = report.panels()
    models = sorted({key[0] for key in panels}, key=sort_key)
    extras = sorted({key[1:] for key in panels}, key=lambda k: tuple(sort_key(v) for v in k))
    return models, extras


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_mse_vs_lr(report: StageReport, path: Path) -> None:
    """Test mse against lr: a panel per model (x other swept keys), a line per k and wd."""
    panels = report.panels()
    models, extras = _panel_grid(report)
    ks = sorted({row.value(K) for row in report.rows}, key=sort_key)
    wds = sorted({row.value(WD) for row in report.rows}, key=sort_key)
    figure = _new_figure(4.4 * len(models), 3.6 * len(extras) + 0.4)
    axes = figure.subplots(len(extras), len(models), squeeze=False, sharey=True)
    y_values: list[float] = []
    for r, extra in enumerate(extras):
        for c, model in enumerate(models):
            ax = axes[r][c]
            rows = [row for row in panels.get((model, *extra), []) if row.mean(MSE) is not None]
            ax.set_title(_panel_title((model, *extra), report.extra_keys), fontsize=10)
            ax.set_xscale("log")
            ax.grid(True, which="major", alpha=0.3)
            lrs: set[float] = set()
            for k_index, k in enumerate(ks):
                for wd_index, wd in enumerate(wds):
                    line = sorted((row for row in rows if row.value(K) == k and
                                   row.value(WD) == wd and as_number(row.value(LR)) is not None),
                                  key=lambda row: float(row.value(LR)))
                    if not line:
                        continue
                    x = [float(row.value(LR)) for row in line]
                    lrs.update(x)
                    ax.errorbar(x, [row.mean(MSE) for row in line],
                                yerr=[row.std(MSE) or 0.0 for row in line],
                                color=f"C{k_index % 10}",
                                linestyle=_WD_STYLES[wd_index % len(_WD_STYLES)],
                                marker=_WD_MARKERS[wd_index % len(_WD_MARKERS)],
                                markersize=4, capsize=3, linewidth=1.4,
                                label=f"k={format_value(k)}, wd={format_value(wd)}")
            if lrs:  # limits first: a horizontal line needs a non-empty log x range
                ticks = sorted(lrs)
                ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
                ax.set_xticks(ticks, [short_float(t) for t in ticks])
                ax.minorticks_off()
            no_edges = [v for row in rows for v in row.values(f"{NO_EDGES}/mse")]
            if no_edges and lrs:
                reference = statistics.fmean(no_edges)
                ax.axhline(reference, color="0.45", linestyle="--", linewidth=1.2,
                           label="no edges")
                y_values.append(reference)
            y_values += [row.mean(MSE) + sign * (row.std(MSE) or 0.0)
                         for row in rows for sign in (-1, 1)]
            ax.set_xlabel("learning rate")
            if c == 0:
                ax.set_ylabel("test mse (mean ± std over seeds)")
            if r == 0 and c == len(models) - 1 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    if y_values:  # explicit limits: the shared, log-x axes do not autoscale to axhline
        low, high = min(y_values), max(y_values)
        margin = max(high - low, 0.01) * 0.08
        axes[0][0].set_ylim(low - margin, high + margin)
    figure.suptitle(f"{report.stage}: test mse against learning rate", fontsize=12)
    figure.savefig(path, dpi=110)


def plot_seed_spread(report: StageReport, path: Path) -> None:
    """Per-seed test mse of every configuration, a panel per model (x other keys)."""
    from matplotlib.lines import Line2D

    panels = report.panels()
    order = sorted(panels, key=lambda key: tuple(sort_key(v) for v in key))
    seeds = sorted({hashable(job.seed) for row in report.rows for job in row.finished},
                   key=sort_key)
    widest = max(len(rows) for rows in panels.values())
    figure = _new_figure(max(6.5, 0.62 * widest + 2.5), 3.3 * len(order) + 0.4)
    axes = figure.subplots(len(order), 1, squeeze=False)
    for index, key in enumerate(order):
        ax = axes[index][0]
        rows = panels[key]
        labels = []
        for x, row in enumerate(rows):
            config = [f"{LABELS[key]}{format_value(row.value(key))}" for key in (LR, WD, K)]
            labels.append(f"{' '.join(config)} ({len(row.finished)}/{len(row.jobs)})")
            for job in row.finished:
                seed_index = seeds.index(hashable(job.seed))
                offset = (seed_index - (len(seeds) - 1) / 2) * 0.12
                ax.scatter([x + offset], [float(job.metrics[MSE])], s=22,
                           color=f"C{seed_index % 10}", zorder=3)
            mean = row.mean(MSE)
            if mean is not None:
                ax.hlines(mean, x - 0.3, x + 0.3, color="black", linewidth=1.6, zorder=4)
        no_edges = [v for row in rows for v in row.values(f"{NO_EDGES}/mse")]
        if no_edges:
            ax.axhline(statistics.fmean(no_edges), color="0.45", linestyle="--",
                       linewidth=1.2)
        ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=7)
        for label, row in zip(ax.get_xticklabels(), rows, strict=True):
            if len(row.finished) < len(row.jobs):  # seeds failed or missing: stand out
                label.set_color("tab:red")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(_panel_title(key, report.extra_keys), fontsize=10)
        ax.set_ylabel("test mse per seed")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker="o", color=f"C{i % 10}",
                      label=f"seed {format_value(seed)}") for i, seed in enumerate(seeds)]
    handles += [Line2D([], [], color="black", linewidth=1.6, label="mean"),
                Line2D([], [], color="0.45", linestyle="--", label="no edges")]
    axes[0][0].legend(handles=handles, fontsize=7, loc="best")
    figure.suptitle(f"{report.stage}: spread of test mse over seeds", fontsize=12)
    figure.savefig(path, dpi=110)
