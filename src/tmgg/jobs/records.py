"""Provenance attached to every ledger record: code version and library versions."""

from __future__ import annotations

import functools
import hashlib
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = ("torch", "lightning", "hydra-core", "wandb", "omegaconf", "modal")
REPO_ROOT = Path(__file__).resolve().parents[3]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether the tree had local changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO_ROOT, text=True, capture_output=True, timeout=5,
                                check=True).stdout
        version: dict[str, Any] = {"git_commit": commit, "git_dirty": bool(status.strip())}
        if version["git_dirty"]:
            # Which uncommitted changes: two dirty runs of one commit ran the same code
            # only if their diffs agree (``tmgg-sweep verify`` compares this).
            diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO_ROOT,
                                  capture_output=True, timeout=10, check=True).stdout
            version["git_diff_sha256"] = hashlib.sha256(diff).hexdigest()
        return version
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host() -> str:
    return socket.gethostname()
