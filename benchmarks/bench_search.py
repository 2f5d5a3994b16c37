"""The adaptive stage1_search against the stage 1 + stage 1b grids, from committed ledgers.

Reads ``experiments/<stage>/jobs/*.json`` (no training) and reports, side by side:

- training steps used, counted honestly: every job's recorded ``global_step``
  (FINISHED and PRUNED jobs alike; a FAILED or LOST job's last recorded step, 0 when
  it recorded none);
- the best cell's test mse: a cell is a configuration with its seeds (the job's
  overrides less ``seed``); its value the mean test/mse over its finished seeds. For
  the search, the trial its study would pick (best mean ``val/loss``) and the best
  test mse of any trial are both shown.

Issue 23's target: the search reaches a test mse at least as good as the grids' best
cell with at most a third of their steps.

With ``--plots DIR``, the search's study is rebuilt from its ledger (the search space
recorded in its plan.json) and Optuna's matplotlib plots are written there: the
optimisation history and the parameter importances (PED-ANOVA: Optuna's default
fANOVA needs scikit-learn, which the lock does not hold).

Usage: ``python benchmarks/bench_search.py [--experiments experiments] [--json out.json]
[--plots DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

GRID_STAGES = ("stage1", "stage1b")
SEARCH_STAGE = "stage1_search"


def _records(root: Path, stage: str) -> list[dict[str, Any]]:
    jobs = root / stage / "jobs"
    return [json.loads(path.read_text()) for path in sorted(jobs.glob("*.json"))] \
        if jobs.exists() else []


def _cell(record: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(o for o in record.get("overrides") or []
                        if not o.startswith(("seed=", "stage=", "experiments_dir=",
                                             "outputs_dir="))))


def _steps(record: dict[str, Any]) -> int:
    metrics = record.get("metrics") or {}
    return int(metrics.get("global_step") or record.get("pruned_at_step") or 0)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps used and the cells' mean test/mse and val/loss (finished jobs only)."""
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        cells[_cell(record)].append(record)
    rows = []
    for cell, members in cells.items():
        finished = [r for r in members if r.get("status") == "FINISHED"]
        mse = [r["metrics"]["test/mse"] for r in finished if "test/mse" in r["metrics"]]
        val = [r["metrics"]["val/loss"] for r in finished if "val/loss" in r["metrics"]]
        rows.append({"cell": " ".join(cell), "jobs": len(members),
                     "finished": len(finished),
                     "pruned": sum(r.get("status") == "PRUNED" for r in members),
                     "test_mse": sum(mse) / len(mse) if mse else None,
                     "val_loss": sum(val) / len(val) if val else None})
    scored = [row for row in rows if row["test_mse"] is not None]
    by_test = min(scored, key=lambda r: r["test_mse"], default=None)
    by_val = min((r for r in scored if r["val_loss"] is not None),
                 key=lambda r: r["val_loss"], default=None)
    return {"jobs": len(records), "cells": len(rows),
            "steps": sum(_steps(r) for r in records),
            "pruned_jobs": sum(r.get("status") == "PRUNED" for r in records),
            "best_by_test_mse": by_test, "best_by_val_loss": by_val}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="experiments")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plots", help="write the study's history and importance plots here")
    args = parser.parse_args(argv)
    root = Path(args.experiments)
    grid_records = [r for stage in GRID_STAGES for r in _records(root, stage)]
    grid = summarize(grid_records)
    search = summarize(_records(root, SEARCH_STAGE))
    result = {"grid": {"stages": list(GRID_STAGES), **grid},
              "search": {"stage": SEARCH_STAGE, **search}}
    if grid["steps"]:
        result["steps_ratio"] = round(search["steps"] / grid["steps"], 4)
    grid_best = (grid["best_by_test_mse"] or {}).get("test_mse")
    search_best = (search["best_by_test_mse"] or {}).get("test_mse")
    picked = (search["best_by_val_loss"] or {}).get("test_mse")
    print(f"{'':28}{'stage1+1b grid':>18}{'stage1_search':>18}")
    print(f"{'jobs':28}{grid['jobs']:>18}{search['jobs']:>18}")
    print(f"{'training steps':28}{grid['steps']:>18}{search['steps']:>18}")
    print(f"{'pruned jobs':28}{grid['pruned_jobs']:>18}{search['pruned_jobs']:>18}")
    print(f"{'best cell test/mse':28}{_fmt(grid_best):>18}{_fmt(search_best):>18}")
    print(f"{'picked by val/loss, test/mse':28}"
          f"{_fmt((grid['best_by_val_loss'] or {}).get('test_mse')):>18}{_fmt(picked):>18}")
    if "steps_ratio" in result:
        print(f"steps: the search used {result['steps_ratio']:.1%} of the grids' "
              "(target: at most 33.3%)")
    if not search["jobs"]:
        print(f"no {SEARCH_STAGE} records under {root} yet: run "
              f"`tmgg-train -m stage={SEARCH_STAGE}`", file=sys.stderr)
    for name, best in (("grid", grid["best_by_test_mse"]),
                       ("search", search["best_by_test_mse"])):
        if best:
            print(f"best {name} cell: {best['cell']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plots:
        for path in write_plots(root, Path(args.plots)):
            print(f"wrote {path}")
    return 0


def write_plots(root: Path, out: Path) -> list[Path]:
    """The optimisation history and parameter importances of the search's study,
    rebuilt from its ledger as the sweeper rebuilds it (tmgg.launch.adaptive)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message=".*is experimental")  # Optuna's plot labels
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    from tmgg.jobs.ledger import Ledger
    from tmgg.jobs.search_space import parse_space
    from tmgg.launch.adaptive import COMPLETE, PRUNED_TRIAL, ledger_trials

    ledger = Ledger(root, SEARCH_STAGE)
    study_facts = (ledger.plan() or {}).get("study") or {}
    if not study_facts:
        print(f"no study recorded in {ledger.plan_path}", file=sys.stderr)
        return []
    space = parse_space(study_facts["search_space"])
    distributions = space.distributions()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=study_facts.get("direction", "minimize"))
    metric = str(study_facts.get("metric") or "val/loss")
    for trial in ledger_trials(ledger, space, metric).values():
        if trial.status == COMPLETE and trial.value is not None:
            state, value = TrialState.COMPLETE, trial.value
        elif trial.status == PRUNED_TRIAL:
            state, value = TrialState.PRUNED, None
        else:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=trial.params, distributions=distributions, value=value, state=state,
            intermediate_values=trial.reported))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    importance = optuna.importance.PedAnovaImportanceEvaluator()
    for name, plot in (
            ("optimization_history", plots.plot_optimization_history),
            ("param_importances",
             lambda s: plots.plot_param_importances(s, evaluator=importance))):
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:  # too few trials for importances
            print(f"{name}: not plotted ({error})", file=sys.stderr)
            continue
        path = out / f"{SEARCH_STAGE}_{name}.png"
        axes.figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
