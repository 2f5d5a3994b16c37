"""``tmgg-sweep plan`` for an adaptive stage (``hydra/sweeper=tmgg_optuna``).

An adaptive stage has no grid to list: its plan is the search space, the budget
(trials x jobs per trial x steps, an upper bound: pruned or stopped trials only use
less), its cost bound and the W&B destination. One probe trial (every dimension at its
low end or first choice) is composed and checked like any job, and each other end of
every dimension too (``check_space_bounds``), so a destination the guard refuses, a
space Optuna cannot sample, or one whose ends give refused jobs, refuses the plan.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig


def is_adaptive_stage(overrides: Sequence[str]) -> bool:
    """Whether the overrides name an adaptive stage (composes the master config only)."""
    from tmgg.jobs.compose import hydra_session, load_master_config
    from tmgg.jobs.search_space import is_adaptive

    with hydra_session() as loader:
        return is_adaptive(load_master_config(loader, overrides))


def _task_arguments(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if not o.is_hydra_override()]


def adaptive_plan_facts(overrides: Sequence[str]) -> dict[str, Any]:
    """The adaptive plan as data; ``PlanError`` for a space or a job it refuses."""
    from tmgg.jobs.compose import hydra_session, load_master_config
    from tmgg.jobs.plan import PlanError, compose_plan
    from tmgg.jobs.search_space import (
        SearchSpaceError,
        check_space_bounds,
        probe_params,
        stage_space,
        sweeper_settings,
    )
    from tmgg.jobs.sweep import experiments_root
    from tmgg.jobs.wandb_check import check_wandb_destinations
    from tmgg.launch.adaptive import pruner_resources
    from tmgg.launch.cost import plan_estimates

    with hydra_session() as loader:
        master: DictConfig = load_master_config(loader, overrides)
        stage = str(master.stage.name)
        try:
            space = stage_space(master, _task_arguments(overrides))
            space.distributions()  # what Optuna itself would refuse
        except (SearchSpaceError, ValueError) as error:
            raise PlanError(f"stage {stage}: {error}") from None
        settings = sweeper_settings(master)
        check_space_bounds(loader, master, space)  # every end of the space is a valid job
        probe = compose_plan(loader, master, space.trial_overrides(probe_params(space)))
        check_wandb_destinations(probe, master)
        estimates = plan_estimates(master, probe, groups=[[i] for i in range(len(probe))])
        launcher = str(master.hydra.runtime.choices.get("hydra/launcher", "unknown"))
        root = experiments_root(master) / stage
    n_trials = int(settings["n_trials"])
    jobs_per_trial = len(space.repeats)
    steps = int(probe[0].task_config["trainer"]["max_steps"])
    gpu_seconds = max((e.get("est_gpu_seconds") or 0.0) for e in estimates)
    costs = [e.get("est_cost_usd") for e in estimates]
    facts: dict[str, Any] = {
        "stage": stage, "launcher": launcher, "sweeper": "tmgg_optuna",
        "n_trials": n_trials, "n_jobs": int(settings["n_jobs"]),
        "sampler": settings["sampler"], "seed": settings.get("seed"),
        "direction": settings["direction"], "metric": settings["metric"],
        "pruner": settings.get("pruner") or "none",
        "pruner_startup_trials": settings.get("pruner_startup_trials"),
        "pruner_warmup_steps": settings.get("pruner_warmup_steps"),
        **pruner_resources(settings, master),
        "pruner_reduction_factor": settings.get("pruner_reduction_factor") or 3,
        "fuse_trials": bool(settings.get("fuse_trials")),
        "search_space": [{"key": d.key, "declared": d.text, "samples": d.describe()}
                         for d in space.dimensions],
        "fixed": space.fixed,
        "repeats": [" ".join(repeat) for repeat in space.repeats],
        "jobs_per_trial": jobs_per_trial, "max_jobs": n_trials * jobs_per_trial,
        "steps_per_job": steps, "budget_steps": n_trials * jobs_per_trial * steps,
        "est_gpu_seconds_max": round(n_trials * jobs_per_trial * gpu_seconds, 1),
        "wandb": probe[0].wandb, "ledger": str(root),
    }
    if all(cost is not None for cost in costs):
        facts["est_cost_usd_max"] = round(n_trials * jobs_per_trial
                                          * max(c for c in costs if c is not None), 4)
    return facts


def adaptive_plan_main(overrides: Sequence[str], as_json: bool) -> int:
    from tmgg.jobs.plan import PlanError

    try:
        facts = adaptive_plan_facts(overrides)
    except PlanError as error:
        print(f"plan refused: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - Hydra composition errors name the field
        print(f"plan refused: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"adaptive plan: stage {facts['stage']} on {facts['launcher']} "
                        f"(hydra/sweeper=tmgg_optuna, {facts['sampler']} seed "
                        f"{facts['seed']}, {facts['direction']} {facts['metric']})")
    for column in ("parameter", "declared", "samples"):
        table.add_column(column)
    for row in facts["search_space"]:
        table.add_row(row["key"], row["declared"], row["samples"])
    console.print(table)
    wandb = facts["wandb"]
    destination = (f"{wandb['entity']}/{wandb['project']}/{wandb['group']} ({wandb['mode']})"
                   if wandb else "(csv, no W&B)")
    repeats = ", ".join(facts["repeats"]) or "one job"
    console.print(f"budget at most: {facts['n_trials']} trials x {facts['jobs_per_trial']} "
                  f"jobs ({repeats}) x {facts['steps_per_job']} steps = "
                  f"{facts['budget_steps']} steps, {facts['n_jobs']} trial(s) at once",
                  soft_wrap=True)
    cost = (f", ${facts['est_cost_usd_max']:.2f} on Modal" if "est_cost_usd_max" in facts
            else " (hydra/launcher=modal prices it)")
    console.print(f"estimated accelerator time at most {facts['est_gpu_seconds_max']:.0f} s"
                  f"{cost}", soft_wrap=True)
    pruner = facts["pruner"]
    if pruner in ("successive_halving", "hyperband"):
        pruner += (f" (first rung at step {facts['pruner_min_resource']}, the best "
                   f"1/{facts['pruner_reduction_factor']} go on")
        pruner += (f", up to step {facts['pruner_max_resource']})" if pruner.startswith("h")
                   else ")")
    elif pruner != "none":
        pruner += (f" (after {facts['pruner_startup_trials']} complete trials, from step "
                   f"{facts['pruner_warmup_steps']})")
    if facts["fuse_trials"]:
        pruner += f"; trials in fused rounds of {facts['n_jobs']}"
    console.print(f"pruner: {pruner}", soft_wrap=True)
    console.print(f"destination: {destination}; fixed: {' '.join(facts['fixed']) or '-'}",
                  soft_wrap=True)
    console.print(f"trials are asked as the study runs; nothing dispatched; ledger "
                  f"{facts['ledger']}", soft_wrap=True)
    return 0
