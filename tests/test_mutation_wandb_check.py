"""The plan-time W&B destination check (tmgg.jobs.wandb_check), pinned down where
mutation testing found it unexamined (issue 25): where the declared destination comes
from, when a whole-sweep override replaces it, and the refusal each job gets, naming
the job and the field.

Fast and in-process (plain configs under tmp_path, no composition, no W&B server; the
online key checks are exercised against the test W&B server in tests/test_wandb_keys.py):
part of ``make mutate``'s selection.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf

from tmgg.jobs.plan import PlanError, PlannedJob
from tmgg.jobs.wandb_check import (
    Expected,
    KeyAccess,
    check_job_destinations,
    check_wandb_destinations,
    declared_destination,
    expected_destination,
    key_access,
    whole_sweep_overrides,
    write_refusal,
)


def conf(tmp_path: Path, stage: str = "", logger: str = "") -> Path:
    (tmp_path / "stage").mkdir()
    (tmp_path / "logger").mkdir()
    if stage:
        (tmp_path / "stage/st.yaml").write_text(stage)
    if logger:
        (tmp_path / "logger/wandb.yaml").write_text(logger)
    return tmp_path


def master(overrides: list[str] | None = None, stage: str | None = "st",
           logger: str | None = "wandb", **composed: Any) -> Any:
    choices = {k: v for k, v in (("stage", stage), ("logger", logger)) if v is not None}
    return OmegaConf.create({
        "hydra": {"runtime": {"choices": choices}, "overrides": {"task": overrides or []}},
        "stage": {"name": "st_by_name"}, "logger": composed})


def job(run_name: str, tmgg: bool = True, **logger: Any) -> PlannedJob:
    return PlannedJob(index=0, job_id=f"st-{run_name}", run_name=run_name, stage="st",
                      overrides=[], sweep_config=None, is_tmgg_job=tmgg,
                      task_config={"logger": {"name": "wandb", "mode": "offline", **logger}})


def test_the_stage_file_declares_the_destination_else_the_logger_file(tmp_path: Path) -> None:
    conf_dir = conf(tmp_path, stage="logger:\n  entity: team\n  project: ${oc.env:P}\n",
                    logger="entity: default_team\nproject: default_project\n")
    assert declared_destination(master(), conf_dir) == {
        "entity": ("team", "conf/stage/st.yaml"),
        "project": ("default_project", "conf/logger/wandb.yaml")}  # an interpolation: not declared
    # The stage's name where Hydra's choices do not say it; the wandb logger by default.
    (tmp_path / "stage/st_by_name.yaml").write_text("logger:\n  project: p2\n")
    assert declared_destination(master(stage=None, logger=None), conf_dir) == {
        "entity": ("default_team", "conf/logger/wandb.yaml"),
        "project": ("p2", "conf/stage/st_by_name.yaml")}


def test_an_unreadable_or_missing_file_declares_nothing(tmp_path: Path) -> None:
    conf_dir = conf(tmp_path, stage="logger: [unclosed\n")
    assert declared_destination(master(), conf_dir) == {
        "entity": (None, "conf/logger/wandb.yaml"), "project": (None, "conf/logger/wandb.yaml")}


def test_a_whole_sweep_override_replaces_the_declared_destination(tmp_path: Path) -> None:
    conf_dir = conf(tmp_path, stage="logger:\n  entity: team\n  project: proj\n")
    assert whole_sweep_overrides(master(["logger.entity=other", "seed=1,2",
                                         "logger.project=a,b"])) == {
        "entity": "logger.entity=other"}  # a swept project is per job, not whole-sweep
    expected = expected_destination(master(["logger.entity=other"], entity="other",
                                           project="proj"), conf_dir)
    assert expected == Expected(
        values={"entity": "other", "project": "proj"},
        sources={"entity": "the command-line override logger.entity=other",
                 "project": "conf/stage/st.yaml"})
    cleared = expected_destination(master(["logger.entity=null"], entity=None), conf_dir)
    assert cleared.values["entity"] is None


def test_the_composed_value_counts_where_no_file_declares_one(tmp_path: Path) -> None:
    expected = expected_destination(master(entity="composed_team"), conf(tmp_path))
    assert expected.values == {"entity": "composed_team", "project": None}
    assert expected.sources == {"entity": "the composed sweep config",
                                "project": "conf/logger/wandb.yaml"}


def test_each_job_must_name_the_sweeps_destination(tmp_path: Path) -> None:
    expected = Expected(values={"entity": "team", "project": "proj"},
                        sources={"entity": "conf/stage/st.yaml", "project": "conf/stage/st.yaml"})
    check_job_destinations([job("a", entity="team", project="proj"),
                            job("b", tmgg=False, entity="x", project=""),
                            PlannedJob(index=1, job_id="c", run_name="c", stage="st",
                                       overrides=[], sweep_config=None,
                                       task_config={"logger": {"name": "csv"}})], expected)
    with pytest.raises(PlanError) as stray:
        check_job_destinations([job("a", entity="team", project="proj"),
                                job("b", entity="someone", project="proj")], expected)
    assert str(stray.value) == (
        "job b: logger.entity: 'someone' is not the sweep's destination 'team' (from "
        "conf/stage/st.yaml); a stage logs to one destination - override logger.entity "
        "for the whole sweep, not per job")
    for project in ("", "  ", None):
        with pytest.raises(PlanError) as empty:
            check_job_destinations([job("p", entity="team", project=project)], expected)
        assert str(empty.value) == (
            f"job p: logger.project: the W&B project is mandatory and must be a non-empty "
            f"string, got {project!r}")
    anything = Expected(values={"entity": None, "project": None}, sources={})
    check_job_destinations([job("a", entity="t1", project="p1"),
                            job("b", entity="t2", project="p2")], anything)
    with pytest.raises(PlanError, match=r"^job e: logger\.entity: the W&B entity is mandatory"):
        check_job_destinations([job("e", project="p")], anything)


def test_the_whole_check_skips_sweeps_without_wandb_jobs(tmp_path: Path) -> None:
    csv_only = [PlannedJob(index=0, job_id="c", run_name="c", stage="st", overrides=[],
                           sweep_config=None, task_config={"logger": {"name": "csv"}})]
    check_wandb_destinations(csv_only, master(), conf(tmp_path))
    with pytest.raises(PlanError, match="job w: logger.entity: 'x' is not the sweep's"):
        check_wandb_destinations([job("w", entity="x", project="p")],
                                 master(entity="team", project="p"), tmp_path)


def viewer_api(**viewer: Any) -> Any:
    return SimpleNamespace(viewer=SimpleNamespace(**viewer) if viewer else None)


def test_a_keys_writable_entities_are_its_own_and_its_teams() -> None:
    access = key_access(viewer_api(entity="alice_e", username="alice", teams=["t1", "", "t2"]))
    assert access == KeyAccess("alice", frozenset({"alice_e", "alice", "t1", "t2"}))
    assert key_access(viewer_api(entity="only_entity")) == KeyAccess(
        "only_entity", frozenset({"only_entity"}))
    assert key_access(viewer_api(teams=None, username=None, entity=None)) == KeyAccess(
        "?", frozenset())
    with pytest.raises(ValueError, match="the API key has no W&B user"):
        key_access(viewer_api())
    assert write_refusal(viewer_api(username="bob", teams=["b2", "a1"]), "team", "proj",
                         "http://host") == (
        "the W&B API key of user 'bob' cannot write to entity 'team' on http://host; it "
        "can write to a1, b2, bob")
    assert write_refusal(viewer_api(username=None, entity=None, teams=[]), "team", "p",
                         "http://host").endswith("it can write to nothing")
