"""Compose a stage outside a Hydra run, exactly as ``tmgg-train -m`` would.

``tmgg-sweep`` commands (plan, status, resume, reconcile, report, cancel) take the
same overrides as ``tmgg-train -m`` (``stage=stage1 model=linear_pe ...``) and use
this module to get the master config and every job, composed by Hydra's own
config loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

import tmgg  # noqa: F401  (resolvers)
from tmgg.config import CONF_DIR
from tmgg.jobs.composer import recorded_plan_matches, share_config_cache
from tmgg.jobs.ledger import Ledger
from tmgg.jobs.plan import PlannedJob, compose_plan, expand_grid
from tmgg.jobs.sweep import experiments_root


@dataclass
class ComposedSweep:
    master_config: DictConfig
    jobs: list[PlannedJob]
    arguments: list[str]
    config_loader: Any
    from_plan: bool = False  # jobs read back from plan.json, not composed now

    @property
    def stage(self) -> str:
        return str(OmegaConf.select(self.master_config, "stage.name"))

    @property
    def ledger(self) -> Ledger:
        return Ledger(experiments_root(self.master_config), self.stage)

    @property
    def launcher(self) -> str:
        return str(self.master_config.hydra.runtime.choices.get("hydra/launcher", "unknown"))


@contextmanager
def hydra_session(shared_cache: bool = True) -> Iterator[Any]:
    """An initialised GlobalHydra on conf/; Hydra's global state restored afterwards.

    Its loader parses each config file once for all the compositions of the session
    (``composer.share_config_cache``); ``shared_cache=False`` keeps Hydra's own
    per-load repository, the baseline that tests and benchmarks compare against.

    Hydra keeps process-wide state that ``initialize_config_dir`` does not put back:
    the version base it sets (1.3: no chdir for a later ``@hydra.main``) and the
    HydraConfig that ``load_master_config`` sets (a job run later in this process
    would take the master's output dir for its own). Both are restored here, so a
    composition leaves the process as it found it.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.version import VersionBase

    version_base = VersionBase.instance().getbase()
    hydra_config = HydraConfig.instance().cfg
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                                   job_name="app"):
            loader = GlobalHydra.instance().config_loader()
            if shared_cache:
                share_config_cache(loader)
            yield loader
    finally:
        VersionBase.instance().version_base = version_base
        HydraConfig.instance().cfg = hydra_config  # type: ignore[assignment]


def load_master_config(config_loader: Any, overrides: Sequence[str]) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    setup_globals()
    config = config_loader.load_configuration(config_name="train", overrides=list(overrides),
                                              run_mode=RunMode.MULTIRUN)
    HydraConfig.instance().set_config(config)
    from tmgg.jobs.workdirs import check_work_dirs

    check_work_dirs(config, writable=False)  # the checkout's records, not the shell's
    return config


def compose_sweep(overrides: Sequence[str], shared_cache: bool = True) -> ComposedSweep:
    """Every job of ``tmgg-train -m <overrides>``, composed and validated (no dispatch).

    ``shared_cache=False`` composes with Hydra's uncached repository (the baseline).
    """
    with hydra_session(shared_cache) as loader:
        master = load_master_config(loader, overrides)
        return compose_jobs(loader, master, overrides)


def recorded_or_composed_sweep(overrides: Sequence[str]) -> ComposedSweep:
    """The sweep's jobs read from its plan.json when that is safe, else composed.

    For commands that only read the jobs (reconcile, report): the ledger's plan.json
    stands in when it was recorded for the same overrides (launcher ones aside) and
    the same conf/, code and library versions (``composer.recorded_plan_matches``);
    otherwise, or when the plan holds no job configs, every job is composed as usual.
    """
    with hydra_session() as loader:
        master = load_master_config(loader, overrides)
        plan = Ledger(experiments_root(master), str(master.stage.name)).plan()
        if recorded_plan_matches(plan, master):
            assert plan is not None
            return ComposedSweep(master_config=master, arguments=list(overrides),
                                 config_loader=loader, from_plan=True,
                                 jobs=[recorded_job(entry) for entry in plan["jobs"]])
        return compose_jobs(loader, master, overrides)


def compose_jobs(loader: Any, master: DictConfig, overrides: Sequence[str]) -> ComposedSweep:
    """Every job of the sweep whose master config ``loader`` composed from ``overrides``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tmgg.jobs.search_space import is_adaptive

    if is_adaptive(master):
        # An adaptive stage's jobs are its trials so far, as their plan recorded them.
        plan = Ledger(experiments_root(master), str(master.stage.name)).plan() or {}
        return ComposedSweep(master_config=master, arguments=list(overrides),
                             config_loader=loader, from_plan=True,
                             jobs=[recorded_job(entry) for entry in plan.get("jobs") or []])
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    task_arguments = [o.input_line for o in parsed if not o.is_hydra_override()]
    jobs = compose_plan(loader, master, expand_grid(master, task_arguments))
    return ComposedSweep(master_config=master, jobs=jobs, arguments=list(overrides),
                         config_loader=loader)


def recorded_job(entry: dict[str, Any]) -> PlannedJob:
    """A job as plan.json recorded it: its composed task config, no hydra node."""
    known = {"index", "job_id", "run_name", "stage", "overrides", "wandb", "config"}
    return PlannedJob(index=int(entry["index"]), job_id=str(entry["job_id"]),
                      run_name=str(entry["run_name"]), stage=str(entry["stage"]),
                      overrides=[str(o) for o in entry.get("overrides") or []],
                      sweep_config=None, task_config=dict(entry["config"]),
                      extras={k: v for k, v in entry.items() if k not in known})


def stage_ledger(overrides: Sequence[str]) -> Ledger:
    """The ledger of the stage named by the overrides, without composing every job."""
    with hydra_session() as loader:
        master = load_master_config(loader, overrides)
        return Ledger(experiments_root(master), str(master.stage.name))
