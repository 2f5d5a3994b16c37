"""Refusals of a command line before anything is composed: the mistakes a newcomer
makes in the first hour, each answered with the command to type instead.

Standard library only: ``tmgg-train`` and ``tmgg-sweep`` call these before importing
Hydra, so a refusal costs nothing and names the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from tmgg.config.project_files import locate_conf_dir

# tmgg-sweep commands that read or act on one stage's ledger: without ``stage=`` they
# would quietly act on the default stage ``adhoc``.
STAGE_COMMANDS = frozenset({"resume", "status", "reconcile", "report", "sync"})


def _key(argument: str) -> str:
    """The key of an override (``+launcher=modal`` -> ``launcher``); '' for an option."""
    if argument.startswith("-") or "=" not in argument:
        return ""
    return argument.split("=", 1)[0].lstrip("+~")


def launcher_override_refusal(arguments: Sequence[str]) -> str | None:
    """``launcher=modal`` is not a tmgg key: Hydra's hint (``+launcher=modal``) would add
    an undeclared key that the schema then refuses. Name the override that works."""
    for argument in arguments:
        if _key(argument) == "launcher":
            value = argument.split("=", 1)[1] or "<name>"
            return (f"{argument!r} is not an override tmgg knows: the launcher is Hydra's "
                    f"config group, so write hydra/launcher={value} "
                    "(local, modal, slurm or submitit_local_tmgg)")
    return None


def known_stages() -> list[str]:
    """The stages of conf/stage/, by name."""
    return sorted(path.stem for path in (locate_conf_dir() / "stage").glob("*.yaml"))


def missing_stage_refusal(command: str, arguments: Sequence[str]) -> str | None:
    """A stage command without ``stage=`` (``--help`` aside): which stage to name."""
    if command not in STAGE_COMMANDS:
        return None
    if any(argument in ("-h", "--help") for argument in arguments):
        return None
    if any(_key(argument) == "stage" for argument in arguments):
        return None
    stages = ", ".join(known_stages())
    return (f"name the stage it acts on, e.g. `tmgg-sweep {command} stage=smoke` "
            f"(stages: {stages})")
