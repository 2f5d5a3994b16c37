"""What tmgg's Hydra launcher plugins (``hydra/launcher=local``, ``=modal``) share.

Hydra imports the plugins at every start-up, so this imports hydra and omegaconf
only. ``TmggLauncher`` leaves ``launch`` abstract: Hydra's plugin scan registers only
concrete classes, so the base is never offered as a launcher itself.

Besides Hydra's ``setup``/``launch``, a tmgg launcher has two class-level hooks that
tmgg's multirun start calls for whichever launcher the sweep is configured with:
``before_plan`` (before the sweep is composed: start warming up, fail fast on
settings) and ``preflight`` (after it is composed, before the plan is recorded: every
refusal that needs the jobs). Each concrete launcher hands them to the state machine
(``tmgg.jobs.launcher_hooks``) when its class is defined, so tmgg.jobs imports no
launcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from tmgg.jobs.launcher_hooks import register_launcher


class TmggLauncher(Launcher):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The class path is what a sweep's hydra.launcher._target_ names.
        register_launcher(f"{cls.__module__}.{cls.__qualname__}", cls)

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        # Again here for apps whose config lacks tmgg's multirun callbacks (idempotent).
        type(self).before_plan(config)

    @classmethod
    def before_plan(cls, config: DictConfig) -> None:
        """At multirun start, before any job is composed; nothing by default."""

    @classmethod
    def preflight(cls, config: DictConfig, jobs: Sequence[Any]) -> None:
        """Refusals (PlanError) for the sweep's planned jobs, before the plan is recorded."""

    @classmethod
    def check(cls, config: DictConfig, jobs: Sequence[Any]) -> None:
        """The refusals ``before_plan`` and ``preflight`` make that need no credentials, no
        network and change nothing; ``tmgg-sweep plan`` runs them. Nothing by default."""

