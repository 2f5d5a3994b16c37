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
from wandb_server import FakeWandbServer
from wandb_server.fixtures import PROJECT, TEAM, user

from tmgg.jobs import wandb_check
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
    with pytest.raises(ValueError) as no_user:
        key_access(viewer_api())
    assert str(no_user.value) == "the API key has no W&B user"
    assert key_access(SimpleNamespace(viewer=SimpleNamespace(username=None))) == KeyAccess(
        "?", frozenset())  # a viewer that has no entity attribute at all
    assert write_refusal(viewer_api(username="bob", teams=["b2", "a1"]), "team", "proj",
                         "http://host") == (
        "the W&B API key of user 'bob' cannot write to entity 'team' on http://host; it "
        "can write to a1, b2, bob")
    assert write_refusal(viewer_api(username=None, entity=None, teams=[]), "team", "p",
                         "http://host").endswith("it can write to nothing")


def test_a_logger_choice_other_than_wandb_declares_from_its_own_file(tmp_path: Path) -> None:
    conf_dir = conf(tmp_path, logger="entity: w\nproject: wp\n")
    (conf_dir / "logger/csv.yaml").write_text("entity: c\n")
    assert declared_destination(master(logger="csv"), conf_dir)["entity"] == (
        "c", "conf/logger/csv.yaml")
    # An escaped interpolation is text that looks like one: not a declared destination.
    (conf_dir / "stage/st.yaml").write_text("logger:\n  entity: \\${team}\n")
    assert declared_destination(master(), conf_dir)["entity"] == (
        "w", "conf/logger/wandb.yaml")


def test_a_job_without_wandb_does_not_end_the_check(tmp_path: Path) -> None:
    expected = Expected(values={"entity": "team", "project": "proj"},
                        sources={"entity": "conf/stage/st.yaml", "project": "s"})
    csv = PlannedJob(index=0, job_id="c", run_name="c", stage="st", overrides=[],
                     sweep_config=None, task_config={"logger": {"name": "csv"}})
    with pytest.raises(PlanError, match="^job b: logger.entity: 'x' is not"):
        check_job_destinations([csv, job("f", tmgg=False), job("b", entity="x",
                                                               project="proj")], expected)


# -- the key's access, asked of the test W&B server (tests/wandb_server) --------------------
@pytest.fixture
def shell_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
              wandb_server: FakeWandbServer) -> Any:
    """Sets this shell's W&B key to a user's; each test asks the server afresh."""
    monkeypatch.setattr(wandb_check, "_ACCESS_CACHE", {})
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    def use(name: str) -> str:
        monkeypatch.setenv("WANDB_API_KEY", user(wandb_server, name).api_key)
        return name

    return use


def online(name: str, server: FakeWandbServer, entity: str = TEAM, project: str = PROJECT,
           mode: str = "online") -> PlannedJob:
    return job(name, entity=entity, project=project, mode=mode, base_url=server.base_url)


def test_online_jobs_need_a_key_that_may_write_there(
        wandb_server: FakeWandbServer, shell_key: Any) -> None:
    host = wandb_server.base_url
    shell_key("alice")
    wandb_check.check_online_access([online("a", wandb_server), online("b", wandb_server)])
    assert list(wandb_check._ACCESS_CACHE) == [f"{host}|{user(wandb_server, 'alice').api_key}"]
    wandb_check._ACCESS_CACHE.clear()
    shell_key("mallory")
    wandb_check.check_online_access([online("offline_job", wandb_server, mode="offline")])
    assert wandb_check._ACCESS_CACHE == {}  # an offline job asks nothing
    with pytest.raises(PlanError) as refused:
        wandb_check.check_online_access([online("m", wandb_server, mode="offline"),
                                         online("n", wandb_server)])
    assert str(refused.value) == (
        f"job n: logger.entity: the W&B API key of user 'mallory' cannot write to entity "
        f"'{TEAM}' on {host}; it can write to mallory")
    assert list(wandb_check._ACCESS_CACHE) == [f"{host}|{user(wandb_server, 'mallory').api_key}"]


def test_a_view_only_member_may_not_write_to_the_project(
        wandb_server: FakeWandbServer, shell_key: Any) -> None:
    host = wandb_server.base_url
    wandb_server.add_user("viewer2", view_only=[TEAM])
    wandb_server.plant_run(TEAM, "viewed2", "v1")
    shell_key("viewer2")
    with pytest.raises(PlanError) as refused:
        wandb_check.check_online_access([online("v", wandb_server, project="viewed2")])
    assert str(refused.value) == (
        f"job v: logger.project: the W&B API key of user 'viewer2' may only read "
        f"{TEAM}/viewed2 on {host} (a view-only member, or a restricted project)")
    import wandb

    api = wandb.Api(overrides={"base_url": host}, api_key=user(wandb_server, "viewer2").api_key)
    assert wandb_check.write_refusal(api, TEAM, "viewed2", host) == (
        f"the W&B API key of user 'viewer2' may only read {TEAM}/viewed2 on {host} (a "
        "view-only member, or a restricted project)")
    alice = wandb.Api(overrides={"base_url": host}, api_key=user(wandb_server, "alice").api_key)
    assert wandb_check.project_is_read_only(alice, TEAM, "viewed2") is False


def test_the_workers_key_is_asked_where_they_run(
        wandb_server: FakeWandbServer, shell_key: Any) -> None:
    host = wandb_server.base_url
    shell_key("alice")
    asked: list[tuple[str, str, str]] = []

    def answer(**reply: Any) -> Any:
        def ask(base_url: str, entity: str, project: str) -> dict[str, Any]:
            asked.append((base_url, entity, project))
            return reply
        return ask

    jobs = [online("a", wandb_server), online("b", wandb_server),
            online("c", wandb_server, mode="offline")]
    assert wandb_check.check_workers_key(jobs, answer(can_write=True, user="alice",
                                                      default_entity="alice"), "S") == []
    assert asked == [(host, TEAM, PROJECT)]  # one question per destination
    notes = wandb_check.check_workers_key(jobs, answer(can_write=True, user="bot",
                                                       default_entity="botland"), "S")
    assert notes == ["the workers' W&B key (S) belongs to 'bot' (default entity 'botland'), "
                     "this shell's to 'alice': reconcile with --workers-entity botland"]
    with pytest.raises(PlanError) as refused:
        wandb_check.check_workers_key(jobs, answer(can_write=False, user="mallory",
                                                   writable=["mallory", "m2"]), "S")
    assert str(refused.value) == (
        f"job a: logger.entity: the workers' W&B key (S) belongs to user 'mallory', which "
        f"cannot write to {TEAM}/{PROJECT} on {host} (it can write to entity mallory, m2); "
        f"this shell's key belongs to 'alice', which can write there. Put a key that can "
        f"write there in S. Nothing was dispatched")
    with pytest.raises(PlanError) as unchecked:
        wandb_check.check_workers_key(jobs, answer(error="timed out"), "S")
    assert str(unchecked.value) == (
        f"job a: logger.entity: cannot check that the workers' W&B key (S) may write to "
        f"'{TEAM}' on {host}: timed out; this shell's key belongs to 'alice', which can "
        f"write there. Nothing was dispatched")
    shell_key("mallory")
    wandb_check._ACCESS_CACHE.clear()
    with pytest.raises(PlanError, match="it can write to entity nothing\\); this shell's key "
                                        "belongs to 'mallory', which cannot write there"):
        wandb_check.check_workers_key(jobs, answer(can_write=False, user="x"), "S")


def test_the_refusal_names_every_entity_the_key_can_write_to(
        wandb_server: FakeWandbServer, shell_key: Any) -> None:
    shell_key("alice")
    with pytest.raises(PlanError) as refused:
        wandb_check.check_online_access([online("o", wandb_server, entity="other_team")])
    assert str(refused.value).endswith(f"it can write to alice, {TEAM}")


def test_the_whole_check_reads_the_given_conf_and_asks_online_jobs(
        wandb_server: FakeWandbServer, shell_key: Any, tmp_path: Path) -> None:
    shell_key("mallory")
    conf_dir = conf(tmp_path, stage="logger:\n  entity: team\n  project: proj\n")
    with pytest.raises(PlanError) as refused:
        check_wandb_destinations([job("w", entity="x", project="proj")], master(), conf_dir)
    assert str(refused.value).startswith(
        "job w: logger.entity: 'x' is not the sweep's destination 'team' (from "
        "conf/stage/st.yaml)")
    offline_ok = [job("ok", entity="team", project="proj"), job("f", tmgg=False)]
    check_wandb_destinations(offline_ok, master(), conf_dir)  # nothing online: no question
    with pytest.raises(PlanError, match="^job n: logger.entity: the W&B API key of user "
                                        "'mallory' cannot write to entity 'team'"):
        check_wandb_destinations([online("n", wandb_server, entity="team", project="proj")],
                                 master(), conf_dir)


def test_the_workers_are_asked_only_about_online_tmgg_jobs(
        wandb_server: FakeWandbServer, shell_key: Any) -> None:
    shell_key("alice")
    asked: list[str] = []

    def ask(base_url: str, entity: str, project: str) -> dict[str, Any]:
        asked.append(f"{entity}/{project}")
        return {"can_write": True, "user": "alice", "default_entity": "alice"}

    csv = PlannedJob(index=0, job_id="c", run_name="c", stage="st", overrides=[],
                     sweep_config=None, task_config={"logger": {"name": "csv"}})
    foreign = online("x", wandb_server, entity="elsewhere")
    foreign.is_tmgg_job = False
    assert wandb_check.check_workers_key([csv, foreign, online("a", wandb_server)], ask,
                                         "S") == []
    assert asked == [f"{TEAM}/{PROJECT}"]


def test_a_shell_without_a_key_is_named_beside_the_workers_refusal(
        wandb_server: FakeWandbServer, shell_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    refuse = {"can_write": False, "user": "mallory", "writable": ["mallory"]}
    with pytest.raises(PlanError) as refused:
        wandb_check.check_workers_key([online("a", wandb_server)], lambda *_: refuse, "S")
    assert "; this shell's key could not be checked (" in str(refused.value)
