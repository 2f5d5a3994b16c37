"""tmgg's locked environment, shipped as package data (``src/tmgg/lock/``).

``make install`` installs it into ``.venv`` and ``tmgg.launch.modal.app.build_image``
into every Modal container, so both run the same versions. Being package data, it is
found the same way in a checkout, a non-editable install and a container.
``tools/envlock.py`` writes it (``make lock``) and checks it (``make lock-check``).

- ``requirements.lock``: every dependency of ``tmgg[dev]`` but torch, with hashes.
- ``torch.txt``: torch's version (its wheel differs per machine: see the Makefile).
- ``uv.txt``: the uv release that installs the lock, with hashes.

Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR = Path(__file__).resolve().parents[1] / "lock"
REQUIREMENTS_LOCK = LOCK_DIR / "requirements.lock"
TORCH_LOCK = LOCK_DIR / "torch.txt"
UV_LOCK = LOCK_DIR / "uv.txt"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


class LockError(RuntimeError):
    """A lock file that is damaged or disagrees with pyproject.toml."""


@dataclass
class Pin:
    """One ``name==version ; marker`` entry of a lock file, with its hashes."""

    name: str  # normalised (PEP 503)
    version: str
    marker: str | None
    hashes: list[str] = field(default_factory=list)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> list[Pin]:
    """The exact pins of a uv-compiled requirements file; anything else is a LockError."""
    pins: list[Pin] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            if not pins:
                raise LockError(f"a hash before any requirement: {line!r}")
            pins[-1].hashes.append(line.removeprefix("--hash=").rstrip(" \\"))
            continue
        match = _PIN.match(line)
        if not match:
            raise LockError(f"not an exact pin: {line!r}")
        name, version, marker = match.groups()
        pins.append(Pin(canonical(name), version, marker.strip() if marker else None))
    return pins


def locked_version(name: str, lock_file: Path) -> str:
    """The one version ``lock_file`` pins for ``name``."""
    versions = {pin.version for pin in parse_pins(lock_file.read_text())
                if pin.name == canonical(name)}
    if len(versions) != 1:
        raise LockError(f"{lock_file} pins {name} {len(versions)} times, not once")
    return versions.pop()
