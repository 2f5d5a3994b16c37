"""tmgg's locked environment: ``make lock`` writes it, ``make lock-check`` (CI) checks it.

Three files under ``src/tmgg/lock/`` (package data, ``tmgg.config.lockfile``, so a Modal
image can be built from a non-editable install too):

- ``requirements.lock``: every dependency of ``tmgg[dev]`` except torch, pinned with
  hashes, resolved by uv for every platform (``--universal``) from pyproject's lowest
  Python on. Its header records a digest of pyproject's dependency tables, so CI can
  tell offline whether someone changed pyproject.toml without running ``make lock``.
- ``torch.txt``: torch's exact version, without hashes. torch is installed on its own
  because its wheel differs per machine: a CPU build from a local wheel folder where
  pip is configured with one (``find-links``), PyPI's wheel elsewhere (on Linux
  x86_64 a CUDA build that brings its own ``nvidia-*`` / ``triton`` runtime, pinned
  exactly by torch's metadata). The CUDA runtime is therefore excluded from the lock;
  torch's other dependencies (sympy, filelock, jinja2, ...) are in it.
- ``uv.txt``: the uv release that installs the lock, with hashes (pip bootstraps it).

Run with the project's interpreter (``.venv/bin/python tools/envlock.py lock|check``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tmgg.config.lockfile import (
    LOCK_DIR,
    REQUIREMENTS_LOCK,
    TORCH_LOCK,
    UV_LOCK,
    LockError,
    Pin,
    canonical,
    parse_pins,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK_NAME, TORCH_NAME, UV_NAME = REQUIREMENTS_LOCK.name, TORCH_LOCK.name, UV_LOCK.name
EXTRAS = ("dev",)
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "
# torch's GPU runtime: packages its Linux wheel pulls in that the CPU build does not.
CUDA_RUNTIME = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")


def _load_pyproject(path: Path = PYPROJECT) -> dict:
    try:
        import tomllib
    except ImportError as error:  # Python 3.10: the lock tools need 3.11's tomllib
        raise LockError("tools/envlock.py needs Python 3.11 or newer (tomllib)") from error

    return tomllib.loads(path.read_text())


def dependency_digest(pyproject: dict) -> str:
    """sha256 of what the lock is resolved from: requires-python and the dependency tables."""
    project = pyproject["project"]
    source = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {extra: sorted(reqs) for extra, reqs in
                                  sorted(project.get("optional-dependencies", {}).items())},
    }
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def _lowest_python(requires_python: str) -> str:
    match = re.search(r">=\s*(\d+\.\d+)", requires_python)
    if not match:
        raise LockError(f"requires-python {requires_python!r} has no lower bound (>=X.Y)")
    return match.group(1)


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _compile(args: Iterable[str]) -> str:
    result = subprocess.run([_uv(), "pip", "compile", "--quiet", *args],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise LockError(f"uv pip compile failed:\n{result.stderr}")
    return result.stdout


def write_lock(lock_dir: Path = LOCK_DIR) -> None:
    """Resolve pyproject.toml with uv and write the three lock files."""
    pyproject = _load_pyproject()
    common = ["pyproject.toml", *(f"--extra={extra}" for extra in EXTRAS), "--universal",
              "--python-version", _lowest_python(pyproject["project"]["requires-python"])]
    # Pass 1: the full resolution, to learn torch's version and its CUDA runtime's names.
    full = parse_pins(_compile([*common, "--no-header", "--no-annotate"]))
    torch_versions = sorted({pin.version for pin in full if pin.name == "torch"})
    if len(torch_versions) != 1:
        raise LockError(f"expected one torch version in the resolution, got {torch_versions}")
    cuda = sorted({pin.name for pin in full if CUDA_RUNTIME.match(pin.name)})
    lock_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        excludes = Path(tmp) / "excludes.txt"
        excludes.write_text("".join(f"{name}\n" for name in cuda))
        # Pass 2: everything but torch and its CUDA runtime, with hashes.
        body = _compile([*common, "--generate-hashes", "--no-emit-package", "torch",
                         "--excludes", str(excludes), "--custom-compile-command", "make lock"])
    header = (f"# tmgg's locked environment (every dependency but torch, with hashes). "
              f"Written by `make lock` from pyproject.toml; do not edit.\n"
              f"{DIGEST_PREFIX}{dependency_digest(pyproject)}\n")
    (lock_dir / LOCK_NAME).write_text(header + body)
    (lock_dir / TORCH_NAME).write_text(
        "# torch's locked version (installed apart from requirements.lock: see the Makefile)\n"
        f"torch=={torch_versions[0]}\n")
    uv_version = subprocess.run([_uv(), "--version"], capture_output=True, text=True,
                                check=True).stdout.split()[1]
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "uv.in"
        request.write_text(f"uv=={uv_version}\n")
        uv_lock = _compile([str(request), "--generate-hashes", "--no-header", "--no-annotate"])
    (lock_dir / UV_NAME).write_text("# the uv that installs requirements.lock (`make lock`)\n"
                                    + uv_lock)


def check_lock(pyproject_path: Path = PYPROJECT, lock_dir: Path = LOCK_DIR) -> list[Pin]:
    """Raise LockError unless the lock files were written from this pyproject.toml.

    Checks the recorded digest of the dependency tables, that every pin has hashes,
    and that every requirement of pyproject.toml (torch's via torch.txt) is met by
    the locked version(s) of its package.
    """
    from packaging.requirements import Requirement

    pyproject = _load_pyproject(pyproject_path)
    lock_text = (lock_dir / LOCK_NAME).read_text()
    recorded = next((line.removeprefix(DIGEST_PREFIX).strip() for line in lock_text.splitlines()
                     if line.startswith(DIGEST_PREFIX)), None)
    if recorded != dependency_digest(pyproject):
        raise LockError(f"{lock_dir / LOCK_NAME} was not written from this pyproject.toml's "
                        "dependencies: run `make lock` and commit the result")
    pins = parse_pins(lock_text)
    unhashed = [pin.name for pin in pins if not pin.hashes]
    if unhashed:
        raise LockError(f"pins without hashes in {LOCK_NAME}: {', '.join(unhashed)}")
    torch = parse_pins((lock_dir / TORCH_NAME).read_text())
    uv_pins = parse_pins((lock_dir / UV_NAME).read_text())
    if [pin.name for pin in torch] != ["torch"] or [pin.name for pin in uv_pins] != ["uv"]:
        raise LockError(f"{TORCH_NAME} must pin torch alone and {UV_NAME} uv alone")
    if not uv_pins[0].hashes:
        raise LockError(f"{UV_NAME} has no hashes")
    by_name: dict[str, list[Pin]] = {}
    for pin in [*pins, *torch]:
        by_name.setdefault(pin.name, []).append(pin)
    project = pyproject["project"]
    wanted = [*project.get("dependencies", []),
              *(req for extra in EXTRAS
                for req in project.get("optional-dependencies", {}).get(extra, []))]
    for text in wanted:
        requirement = Requirement(text)
        locked = by_name.get(canonical(requirement.name))
        if not locked:
            raise LockError(f"pyproject.toml requires {text!r}; the lock has no "
                            f"{requirement.name}: run `make lock`")
        for pin in locked:
            if not requirement.specifier.contains(pin.version, prereleases=True):
                raise LockError(f"pyproject.toml requires {text!r}; the lock pins "
                                f"{pin.name}=={pin.version}: run `make lock`")
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["lock", "check"])
    args = parser.parse_args(argv)
    try:
        if args.command == "lock":
            write_lock()
            print(f"wrote {LOCK_DIR.relative_to(ROOT)}/{{{LOCK_NAME},{TORCH_NAME},{UV_NAME}}}")
        else:
            pins = check_lock()
            print(f"lock ok: {len(pins)} pins with hashes agree with pyproject.toml")
    except LockError as error:
        print(f"envlock: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
