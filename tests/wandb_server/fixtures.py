"""pytest fixtures for the fake W&B server (loaded by ``tests/conftest.py``).

``wandb_server`` is module-scoped: one server per test module, so a module can share
one small sweep between its tests, and modules do not see each other's runs. Its
users: ``alice`` (personal entity ``alice``, member of ``graph_denoise_team``, the
stages' entity) and ``mallory`` (no team). At teardown the server must not have been
asked for anything it does not implement.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from .server import WANDB_VERSION, FakeWandbServer, User

TEAM = "graph_denoise_team"
PROJECT = "spectral_denoising"


def require_pinned_wandb() -> None:
    """The fake speaks wandb WANDB_VERSION's protocol; another version is a clear skip."""
    installed = version("wandb")
    if installed != WANDB_VERSION:
        pytest.skip(f"the fake W&B server is written against wandb {WANDB_VERSION}; "
                    f"wandb {installed} is installed (check tests/wandb_server/server.py "
                    "against its GraphQL operations, then update WANDB_VERSION)")


@pytest.fixture(scope="module")
def wandb_server() -> Iterator[FakeWandbServer]:
    require_pinned_wandb()
    server = FakeWandbServer().start()
    server.add_user("alice", teams=[TEAM])
    server.add_user("mallory")
    try:
        yield server
    finally:
        server.stop()
    server.assert_understood()


def user(server: FakeWandbServer, name: str) -> User:
    return next(u for u in server.users.values() if u.username == name)


def online_env(root: Path, api_key: str | None, **extra: str) -> dict[str, str]:
    """A job's environment: this process's, minus every W&B/Modal/test variable, with
    wandb's config, cache and data dirs under ``root`` and the given key."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "MODAL_TOKEN", "TEST_"))}
    env.update(WANDB_CONFIG_DIR=str(root / "wandb-config"),
               WANDB_CACHE_DIR=str(root / "wandb-cache"),
               WANDB_DATA_DIR=str(root / "wandb-data"), WANDB_SILENT="true",
               TMGG_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if api_key:
        env["WANDB_API_KEY"] = api_key
    env.update(extra)
    return env
