"""The sweep plan: every job composed by Hydra and validated before any dispatch.

``expand_grid`` reproduces Hydra's basic sweeper (stage params, then command-line
overrides, a later key replacing an earlier one), and ``compose_job`` uses Hydra's
own ``load_sweep_config`` (DESIGN.md contract 1). A job's task config is resolved
on the launching machine and frozen into the plan: the entity and project a job
logs to are decided here, not where it runs (contract 3). Only what depends on the
job's output directory (``${hydra:runtime.output_dir}``, known where the job runs)
stays an interpolation, resolved per job as under Hydra's basic launcher.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tmgg.config import JobConfigError, validate_job_config
from tmgg.config.identity import RUN_COMPUTED_KEYS, SWEEP_COMPUTED_KEYS, computed_key_problems


class PlanError(RuntimeError):
    """A sweep that must not be dispatched (names the job and the field)."""


@dataclass
class PlannedJob:
    """One composed, validated job."""

    index: int
    job_id: str
    run_name: str
    stage: str
    overrides: list[str]
    # full config incl. hydra node, task part resolved; None for a job read back from
    # plan.json (compose.recorded_job), which is reported on, never dispatched
    sweep_config: DictConfig | None
    task_config: dict[str, Any]  # resolved task config (what the job function gets)
    is_tmgg_job: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def wandb(self) -> dict[str, Any] | None:
        logger = self.task_config.get("logger") or {}
        if logger.get("name") != "wandb":
            return None
        from tmgg.config.identity import job_wandb_run_id
        from tmgg.task.loggers import pinned_base_url, resolve_wandb_mode

        summary = {k: logger.get(k) for k in ("entity", "project", "group")}
        base_url = pinned_base_url(logger)
        config_mode = str(logger.get("mode") or "auto")
        # mode: what the job will use, resolved here (auto: offline or online).
        summary.update(base_url=base_url, mode=resolve_wandb_mode(config_mode, base_url),
                       config_mode=config_mode,
                       run_id=job_wandb_run_id(self.task_config)
                       if "job" in self.task_config else None)
        return summary

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "job_id": self.job_id,
            "run_name": self.run_name,
            "stage": self.stage,
            "overrides": self.overrides,
            "wandb": self.wandb,
            **self.extras,
        }


def is_tmgg_config(cfg: DictConfig) -> bool:
    """Hydra's launcher test apps use these launchers too: tmgg rules apply to tmgg jobs."""
    return OmegaConf.select(cfg, "stage.name") is not None and "job" in cfg


def expand_grid(config: DictConfig, arguments: Sequence[str]) -> list[list[str]]:
    """Job override lists exactly as Hydra's BasicSweeper would build them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    parsed = OverridesParser.create().parse_overrides(lines)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batches[0]]


# What ${hydra:runtime.output_dir} resolves to while a plan is frozen: values holding it
# are found afterwards and kept as interpolations.
_OUTPUT_DIR_PLACEHOLDER = "<tmgg:hydra.runtime.output_dir>"


def freeze_task_config(sweep_config: DictConfig) -> DictConfig:
    """Resolve every task key now, in place (the hydra node stays lazy: it needs job runtime).

    A value that depends on ``hydra.runtime.output_dir`` stays an interpolation: the
    job's output directory is only known where it runs (a Modal volume, a SLURM node).
    """
    return _freeze(sweep_config)[0]


def _freeze(sweep_config: DictConfig) -> tuple[DictConfig, dict[str, Any], int]:
    """The sweep config, its task part resolved in place, that part as plain data, and
    how many of its values were kept as output-dir interpolations.

    In place: the config is the job's own fresh composition, and a deep copy of it
    (hydra node included) cost more than composing it. What the task part said before
    resolving is kept as plain data, for the output-dir values to be put back.
    """
    task_keys = [key for key in sweep_config if key != "hydra"]
    written = {str(key): _plain(sweep_config, key) for key in task_keys}
    with _hydra_runtime(sweep_config, _OUTPUT_DIR_PLACEHOLDER), read_write(sweep_config), \
            open_dict(sweep_config):
        for key in task_keys:
            node = sweep_config._get_node(key)
            if OmegaConf.is_config(node):
                OmegaConf.resolve(node)
            else:
                sweep_config[key] = OmegaConf.select(sweep_config, str(key))
    task = {str(key): _plain(sweep_config, key) for key in task_keys}
    kept = _keep_output_dir_interpolations(sweep_config, written, task)
    return sweep_config, task, kept


def _plain(config: DictConfig, key: Any) -> Any:
    """One key of a config as ``OmegaConf.to_container(config, resolve=False)`` gives it."""
    node = config._get_child(key, throw_on_missing_value=False)
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) \
        else node._value()  # type: ignore[union-attr]


@contextmanager
def _hydra_runtime(config: DictConfig, output_dir: str | None) -> Iterator[None]:
    """HydraConfig (what ${hydra:...} reads) set to ``config`` with this output dir.

    As ``HydraConfig.set_config`` (which marks the hydra node read-only), but without
    its deep copy of the hydra node, tens of milliseconds per job: for the duration
    HydraConfig reads ``config``'s own hydra node, which resolves to the same values
    (the copy's parent is ``config`` too). Afterwards ``config`` gets its own output
    dir back and HydraConfig what it held before."""
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    OmegaConf.set_readonly(config.hydra, True)
    runtime = config.hydra.runtime
    original = runtime._get_node("output_dir")._value()  # type: ignore[union-attr]
    if output_dir is not None:
        with read_write(runtime):
            runtime.output_dir = output_dir
    hydra_config.cfg = config  # type: ignore[assignment]  # HydraConfig.get(): .hydra
    try:
        yield
    finally:
        hydra_config.cfg = before
        if output_dir is not None:
            with read_write(runtime):
                runtime.output_dir = original


def _keep_output_dir_interpolations(frozen: DictConfig, written: dict[str, Any],
                                    task: dict[str, Any]) -> int:
    """Put back the unresolved text of every value that resolved through the output dir
    (in ``frozen`` and in its plain ``task`` part); ``written`` is the task part as
    written, before resolving. Returns how many values were put back."""

    def walk(node: Any, path: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, dict | list):
                yield from walk(value, (*path, key))
            elif isinstance(value, str) and _OUTPUT_DIR_PLACEHOLDER in value:
                yield (*path, key)

    paths = list(walk(task, ()))
    for path in paths:
        for depth in range(len(path), 0, -1):  # the nearest interpolation holding it
            raw = _at(written, path[:depth])
            if not (isinstance(raw, str) and "${" in raw):  # OmegaConf's own test
                continue
            parent_path = ".".join(map(str, path[:depth - 1]))
            key = path[depth - 1]
            target = OmegaConf.select(frozen, parent_path) if parent_path else frozen
            with read_write(target), open_dict(target):
                target[key] = raw
            plain = task
            for step in path[:depth - 1]:
                plain = plain[step]
            plain[key] = raw
            break
        else:
            raise PlanError(f"{'.'.join(map(str, path))}: uses ${{hydra:runtime.output_dir}} "
                            "in a way tmgg cannot keep for the job to resolve")
    return len(paths)


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` of a plain tree, None where the path does not lead."""
    for step in path:
        leads = (step in tree if isinstance(tree, dict) else
                 isinstance(tree, list) and isinstance(step, int) and step < len(tree))
        if not leads:
            return None
        tree = tree[step]
    return tree


def check_paths(config: DictConfig, job: str, output_dir: str | None,
                output_dir_field: str = "hydra.sweep.dir") -> None:
    """Nothing of a job is written outside experiments_dir and outputs_dir (paths resolved,
    symbolic links followed): neither its ledger directory nor its output directory."""
    experiments = Path(str(config.experiments_dir)).resolve()
    outputs = Path(str(config.outputs_dir)).resolve()
    ledger = (experiments / str(config.stage.name)).resolve()
    if not ledger.is_relative_to(experiments) or ledger == experiments:
        raise JobConfigError(job, "stage.name", f"its ledger directory {ledger} is not "
                             f"inside experiments_dir={experiments}")
    if output_dir is None:
        return  # not resolvable at plan time: Hydra reports it
    where = Path(output_dir).resolve()
    if not where.is_relative_to(outputs) or where == outputs:
        raise JobConfigError(job, output_dir_field, f"the job's output directory {where} is "
                             f"not inside outputs_dir={outputs}")


def check_run(config: DictConfig) -> None:
    """A single run (``tmgg-train`` without -m): the plan's checks, before Hydra creates
    the job's output directory."""
    if not is_tmgg_config(config):
        return
    from tmgg.config import job_label
    from tmgg.jobs.workdirs import check_work_dirs

    refuse_grid_without_multirun(config)
    check_work_dirs(config)
    job = job_label(config)
    output_dir = _output_dir(config, "hydra.run.dir")
    try:
        for key, problem in computed_key_problems(config, RUN_COMPUTED_KEYS)[:1]:
            raise JobConfigError(job, key, problem)
        with _hydra_runtime(config, output_dir):
            validate_job_config(config, job=job)
            check_paths(config, job, output_dir, "hydra.run.dir")
    except JobConfigError as error:
        raise PlanError(str(error)) from error


def refuse_grid_without_multirun(config: DictConfig) -> None:
    """A stage with a grid, run without ``-m``: Hydra would train one job built from the
    defaults, beside the grid's own jobs under a new id. Allowed only when the command
    line sets every swept key (then it is one of the grid's jobs)."""
    from tmgg.config.identity import task_overrides
    from tmgg.jobs.search_space import is_adaptive

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    if not params:
        return
    arguments = task_overrides(config)
    given = {argument.split("=", 1)[0].lstrip("+~") for argument in arguments}
    swept = [str(key) for key in params]
    if all(key in given for key in swept):
        return
    if is_adaptive(config):
        raise PlanError(
            f"stage {config.stage.name} is an adaptive search over {', '.join(swept)}; "
            "without -m, tmgg-train would train one job outside its study. Run the study: "
            f"tmgg-train -m {' '.join(arguments)}")
    jobs = len(expand_grid(config, arguments))
    raise PlanError(
        f"stage {config.stage.name} is a sweep of {jobs} jobs (it sweeps "
        f"{', '.join(swept)}); without -m, tmgg-train would train one job outside that "
        f"grid. Run the sweep: tmgg-train -m {' '.join(arguments)}")


def compose_job(config_loader: Any, master_config: DictConfig, overrides: Sequence[str],
                index: int) -> PlannedJob:
    """Compose one job with Hydra's loader, freeze and validate it."""
    try:
        sweep_config = config_loader.load_sweep_config(master_config, list(overrides))
    except Exception as error:
        raise PlanError(f"job #{index} ({' '.join(overrides)}): {error}") from error
    with read_write(sweep_config.hydra), open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = index
        sweep_config.hydra.job.id = f"job{index}"
    if not is_tmgg_config(sweep_config):
        return PlannedJob(index=index, job_id=f"job{index}", run_name=f"job{index}",
                          stage="", overrides=list(overrides), sweep_config=sweep_config,
                          task_config={}, is_tmgg_job=False)
    label = f"#{index} ({' '.join(overrides)})"
    for key, problem in computed_key_problems(sweep_config, SWEEP_COMPUTED_KEYS)[:1]:
        raise PlanError(str(JobConfigError(label, key, problem)))  # before job.id resolves
    try:
        frozen, task, kept = _freeze(sweep_config)
    except PlanError as error:
        raise PlanError(f"job {label}: {error}") from error
    except Exception as error:
        raise PlanError(f"job {label}: cannot resolve its config: {error}") from error
    run_name = str(task["job"]["run_name"])
    output_dir = _output_dir(frozen, "hydra.sweep.dir", "hydra.sweep.subdir")
    # The task part of ``frozen`` is fully resolved unless a value was kept as an
    # output-dir interpolation: then what the job will get (``task``, no hydra node)
    # is checked as such, else ``frozen`` itself (the same values, no copy to make).
    checked = OmegaConf.create(task) if kept else frozen
    try:
        with _hydra_runtime(frozen, output_dir):
            validate_job_config(checked, job=run_name)
            check_paths(frozen, run_name, output_dir)
    except JobConfigError as error:
        raise PlanError(str(error)) from error
    return PlannedJob(index=index, job_id=str(task["job"]["id"]), run_name=run_name,
                      stage=str(task["stage"]["name"]), overrides=list(overrides),
                      sweep_config=frozen, task_config=task)


def _output_dir(config: DictConfig, *keys: str) -> str | None:
    """Where Hydra's run_job will put the job (these keys joined, absolute), for checks
    at plan time; None when they do not resolve here (Hydra reports that itself)."""
    try:
        parts = [OmegaConf.select(config, key) for key in keys]
    except Exception:  # noqa: BLE001
        return None
    if any(part is None for part in parts):
        return None
    return str(Path(*map(str, parts)).absolute())


def compose_plan(config_loader: Any, master_config: DictConfig,
                 job_overrides: Sequence[Sequence[str]], initial_index: int = 0
                 ) -> list[PlannedJob]:
    """Compose and validate every job; refuse duplicate identities."""
    from tmgg.jobs.composer import interpolations_parsed_once

    with interpolations_parsed_once():
        jobs = [compose_job(config_loader, master_config, overrides, initial_index + i)
                for i, overrides in enumerate(job_overrides)]
    seen: dict[str, PlannedJob] = {}
    names: dict[str, PlannedJob] = {}
    for job in jobs:
        if not job.is_tmgg_job:
            continue
        if job.job_id in seen:
            raise PlanError(f"jobs #{seen[job.job_id].index} and #{job.index} have the same "
                            f"job id {job.job_id}: they compose to the same task config, "
                            "so the sweep lists one job twice")
        if job.run_name in names:
            raise PlanError(f"jobs {names[job.run_name].job_id} and {job.job_id} share the run "
                            f"name {job.run_name}: the stage's run_name template must include "
                            "every swept key")
        seen[job.job_id] = job
        names[job.run_name] = job
    return jobs
