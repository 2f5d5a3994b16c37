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
from tmgg.orchestration.ledger import Ledger
from tmgg.orchestration.plan import PlannedJob, compose_plan, expand_grid
from tmgg.orchestration.sweep import experiments_root


@dataclass
class ComposedSweep:
    master_config: DictConfig
    jobs: list[PlannedJob]
    arguments: list[str]
    config_loader: Any

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
def hydra_session() -> Iterator[Any]:
    """An initialised GlobalHydra on conf/, restored afterwards."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="app"):
        yield GlobalHydra.instance().config_loader()


def load_master_config(config_loader: Any, overrides: Sequence[str]) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    setup_globals()
    config = config_loader.load_configuration(config_name="train", overrides=list(overrides),
                                              run_mode=RunMode.MULTIRUN)
    HydraConfig.instance().set_config(config)
    return config


def compose_sweep(overrides: Sequence[str]) -> ComposedSweep:
    """Every job of ``tmgg-train -m <overrides>``, composed and validated (no dispatch)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with hydra_session() as loader:
        master = load_master_config(loader, overrides)
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        task_arguments = [o.input_line for o in parsed if not o.is_hydra_override()]
        jobs = compose_plan(loader, master, expand_grid(master, task_arguments))
        return ComposedSweep(master_config=master, jobs=jobs, arguments=list(overrides),
                             config_loader=loader)


def stage_ledger(overrides: Sequence[str]) -> Ledger:
    """The ledger of the stage named by the overrides, without composing every job."""
    with hydra_session() as loader:
        master = load_master_config(loader, overrides)
        return Ledger(experiments_root(master), str(master.stage.name))
