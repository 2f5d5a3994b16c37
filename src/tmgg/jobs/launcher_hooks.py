"""What launchers hand the job state machine, so that it imports no launcher.

The state machine (plan, claims, records) needs what only a launcher knows: its checks
before the sweep is composed (``before_plan``), its refusals once the jobs are known
(``preflight``), the part of those that needs neither credentials nor the network,
which the dry run (``tmgg-sweep plan``) makes too (``check``), and whether a detached
call that holds a claim still runs (Modal's calls). Launchers register them here when
Hydra discovers its plugins (the plugin modules under ``hydra_plugins/tmgg_launchers``
import ``tmgg.launch``, which registers); the state machine looks them up by the
sweep's ``hydra.launcher._target_``. Imports point down only (DESIGN.md, Layers): this
module imports hydra and omegaconf.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class LauncherHooks(Protocol):
    """A launcher's checks, run by the state machine for the sweep it launches."""

    def before_plan(self, config: DictConfig) -> None:
        """At multirun start, before any job is composed: fail fast on settings."""

    def preflight(self, config: DictConfig, jobs: Sequence[Any]) -> None:
        """Refusals (PlanError) for the planned jobs, before the plan is recorded."""

    def check(self, config: DictConfig, jobs: Sequence[Any]) -> None:
        """The refusals of ``before_plan`` and ``preflight`` that need no credentials, no
        network and change nothing: settings, limits. ``tmgg-sweep plan`` runs them."""


# hydra.launcher._target_ (a class path, or a prefix ending in ".") -> its hooks
_LAUNCHERS: dict[str, LauncherHooks] = {}
# Polls a detached call holding a claim: (ledger, call id) -> still running?
_CALL_PROBES: list[Callable[[Any, str], bool]] = []


def register_launcher(target: str, hooks: LauncherHooks) -> None:
    """Make ``hooks`` the checks of every sweep whose launcher is ``target``.

    A ``target`` ending in ``.`` covers every class of that module (the submitit
    launchers, hydra-submitit-launcher's own among them). Registering again replaces.
    """
    _LAUNCHERS[target] = hooks


def register_call_probe(probe: Callable[[Any, str], bool]) -> None:
    """The function that says whether a detached call still runs (one per process)."""
    if probe not in _CALL_PROBES:
        _CALL_PROBES.append(probe)


def _discover_plugins() -> None:
    """Hydra's plugin scan imports tmgg's launcher plugins, which register their hooks.

    Any Hydra composition has run it already; a process that only reads the ledger
    (``tmgg-sweep status``) may not have.
    """
    from hydra.core.plugins import Plugins

    Plugins.instance()


def _lookup(target: str) -> LauncherHooks | None:
    if target in _LAUNCHERS:
        return _LAUNCHERS[target]
    prefixes = [key for key in _LAUNCHERS if key.endswith(".") and target.startswith(key)]
    return _LAUNCHERS[max(prefixes, key=len)] if prefixes else None


def configured_launcher(config: DictConfig) -> LauncherHooks | None:
    """The hooks of the sweep's ``hydra/launcher``, or None for a launcher without any
    (``basic``)."""
    target = OmegaConf.select(config, "hydra.launcher._target_")
    if not target:
        return None
    hooks = _lookup(str(target))
    if hooks is None:
        _discover_plugins()
        hooks = _lookup(str(target))
    return hooks


def run_before_plan(config: DictConfig) -> None:
    """The configured launcher's fail-fast checks (nothing for launchers without hooks)."""
    hooks = configured_launcher(config)
    if hooks is not None:
        hooks.before_plan(config)


def run_preflight(config: DictConfig, jobs: Sequence[Any]) -> None:
    """The configured launcher's refusals, run before the plan is recorded.

    A launcher that checked its settings only when Hydra sets it up or launches would
    leave a refused sweep's jobs in the ledger as planned.
    """
    hooks = configured_launcher(config)
    if hooks is not None:
        hooks.preflight(config, jobs)


def run_checks(config: DictConfig, jobs: Sequence[Any]) -> None:
    """The configured launcher's refusals a dry run can make (``LauncherHooks.check``):
    a plan that passes them is not refused by the launch for its settings."""
    hooks = configured_launcher(config)
    if hooks is not None:
        hooks.check(config, jobs)


def call_alive(ledger: Any, call_id: str) -> bool:
    """Whether a detached call that holds a claim still runs.

    Without a registered probe the call cannot be asked and counts as running: a claim
    is never taken from a holder nobody could check.
    """
    if not _CALL_PROBES:
        _discover_plugins()
    if not _CALL_PROBES:
        log.warning("No launcher can poll call %s; it counts as running", call_id)
        return True
    return any(probe(ledger, call_id) for probe in _CALL_PROBES)
