"""Which W&B key is checked: the workers' own (a Modal Secret, asked where the workers
run) and the launching shell's, found the way wandb 0.31 finds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from wandb_server import FakeWandbServer
from wandb_server.fixtures import PROJECT, TEAM, online_env, user

from tmgg.jobs.compose import compose_sweep

LOCAL_MODAL = ["hydra/launcher=modal", "hydra.launcher.transport=local",
               "hydra.launcher.local_containers=1"]
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2"]


def dirs(root: Path) -> list[str]:
    return [f"experiments_dir={root / 'exp'}", f"outputs_dir={root / 'out'}"]


def test_workers_key_without_write_access_is_refused_before_dispatch_naming_both(
        wandb_server: FakeWandbServer, tmp_path: Path) -> None:
    """The shell's key (alice) may write to the team; the Secret's (mallory) may not."""
    env = online_env(tmp_path, user(wandb_server, "alice").api_key,
                     TMGG_LOCAL_WANDB_SECRET_KEY=user(wandb_server, "mallory").api_key)
    # The server is the module's: other tests' runs (planted or logged) may be on it.
    runs_before = wandb_server.runs_in()
    result = subprocess.run(
        [sys.executable, "-m", "tmgg.cli.app", "-m", "stage=smoke", "model=linear_pe", *TINY,
         *LOCAL_MODAL, "logger.mode=online", f"logger.base_url={wandb_server.base_url}",
         *dirs(tmp_path)], cwd=tmp_path, text=True, capture_output=True, env=env,
        timeout=600)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert ("the workers' W&B key (the local transport's Secret stand-in "
            "TMGG_LOCAL_WANDB_SECRET_KEY) belongs to user 'mallory', which cannot write to "
            f"{TEAM}/{PROJECT} on {wandb_server.base_url} (it can write to entity mallory); "
            "this shell's key belongs to 'alice', which can write there") in message
    assert "Nothing was dispatched" in message
    assert not list((tmp_path / "out").rglob("app.log"))  # no job started
    assert wandb_server.runs_in() == runs_before  # no run was created, anywhere


def test_workers_key_of_a_service_account_passes_and_names_its_default_entity(
        wandb_server: FakeWandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    from tmgg.jobs.plan import PlanError
    from tmgg.launch.modal.app import LOCAL_WANDB_SECRET_ENV, check_workers_wandb_key
    from tmgg.launch.modal.settings import check_settings

    bot = wandb_server.add_service_account("team-bot", TEAM)
    newcomer = wandb_server.add_user("newcomer", teams=["vision_team"],
                                     default_entity="vision_team", personal=False)
    sweep = compose_sweep(["stage=smoke", "model=linear_pe", *LOCAL_MODAL,
                           "logger.mode=online", f"logger.base_url={wandb_server.base_url}",
                           *dirs(tmp_path)])
    settings = check_settings(sweep.master_config.hydra.launcher)
    monkeypatch.setenv("WANDB_API_KEY", user(wandb_server, "alice").api_key)
    monkeypatch.setenv(LOCAL_WANDB_SECRET_ENV, bot.api_key)
    (note,) = check_workers_wandb_key(settings, sweep.jobs)
    assert note == ("the workers' W&B key (the local transport's Secret stand-in "
                    "TMGG_LOCAL_WANDB_SECRET_KEY) belongs to 'team-bot' (default entity "
                    f"'{TEAM}'), this shell's to 'alice': reconcile with --workers-entity "
                    f"{TEAM}")
    # A user created after 2024-05-21 has no personal entity: its team is its default.
    monkeypatch.setenv(LOCAL_WANDB_SECRET_ENV, newcomer.api_key)
    with pytest.raises(PlanError, match="belongs to user 'newcomer', which cannot write to "
                                        f"{TEAM}/{PROJECT}.*it can write to entity "
                                        ".*vision_team"):
        check_workers_wandb_key(settings, sweep.jobs)
    # Without a stand-in the local containers use this shell's key: nothing more to ask.
    monkeypatch.delenv(LOCAL_WANDB_SECRET_ENV)
    assert check_workers_wandb_key(settings, sweep.jobs) == []


def test_view_only_member_and_restricted_project_are_refused_with_the_services_403(
        wandb_server: FakeWandbServer, tmp_path: Path) -> None:
    """The server answers as the service does: ``permission denied``/PERMISSION_ERROR."""
    import json
    import urllib.request

    viewer = wandb_server.add_user("viewer", view_only=[TEAM])
    wandb_server.restrict(TEAM, "secret_project", members=["alice"])
    body = json.dumps({"operationName": "UpsertBucket", "query": "mutation UpsertBucket",
                       "variables": {"entity": TEAM, "project": "p", "name": "r1"}}).encode()
    request = urllib.request.Request(f"{wandb_server.base_url}/graphql", data=body,
                                     headers={"Authorization": f"Bearer {viewer.api_key}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert json.loads(refused.value.read()) == {
        "errors": [{"message": "permission denied", "path": ["upsertBucket"],
                    "extensions": {"code": "PERMISSION_ERROR"}}],
        "data": {"upsertBucket": None}}
    import wandb

    from tmgg.jobs.wandb_check import write_refusal

    # The viewer is in the team's list, as on the service; the project says read-only.
    wandb_server.plant_run(TEAM, "viewed_project", "v1")
    api = wandb.Api(overrides={"base_url": wandb_server.base_url}, api_key=viewer.api_key)
    assert write_refusal(api, TEAM, "viewed_project", wandb_server.base_url) == (
        f"the W&B API key of user 'viewer' may only read {TEAM}/viewed_project on "
        f"{wandb_server.base_url} (a view-only member, or a restricted project)")
    alice = wandb.Api(overrides={"base_url": wandb_server.base_url},
                      api_key=user(wandb_server, "alice").api_key)
    assert write_refusal(alice, TEAM, "viewed_project", wandb_server.base_url) is None
    bob = wandb_server.add_user("bob", teams=[TEAM])
    body = json.dumps({"operationName": "UpsertBucket", "query": "mutation UpsertBucket",
                       "variables": {"entity": TEAM, "project": "secret_project",
                                     "name": "r2"}}).encode()
    request = urllib.request.Request(f"{wandb_server.base_url}/graphql", data=body,
                                     headers={"Authorization": f"Bearer {bob.api_key}"})
    with pytest.raises(urllib.error.HTTPError) as restricted:
        urllib.request.urlopen(request, timeout=10)
    assert restricted.value.code == 403


# -- the shell's key, found as wandb finds it --------------------------------------------
def test_key_stored_by_wandb_031_login_under_its_default_host_makes_auto_online(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    from wandb.sdk.lib import urls

    from tmgg.task import loggers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(loggers, "_ANNOUNCED_OFFLINE", set())
    netrc = tmp_path / "netrc"
    key = "k" * 40
    host = urls.DEFAULT_BASE_URL.removeprefix("https://")  # what `wandb login` 0.31 writes
    netrc.write_text(f"machine {host}\n  login user\n  password {key}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert loggers.DEFAULT_BASE_URL == "https://api.wandb.ai" != urls.DEFAULT_BASE_URL
    found = loggers.find_wandb_api_key(loggers.DEFAULT_BASE_URL, {})
    assert found is not None and found.api_key == key and f"(machine {host})" in found.source
    assert loggers.decide_wandb_mode("auto", loggers.DEFAULT_BASE_URL, {}).mode == "online"
    # wandb itself would look for api.wandb.ai only: the run is given the key.
    assert loggers._key_under_another_name(loggers.DEFAULT_BASE_URL, "online") == {
        "api_key": key}
    assert "W&B OFFLINE" not in capsys.readouterr().err

    netrc.write_text("machine example.org\n  login user\n  password other\n")
    for _ in range(3):
        assert loggers.decide_wandb_mode("auto", loggers.DEFAULT_BASE_URL, {}).mode == \
            "offline"
    err = capsys.readouterr().err
    assert err.count("W&B OFFLINE") == 1  # once, loudly, with the reason
    assert (f"no W&B API key: WANDB_API_KEY is not set and {netrc} has no entry for "
            f"api.wandb.ai, {host}") in " ".join(err.split())
