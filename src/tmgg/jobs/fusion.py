"""Which jobs of a sweep train together: fusion by declaration.

Two jobs see the very same training batches and evaluation sets when their data,
noise, seed and trainer settings agree (the stream depends on nothing else); they
may differ in the model, k, optimiser, schedule, weight decay and clipping. The
launcher groups such jobs when ``hydra.launcher.fuse=auto`` and runs each group as
one task (``tmgg.task.fused``); ``fuse=off`` runs every job alone.
``fuse_max_members`` caps a group; a larger set is split into near-equal groups.

Imports nothing heavy: the plan command and the launchers call it at start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.jobs.plan import PlanError, PlannedJob

FUSE_MODES = ("auto", "off")
DEFAULT_MAX_MEMBERS = 64
#: Trainer keys a member may set for itself (the rest fix the group's Trainer).
MEMBER_TRAINER_KEYS = frozenset({"gradient_clip_val", "test_checkpoint"})


def fusion_settings(config: DictConfig | dict[str, Any] | None) -> tuple[str, int]:
    """``(fuse, fuse_max_members)`` of a sweep's launcher config, checked.

    Launchers without these keys (Hydra's basic, submitit) run every job alone.
    """
    if config is None:
        return "off", 1
    if isinstance(config, DictConfig):
        launcher = OmegaConf.select(config, "hydra.launcher") or {}
    else:
        launcher = config
    mode = launcher.get("fuse", None)
    if mode is None:
        return "off", 1
    mode = str(mode)
    if mode not in FUSE_MODES:
        raise PlanError(f"hydra.launcher.fuse: {mode!r} is not one of {', '.join(FUSE_MODES)}")
    cap = launcher.get("fuse_max_members", DEFAULT_MAX_MEMBERS)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise PlanError(f"hydra.launcher.fuse_max_members: {cap!r} is not an integer >= 1")
    return mode, int(cap)


def stream_key(task_config: dict[str, Any]) -> str | None:
    """What fixes a job's batch stream and its group's Trainer; None: never fused."""
    if not task_config or "trainer" not in task_config or "data" not in task_config:
        return None
    trainer = {k: v for k, v in task_config["trainer"].items() if k not in MEMBER_TRAINER_KEYS}
    if not trainer.get("checkpoint", True) and trainer.get("resume", True):
        trainer["resume"] = False  # without checkpoints nothing resumes either way
    return json.dumps({"data": task_config["data"], "noise": task_config.get("noise"),
                       "seed": task_config.get("seed"), "trainer": trainer},
                      sort_keys=True, default=str)


def bank_key(job: PlannedJob) -> tuple[str, str]:
    """The stacked bank a job's model joins in a fused group (architecture and settings)."""
    model = job.task_config.get("model") or {}
    return str(model.get("name")), json.dumps(model, sort_keys=True, default=str)


def group_jobs(jobs: Sequence[PlannedJob], mode: str = "auto",
               max_members: int = DEFAULT_MAX_MEMBERS) -> list[list[int]]:
    """Positions of ``jobs`` grouped by batch stream, in first-appearance order.

    A group lists its members by architecture and model settings (so each stacked
    bank is contiguous); one beyond ``max_members`` is split into near-equal groups.
    Jobs that are not tmgg jobs, and every job when ``mode`` is off, stay alone.
    """
    if mode not in FUSE_MODES:
        raise PlanError(f"hydra.launcher.fuse: {mode!r} is not one of {', '.join(FUSE_MODES)}")
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for position, job in enumerate(jobs):
        key = stream_key(job.task_config) if job.is_tmgg_job and mode == "auto" else None
        key = key if key is not None else f"#solo{position}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(position)
    out: list[list[int]] = []
    for key in order:
        members = sorted(groups[key], key=lambda p: (bank_key(jobs[p]), p))
        out += near_equal_parts(members, -(-len(members) // max_members))
    return out


def near_equal_parts(positions: Sequence[int], parts: int) -> list[list[int]]:
    """``positions`` cut in order into ``parts`` parts whose sizes differ by at most one."""
    size, extra = divmod(len(positions), parts)
    out, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        out.append(list(positions[start:end]))
        start = end
    return out


def balance_groups(groups: Sequence[Sequence[int]], workers: int,
                   bank_of: Callable[[int], Hashable] | None = None) -> list[list[int]]:
    """Tasks for ``workers`` parallel workers that finish together, largest first.

    G fused groups on W workers take ceil(G / W) rounds; when W does not divide G the
    last round leaves workers idle (stage 1 on 2 cores: 3 seed groups, 2 rounds of a
    whole group each). The groups of the full rounds stay whole (a whole group shares
    each batch among the most members, the cheapest per job); only the G mod W groups
    of the last round are split, each into W near-equal parts (``split_group``).
    Stage 1 on 2 cores: tasks of 36, 36, 18 and 18, each worker one whole seed and
    half of the third. Tasks come largest first, so that a pool taking them in order
    runs the whole groups side by side. Solo jobs are never split.
    """
    fused = sorted((list(g) for g in groups if len(g) > 1), key=len, reverse=True)
    solo = [list(g) for g in groups if len(g) <= 1]
    if workers <= 1 or len(fused) % workers == 0:
        return [list(g) for g in groups]
    whole = len(fused) - len(fused) % workers
    out = fused[:whole]
    for group in fused[whole:]:
        out += split_group(group, workers, bank_of)
    return out + solo


def split_group(group: Sequence[int], parts: int,
                bank_of: Callable[[int], Hashable] | None = None) -> list[list[int]]:
    """``group`` in ``parts`` near-equal parts, whole stacked banks dealt out in turn.

    Dealing the banks (largest first, each to the part with fewest members) keeps each
    bank one stacked model and mixes the architectures: stage 1's seed group of six
    banks of 6 splits into k 16 | k 8, each part one bank of every model, the two
    parts equally costly; cutting it in the middle put the two self_attention banks
    into one part, a quarter slower than the other. Where whole banks cannot make the
    parts equal in size (or ``bank_of`` is not given), the group is cut in order.
    """
    parts = min(parts, len(group))
    largest = -(-len(group) // parts)
    if bank_of is not None:
        banks: dict[Hashable, list[int]] = {}
        for position in group:
            banks.setdefault(bank_of(position), []).append(position)
        dealt: list[list[int]] = [[] for _ in range(parts)]
        for bank in sorted(banks.values(), key=len, reverse=True):
            min(dealt, key=len).extend(bank)
        if max(len(part) for part in dealt) <= largest:
            return dealt
    return near_equal_parts(group, parts)


def local_workers(launcher: dict[str, Any] | DictConfig | None, pending: int) -> int:
    """The local launcher's worker count for ``pending`` jobs (``n_workers`` or the CPUs)."""
    configured = (launcher or {}).get("n_workers") if launcher is not None else None
    return max(1, min(int(configured or os.cpu_count() or 1), pending or 1))


def describe_groups(jobs: Sequence[PlannedJob], groups: Sequence[Sequence[int]]
                    ) -> list[dict[str, Any]]:
    """One row per dispatched task for ``tmgg-sweep plan``."""
    rows = []
    for number, group in enumerate(groups):
        first = jobs[group[0]].task_config
        banks = sorted({f"{bank_key(jobs[p])[0]}/k"
                        f"{(jobs[p].task_config.get('model') or {}).get('k')}" for p in group})
        rows.append({
            "group": number,
            "members": len(group),
            "seed": first.get("seed"),
            "batch_size": (first.get("data") or {}).get("batch_size"),
            "max_steps": (first.get("trainer") or {}).get("max_steps"),
            "stacked_models": ", ".join(banks),
            "jobs": [jobs[p].run_name for p in group],
        })
    return rows
