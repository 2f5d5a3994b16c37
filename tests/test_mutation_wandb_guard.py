"""The in-job W&B destination guard's decision (tmgg.task.wandb_guard), pinned down where
mutation testing found it unexamined (issue 25): the exact refusal a user reads, which
mode mismatches abort, that a stray run is finished as failed, and what the error carries.

Fast and in-process: part of ``make mutate``'s selection. The guard reads five things of
a live wandb Run (entity, project, id, settings.base_url, its offline/disabled flags) and
calls ``finish``; ``LiveRun`` below is such a run's readings, given as the guard's input.
The real client against the test W&B server is exercised end to end in
tests/test_wandb_guard.py and tests/test_wandb_online.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from tmgg.task.wandb_guard import (
    WandbDestinationError,
    WandbDestinationGuard,
    destination_problem,
    live_run_mode,
    mode_problem,
)

TEAM, PROJECT, RUN = "team", "proj", "abcd1234"
HOST = "http://127.0.0.1:8080"


@dataclass
class LiveRun:
    entity: str | None = TEAM
    project: str | None = PROJECT
    id: str = RUN
    offline: bool = False
    disabled: bool = False
    base_url: str | None = HOST
    finish_raises: bool = False
    finished_with: list[int] = field(default_factory=list)

    @property
    def settings(self) -> Any:
        if self.base_url is None:
            raise AttributeError("settings")
        return SimpleNamespace(base_url=self.base_url)

    def finish(self, exit_code: int = 0) -> None:
        self.finished_with.append(exit_code)
        if self.finish_raises:
            raise RuntimeError("wandb service gone")


def test_a_run_elsewhere_is_named_with_both_destinations() -> None:
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN) is None
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT) is None  # no id pinned
    assert destination_problem("personal", PROJECT, RUN, TEAM, PROJECT, RUN) == (
        "W&B run resolved to personal/proj, job is pinned to team/proj")
    assert destination_problem(TEAM, "other", RUN, TEAM, PROJECT, RUN) == (
        "W&B run resolved to team/other, job is pinned to team/proj")
    assert destination_problem(None, None, RUN, TEAM, PROJECT) == (
        "W&B run resolved to <no entity>/<no project>, job is pinned to team/proj")
    assert destination_problem(None, None, RUN, "", "") is None  # both empty agree


def test_a_run_on_another_host_or_with_another_id_is_refused() -> None:
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, HOST + "/", HOST) is None
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, HOST, HOST + "/") is None
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, "https://api.wandb.ai",
                               None) is None  # no host pinned: any host
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, "https://api.wandb.ai",
                               HOST) == (
        "W&B run team/proj logs to host https://api.wandb.ai, job is pinned to "
        f"{HOST} (logger.base_url)")
    assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, None, HOST) == (
        f"W&B run team/proj logs to host <no host>, job is pinned to {HOST} (logger.base_url)")
    assert destination_problem(TEAM, PROJECT, "zzzz9999", TEAM, PROJECT, RUN) == (
        "W&B run team/proj/zzzz9999 is not this job's run team/proj/abcd1234 (wandb chose "
        "another id: a W&B sweep or launch context, or a run of another job still active "
        "in this process)")


def test_the_live_mode_and_a_mode_the_environment_changed() -> None:
    assert live_run_mode(LiveRun()) == "online"
    assert live_run_mode(LiveRun(offline=True)) == "offline"
    assert live_run_mode(LiveRun(offline=True, disabled=True)) == "disabled"
    assert live_run_mode(object()) == "online"
    assert mode_problem("offline", None) is None
    assert mode_problem("offline", "offline") is None
    assert mode_problem("offline", "online") == (
        "W&B run is offline, job's mode is online (logger.mode; the environment cannot "
        "change it)")


def test_a_run_at_its_destination_is_recorded_as_checked() -> None:
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, base_url=HOST, mode="online")
    run = LiveRun()
    guard.check_run(run, 0)
    assert guard.checked_run == "team/proj/abcd1234" and run.finished_with == []


def test_a_stray_run_is_finished_as_failed_and_the_job_aborts() -> None:
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, mode="online")
    stray = LiveRun(entity="personal")
    with pytest.raises(WandbDestinationError) as refused:
        guard.check_run(stray, 3)
    assert str(refused.value) == (
        "W&B run resolved to personal/proj, job is pinned to team/proj; aborted at global "
        "step 3, before the first training step; the stray run abcd1234 was finished as "
        "failed")
    assert (refused.value.live, refused.value.pinned) == ("personal/proj", "team/proj")
    assert stray.finished_with == [1]
    assert guard.checked_run is None
    # A failing finish does not mask the abort.
    failing = LiveRun(project="elsewhere", finish_raises=True)
    with pytest.raises(WandbDestinationError, match="resolved to team/elsewhere"):
        guard.check_run(failing, 0)
    assert failing.finished_with == [1]


def test_a_disabled_run_passes_only_when_the_config_says_disabled() -> None:
    for mode in (None, "disabled"):
        guard = WandbDestinationGuard(TEAM, PROJECT, RUN, mode=mode)
        guard.check_run(LiveRun(entity=None, disabled=True), 0)
        assert guard.checked_run is None  # nothing is logged: nothing to check
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, mode="offline")
    silenced = LiveRun(disabled=True)
    with pytest.raises(WandbDestinationError) as refused:
        guard.check_run(silenced, 2)
    assert str(refused.value) == (
        "W&B run is disabled, job's mode is offline (logger.mode; the environment cannot "
        "change it); aborted at global step 2, before training")
    assert (refused.value.live, refused.value.pinned) == ("disabled", "team/proj")
    assert silenced.finished_with == []  # a disabled run has nothing to finish


def test_an_offline_run_for_an_online_job_is_finished_and_refused() -> None:
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, mode="online")
    offline = LiveRun(offline=True)
    with pytest.raises(WandbDestinationError) as refused:
        guard.check_run(offline, 0)
    assert str(refused.value).startswith("W&B run is offline, job's mode is online")
    assert refused.value.live == "team/proj" and offline.finished_with == [1]


def test_a_run_without_settings_has_no_host() -> None:
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, base_url=HOST)
    with pytest.raises(WandbDestinationError, match="logs to host <no host>"):
        guard.check_run(LiveRun(base_url=None), 0)
    WandbDestinationGuard(TEAM, PROJECT, RUN).check_run(LiveRun(base_url=None), 0)


def test_a_run_of_another_id_at_the_right_destination_is_refused() -> None:
    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, base_url=HOST)
    other = LiveRun(id="zzzz9999")
    with pytest.raises(WandbDestinationError, match="W&B run team/proj/zzzz9999 is not this "
                                                    "job's run team/proj/abcd1234"):
        guard.check_run(other, 0)
    assert other.finished_with == [1]
    guard.check_run(LiveRun(base_url=HOST + "/"), 0)  # one host, with or without a slash


def test_a_host_is_compared_whole_whatever_it_ends_with() -> None:
    for host in ("http://wandb.BOX", "http://wandb.box/"):
        assert destination_problem(TEAM, PROJECT, RUN, TEAM, PROJECT, RUN, host, host) is None


def test_the_guard_of_a_job_is_pinned_to_its_logger_and_run_id() -> None:
    from omegaconf import OmegaConf

    from tmgg.config.identity import wandb_run_id

    cfg = OmegaConf.create({"job": {"id": "st-0123456789"}, "logger": {
        "name": "wandb", "entity": TEAM, "project": PROJECT, "base_url": HOST + "/",
        "mode": "offline", "run_generation": 1}})
    guard = WandbDestinationGuard.for_job(cfg)
    assert (guard.entity, guard.project, guard.run_id, guard.base_url, guard.mode) == (
        TEAM, PROJECT, wandb_run_id("st-0123456789", 1), HOST, "offline")


def test_on_fit_start_checks_each_wandb_loggers_run() -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    guard = WandbDestinationGuard(TEAM, PROJECT, RUN, mode="online")
    stray = LiveRun(project="elsewhere")
    trainer = SimpleNamespace(global_step=7, loggers=[CSVLogger("unused"),
                                                      WandbLogger(experiment=stray)])
    with pytest.raises(WandbDestinationError, match="aborted at global step 7, before the first"):
        guard.on_fit_start(trainer, None)
    good = SimpleNamespace(global_step=0, loggers=[WandbLogger(experiment=LiveRun())])
    guard.on_fit_start(good, None)
    assert guard.checked_run == "team/proj/abcd1234"
