"""The import layers of DESIGN.md: cli > launch > run > jobs > task > config.

import-linter (``make layers``) checks them on the real tree; a copy of the tree with
one upward import, even a lazy one inside a function, must fail the same check, so the
contract cannot pass by checking nothing. The launchers hand their hooks to the state
machine (``tmgg.jobs.launcher_hooks``), found by the sweep's ``_target_``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on ``tree`` (its pyproject.toml and src/), with no cache."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_of_the_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "lock"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "tmgg's layers: cli > launch > run > jobs > task > config KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward_import", "broken"),
    [
        # the state machine reaching into a launcher, lazily (what jobs/sweep.py did)
        ("tmgg/jobs/ledger.py",
         "\n\ndef _upward():\n    from tmgg.launch.common import build_payload\n"
         "    return build_payload\n",
         "tmgg.jobs is not allowed to import tmgg.launch"),
        # the task importing a launcher's module (what task/loggers.py did)
        ("tmgg/task/scratch.py", "\nimport tmgg.launch.modal.volume_files  # noqa\n",
         "tmgg.task is not allowed to import tmgg.launch"),
        # the package root importing a launcher (what tmgg/__init__ did) breaks the layers
        # of everything that imports tmgg
        ("tmgg/__init__.py", "\nimport tmgg.launch.slurm_resources  # noqa\n",
         "is not allowed to import tmgg.launch"),
        # the config layer pulling in torch
        ("tmgg/config/slurm_time.py", "\nimport torch  # noqa\n",
         "tmgg.config is not allowed to import torch"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str,
                                              upward_import: str, broken: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    target = tree / "src" / module
    target.write_text(target.read_text() + upward_import)
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert broken in result.stdout, result.stdout


def test_no_import_cycle_spans_two_layers() -> None:
    """The circle of launch/ and orchestration/ (19 modules with tmgg/__init__) is gone:
    what cycles remain stay inside one package (claims and ledger, say)."""
    import grimp
    import networkx as nx

    graph = grimp.build_graph("tmgg", cache_dir=None)
    imports = nx.DiGraph((module, imported) for module in graph.modules
                         for imported in graph.find_modules_directly_imported_by(module))
    cycles = [sorted(c) for c in nx.strongly_connected_components(imports) if len(c) > 1]
    for cycle in cycles:
        assert len({module.rsplit(".", 1)[0] for module in cycle}) == 1, cycle
    assert all(len(cycle) <= 3 for cycle in cycles), cycles


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_tmgg_loads_no_launcher_and_nothing_heavy() -> None:
    loaded = run_python(
        "import sys, tmgg\n"
        "from omegaconf import OmegaConf\n"
        "assert OmegaConf.has_resolver('tmgg.slurm_minutes')\n"
        "assert OmegaConf.has_resolver('tmgg.job_id')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tmgg.launch', 'tmgg.jobs',"
        " 'tmgg.run', 'tmgg.cli', 'tmgg.task', 'torch', 'lightning', 'modal', 'wandb'))))")
    assert loaded == "[]"


def test_the_state_machine_finds_each_launchers_hooks_by_its_target() -> None:
    """A fresh process: nothing registered until Hydra's plugin scan, which the lookup
    runs itself; tmgg's launchers, both submitit families and ``basic`` are told apart."""
    found = run_python(
        "from omegaconf import OmegaConf\n"
        "from tmgg.jobs import launcher_hooks as hooks\n"
        "assert not hooks._LAUNCHERS and not hooks._CALL_PROBES\n"
        "def named(target):\n"
        "    found = hooks.configured_launcher(OmegaConf.create("
        "{'hydra': {'launcher': {'_target_': target}}}))\n"
        "    return None if found is None else found.__name__\n"
        "print(named('hydra_plugins.tmgg_launchers.modal_launcher.TmggModalLauncher'))\n"
        "print(named('hydra_plugins.tmgg_launchers.local_launcher.TmggLocalLauncher'))\n"
        "print(named('hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher'))\n"
        "print(named('hydra_plugins.tmgg_launchers.submitit_launchers.TmggSlurmLauncher'))\n"
        "print(named('hydra._internal.core_plugins.basic_launcher.BasicLauncher'))\n"
        "print(len(hooks._CALL_PROBES))\n")
    assert found.splitlines() == ["TmggModalLauncher", "TmggLocalLauncher", "SubmititHooks",
                                  "SubmititHooks", "None", "1"]


def test_the_submitit_preflight_refuses_through_the_registry() -> None:
    """The check that launch/common.py ran by import now comes through the hook."""
    refused = run_python(
        "from omegaconf import OmegaConf\n"
        "from tmgg.jobs.launcher_hooks import run_preflight\n"
        "from tmgg.launch.cost import LauncherSettingError\n"
        "cfg = OmegaConf.create({'hydra': {'launcher': {'_target_': "
        "'hydra_plugins.tmgg_launchers.submitit_launchers.TmggSubmititLocalLauncher',"
        " 'timeout_min': 0}}})\n"
        "try:\n"
        "    run_preflight(cfg, [])\n"
        "except LauncherSettingError as error:\n"
        "    print(error)\n")
    assert "hydra.launcher.timeout_min" in refused


def test_a_call_no_launcher_can_poll_counts_as_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a registered probe a claim held by a detached call is never taken."""
    from tmgg.jobs import launcher_hooks

    monkeypatch.setattr(launcher_hooks, "_CALL_PROBES", [])
    monkeypatch.setattr(launcher_hooks, "_discover_plugins", lambda: None)
    assert launcher_hooks.call_alive(None, "fc-unknown") is True
    launcher_hooks.register_call_probe(lambda ledger, call_id: call_id == "fc-live")
    assert launcher_hooks.call_alive(None, "fc-live") is True
    assert launcher_hooks.call_alive(None, "fc-ended") is False
