"""The locked environment (issue 15): the lock, `make install`, and the Modal image.

The fast tests check the committed lock against pyproject.toml and the versions the
code was checked against. The slow ones build things for real: a wheel installed
non-editable (the Modal image must still find its sources), and the README's set-up
commands in a fresh copy of the checkout with an interpreter that refuses global
installs (PEP 668), as on a current Debian or Ubuntu.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.markers import Marker

from tmgg.config.lockfile import (
    REQUIREMENTS_LOCK,
    TORCH_LOCK,
    UV_LOCK,
    LockError,
    locked_version,
    parse_pins,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import envlock  # noqa: E402  (tools/ is not a package)


def _copy_lock(tmp_path: Path) -> Path:
    lock_dir = tmp_path / "lock"
    shutil.copytree(REQUIREMENTS_LOCK.parent, lock_dir)
    return lock_dir


def _pyproject_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "pyproject.toml").read_text()
    assert old in text
    path = tmp_path / "pyproject.toml"
    path.write_text(text.replace(old, new))
    return path


def test_committed_lock_agrees_with_pyproject() -> None:
    pins = envlock.check_lock()
    names = {pin.name for pin in pins}
    assert {"wandb", "modal", "lightning", "hydra-core", "pytest", "sympy"} <= names
    assert "torch" not in names and not any(envlock.CUDA_RUNTIME.match(n) for n in names)
    assert all(pin.hashes for pin in pins)


def test_changed_dependency_fails_the_check(tmp_path: Path) -> None:
    pyproject = _pyproject_with(tmp_path, '"rich>=13",', '"rich>=13",\n    "tqdm>=4",')
    with pytest.raises(LockError, match="make lock"):
        envlock.check_lock(pyproject, _copy_lock(tmp_path))


def test_lock_outside_pyproject_range_fails_even_with_matching_digest(tmp_path: Path) -> None:
    """A hand-edited digest does not hide a pin that pyproject's range excludes."""
    pyproject = _pyproject_with(tmp_path, '"wandb>=0.17,<1"', '"wandb>=0.17,<0.30"')
    lock_dir = _copy_lock(tmp_path)
    lock = lock_dir / REQUIREMENTS_LOCK.name
    digest = envlock.dependency_digest(envlock._load_pyproject(pyproject))
    lock.write_text(re.sub(r"(?m)^(# pyproject-dependencies-sha256: ).*$", rf"\g<1>{digest}",
                           lock.read_text()))
    with pytest.raises(LockError, match=r"wandb==0\.31\.0"):
        envlock.check_lock(pyproject, lock_dir)


def test_a_pin_without_hashes_fails_the_check(tmp_path: Path) -> None:
    lock_dir = _copy_lock(tmp_path)
    lock = lock_dir / REQUIREMENTS_LOCK.name
    text = lock.read_text()
    # cut the hashes of the modal pin: its line then ends the requirement
    text = re.sub(r"(?m)^modal==([^\s]+) \\\n(    --hash=\S+(?: \\)?\n)+", r"modal==\1\n", text)
    lock.write_text(text)
    with pytest.raises(LockError, match="without hashes.*modal"):
        envlock.check_lock(REPO / "pyproject.toml", lock_dir)


def test_checked_versions_are_the_locked_ones() -> None:
    """Moving wandb or modal in the lock fails here until the code is re-checked."""
    from tmgg.cli import reconcile
    from tmgg.launch.modal import app as modal_app
    from tmgg.launch.modal import transport as modal_transport
    from tmgg.task import loggers, wandb_guard

    wandb = locked_version("wandb", REQUIREMENTS_LOCK)
    modal = locked_version("modal", REQUIREMENTS_LOCK)
    assert [m.WANDB_CHECKED_VERSION for m in (wandb_guard, loggers, reconcile)] == [wandb] * 3
    assert [m.MODAL_CHECKED_VERSION for m in (modal_app, modal_transport)] == [modal] * 2


def test_image_build_warns_when_local_pickle_packages_are_not_the_locked_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from importlib import metadata

    from tmgg.launch.modal import app as modal_app

    local = metadata.version("omegaconf")
    lock = tmp_path / "requirements.lock"
    lock.write_text(re.sub(r"(?m)^omegaconf==\S+", "omegaconf==0.0.1",
                           REQUIREMENTS_LOCK.read_text()))
    with caplog.at_level("WARNING", logger=modal_app.__name__):
        modal_app._warn_if_not_locked(lock)
    assert f"omegaconf {local} is installed here but the Modal image has the lock's 0.0.1" \
        in caplog.text
    assert "make install" in caplog.text


def _checkout_copy(destination: Path) -> Path:
    """The files a fresh clone of this working tree would have (tracked and new)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


_IMAGE_PROBE = """
import json
from tmgg.launch.modal.app import ImageSources, build_image
sources = ImageSources.installed()
build_image(sources)
print(json.dumps({"lock": str(sources.requirements_lock), "torch": str(sources.torch_lock),
                  "uv": sources.uv_version, "conf": str(sources.conf_dir),
                  "packages": {k: str(v) for k, v in sources.packages.items()}}))
"""


@pytest.mark.slow
def test_modal_image_builds_from_a_non_editable_install(tmp_path: Path) -> None:
    """`pip install .` (a wheel, no checkout around it) can still build the image."""
    source = _checkout_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("tmgg-*.whl"))
    # A bare environment that sees this one's dependencies but not its editable tmgg.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                                   "'purelib'))"], capture_output=True, text=True,
                                  check=True).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps",
                    wheel], check=True)
    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([python, "-c", _IMAGE_PROBE], cwd=outside, capture_output=True,
                            text=True, env={**os.environ, "TMGG_CONF_DIR": str(conf)})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for path in [found["lock"], found["torch"], *found["packages"].values()]:
        assert Path(path).is_relative_to(purelib), path
    assert Path(found["lock"]).read_text() == REQUIREMENTS_LOCK.read_text()
    assert set(found["packages"]) == {"tmgg", "hydra_plugins/tmgg_launchers",
                                      "hydra_plugins/tmgg_sweepers"}
    assert found["uv"] == locked_version("uv", UV_LOCK)
    assert found["conf"] == str(conf)


def _refusing_interpreter(root: Path) -> Path:
    """A throwaway copy of this Python whose stdlib carries PEP 668's marker."""
    base = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_path("stdlib"))
    lib = root / "lib" / stdlib.name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        (lib / entry.name).symlink_to(entry)
    (lib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=a throwaway system Python: use a virtual environment\n")
    (root / "bin").mkdir()
    shutil.copy2(base, root / "bin" / "python3")
    return root / "bin"


def _readme_setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _site_packages_snapshot(venv: Path) -> dict[str, tuple[int, int]]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return {str(p.relative_to(site)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in site.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _venv_versions(python: Path) -> tuple[dict[str, str], dict[str, str]]:
    probe = ("import json, sys, importlib.metadata as m, platform\n"
             "from packaging.markers import default_environment\n"
             "print(json.dumps([{d.metadata['Name'].lower().replace('_', '-'): d.version "
             "for d in m.distributions()}, default_environment()]))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    installed, environment = json.loads(out.stdout)
    return installed, environment


FRESH_CLONE_ONLY_IN_CI = pytest.mark.skipif(
    os.environ.get("CI") != "true",
    reason="installs .venv from scratch in a fresh copy (about a minute each); runs under CI=true")


def _fresh_checkout_env(tmp_path: Path) -> dict[str, str]:
    """A shell whose only python3 is a throwaway interpreter that refuses global installs."""
    bin_dir = _refusing_interpreter(tmp_path / "python")
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS",
                          "MAKELEVEL", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")}
    env.update(PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", PIP_REQUIRE_VIRTUALENV="1",
               WANDB_MODE="offline")
    env.pop("PYTEST_ADDOPTS", None)
    # Both refusals hold on their own: the PEP 668 marker, and pip's own switch.
    marker_only = {k: v for k, v in env.items() if k != "PIP_REQUIRE_VIRTUALENV"}
    for probe_env, refusal in ((marker_only, "externally-managed"), (env, "virtualenv")):
        refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "six"],
                                 env=probe_env, capture_output=True, text=True)
        assert refused.returncode != 0 and refusal in refused.stderr + refused.stdout
    return env


def _make(checkout: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(["make", *args], cwd=checkout, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout[-3000:]}" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def _assert_locked_environment(venv: Path) -> None:
    installed, environment = _venv_versions(venv / "bin" / "python")
    for pin in parse_pins(REQUIREMENTS_LOCK.read_text()):
        if pin.marker is None or Marker(pin.marker).evaluate(environment):
            assert installed.get(pin.name) == pin.version, pin
    assert installed["torch"].split("+")[0] == locked_version("torch", TORCH_LOCK)
    assert installed["tmgg"] == "0.1.0"
    assert (venv / "bin" / "tmgg-train").exists()


def test_readme_names_the_two_commands() -> None:
    """The README's set-up block is the two commands a newcomer types, nothing before them."""
    assert _readme_setup_commands()[:2] == ["make smoke", "make test"]


@pytest.mark.slow
@FRESH_CLONE_ONLY_IN_CI
def test_make_smoke_then_make_test_fast_on_a_fresh_clone(tmp_path: Path) -> None:
    """`make smoke` with no `make install` before it: it makes .venv from the lock, runs
    the smoke sweep to the end; run again, it installs nothing; a newer lock reinstalls,
    and `make test-fast` is such a target: it brings .venv up to date and passes.

    One fresh copy for both targets (each build of .venv from scratch costs about a
    minute): both reach .venv through the same rule, and test-fast's share of it is
    proven by the reinstall a newer lock makes it do."""
    env = _fresh_checkout_env(tmp_path)
    checkout = _checkout_copy(tmp_path / "checkout")
    assert not (checkout / ".venv").exists()
    _make(checkout, env, "smoke", "OVERRIDES=trainer.max_steps=4 trainer.val_check_interval=2")
    venv = checkout / ".venv"
    _assert_locked_environment(venv)
    ledger = (checkout / "experiments" / "smoke" / "ledger.jsonl").read_text()
    outcomes = [json.loads(line) for line in ledger.splitlines() if '"outcome"' in line]
    assert len(outcomes) == 6 and {o["status"] for o in outcomes} == {"FINISHED"}, outcomes

    before = _site_packages_snapshot(venv)
    assert "uv pip install" not in _make(checkout, env, "-n", "status", "STAGE=smoke")
    _make(checkout, env, "status", "STAGE=smoke")
    assert _site_packages_snapshot(venv) == before, "a second target changed .venv"
    # A changed lock (or pyproject.toml) brings .venv up to date at the next target.
    os.utime(checkout / "src" / "tmgg" / "lock" / "requirements.lock")
    assert "uv pip install" in _make(checkout, env, "-n", "status", "STAGE=smoke")

    # `make test-fast` with no `make install` before it: it installs from the (newer)
    # lock, then runs the tests it is given and passes.
    output = _make(checkout, env, "test-fast",
                   "PYTEST_ARGS=tests/test_noise.py -p no:cacheprovider")
    assert "uv pip install" in output, output[-2000:]
    assert re.search(r"\b\d+ passed\b", output), output[-2000:]
    _assert_locked_environment(venv)
    assert "uv pip install" not in _make(checkout, env, "-n", "status", "STAGE=smoke")
