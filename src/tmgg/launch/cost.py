"""What a sweep will cost on Modal, known before anything is dispatched.

``tmgg-sweep plan`` and the Modal launcher both use this module: the plan shows the
GPU, the estimated accelerator-seconds and the cost of every job, and the launcher
refuses a sweep whose total exceeds ``hydra.launcher.max_cost_usd``. GPU names are
checked here too, so an unknown name (``T5``) is refused at plan time and a GPU is
never silently replaced by another (SPEC.md section 8, defect 7).

Pure Python and omegaconf only: the plan command imports this without torch or modal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.jobs.plan import PlanError

# Modal pricing page (https://modal.com/pricing), as documented in 2025; edit when
# prices change. USD per second of one GPU of each type; Modal bills per second of
# container run time.
GPU_USD_PER_SECOND: dict[str, float] = {
    "T4": 0.000164,  # $0.59/h
    "L4": 0.000222,  # $0.80/h
    "A10": 0.000306,  # $1.10/h
    "L40S": 0.000542,  # $1.95/h
    "A100-40GB": 0.000583,  # $2.10/h
    "A100-80GB": 0.000694,  # $2.50/h
    "H100": 0.001097,  # $3.95/h
    "H200": 0.001261,  # $4.54/h
    "B200": 0.001736,  # $6.25/h
}
# Every container also pays for its CPU cores (physical cores) and its memory.
CPU_CORE_USD_PER_SECOND = 0.0000131  # $0.047 per core-hour
MEMORY_GIB_USD_PER_SECOND = 0.00000222  # $0.008 per GiB-hour

# Names accepted for a GPU that mean exactly that GPU (A10G is Modal's older name of
# the A10). Nothing else is mapped: A100 without its memory size is refused.
GPU_ALIASES = {"A10G": "A10"}
# GPUs one container can have (Modal's GPU guide: up to 8, A10 up to 4).
MAX_GPUS_PER_CONTAINER = 8
MAX_GPUS = {"A10": 4}

# Accelerator-seconds of one training step when a stage declares no measured figure
# (stage.gpu_seconds_per_job): stage 1 declares 144 s for 10 000 steps on a T4, i.e.
# 0.0144 s a step (validation and the test pass included). Plus container start-up
# (image pull, imports, data set-up) that a per-step figure does not cover.
SECONDS_PER_STEP = 0.0144
STARTUP_SECONDS = 20.0

# A fused group (tmgg.jobs.fusion) is one container, running its members
# together. Its time is modelled as the longest member's solo estimate times
# ``group_time_factor(n) = 1 + (n - 1) * FUSED_MEMBER_SHARE``: every further member
# costs a quarter of a solo job. Conservative on purpose: issue 13's CPU probe of a
# 36-job stage-1 seed measured 33 ms a fused step against 279 ms for the 36 solo steps,
# i.e. about 0.12 of a solo job per extra member (and a GPU, waiting on Python for such
# small models, does better still). The same factor stretches a group's time limit
# (Modal's timeout_s, SLURM's timeout_min), so a group is never cut short by a limit
# sized for one job.
FUSED_MEMBER_SHARE = 0.25

GPU_FIELD = "hydra.launcher.gpu"
COST_FIELD = "hydra.launcher.max_cost_usd"


class LauncherSettingError(PlanError):
    """A launcher setting that must not be dispatched; names the ``hydra.launcher`` field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def normalize_gpu(name: Any) -> str | None:
    """Modal's name of the requested GPU (``T4``, ``H100:2``); None for CPU-only.

    Case is ignored and ``A10G`` means ``A10``; any other unknown name is refused with
    an error naming ``hydra.launcher.gpu`` rather than mapped to a different GPU.
    """
    if name is None:
        return None
    text = str(name).strip()
    if text.lower() in ("", "none", "null", "cpu"):
        return None
    base, sep, count_text = text.partition(":")
    key = base.strip().upper()
    key = GPU_ALIASES.get(key, key)
    if key not in GPU_USD_PER_SECOND:
        hint = (" (say A100-40GB or A100-80GB)" if key == "A100" else "")
        raise LauncherSettingError(
            GPU_FIELD, f"unknown Modal GPU {text!r}{hint}; expected one of "
            f"{', '.join(GPU_USD_PER_SECOND)} (A10G is accepted as A10), optionally with "
            f":N for N GPUs, or null for a CPU-only container")
    if not sep:
        return key
    most = MAX_GPUS.get(key, MAX_GPUS_PER_CONTAINER)
    if not count_text.strip().isdigit() or not 1 <= int(count_text) <= most:
        raise LauncherSettingError(
            GPU_FIELD, f"GPU count in {text!r} must be an integer from 1 to {most} for {key}")
    count = int(count_text)
    return key if count == 1 else f"{key}:{count}"


def gpu_type_and_count(gpu: str | None) -> tuple[str | None, int]:
    """(``H100``, 2) for ``H100:2``; (None, 0) for CPU-only."""
    if gpu is None:
        return None, 0
    base, _, count = gpu.partition(":")
    return base, int(count) if count else 1


def container_usd_per_second(gpu: str | None, cpu: float, memory_mb: float) -> float:
    """The per-second price of one container: its GPUs, CPU cores and memory."""
    gpu_type, count = gpu_type_and_count(gpu)
    gpu_price = GPU_USD_PER_SECOND[gpu_type] * count if gpu_type else 0.0
    return (gpu_price + float(cpu) * CPU_CORE_USD_PER_SECOND
            + float(memory_mb) / 1024 * MEMORY_GIB_USD_PER_SECOND)


def job_seconds(task_config: dict[str, Any]) -> float:
    """Accelerator-seconds of one job: the stage's measured figure, else the step budget."""
    declared = (task_config.get("stage") or {}).get("gpu_seconds_per_job")
    if declared is not None:
        return float(declared)
    steps = (task_config.get("trainer") or {}).get("max_steps") or 0
    return STARTUP_SECONDS + float(steps) * SECONDS_PER_STEP


def group_time_factor(members: int) -> float:
    """A fused group's run time over one member's solo run time (see FUSED_MEMBER_SHARE)."""
    return 1.0 + max(0, int(members) - 1) * FUSED_MEMBER_SHARE


def _launcher(master_config: DictConfig) -> tuple[str, dict[str, Any]]:
    from tmgg.jobs.sweep import launcher_name

    node = OmegaConf.select(master_config, "hydra.launcher")
    params = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return launcher_name(master_config), dict(params or {})  # type: ignore[arg-type]


def is_modal_launcher(master_config: DictConfig) -> bool:
    name, params = _launcher(master_config)
    return name == "modal" or str(params.get("_target_", "")).endswith("TmggModalLauncher")


def plan_estimates(master_config: DictConfig, jobs: Sequence[Any],
                   groups: Sequence[Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """Per job: GPU, container, estimated accelerator-seconds and Modal cost, in job order.

    A job runs in a container of its own, or with its fused group in one container
    (``groups``: positions of ``jobs`` per container; by default the launcher's own
    grouping, ``hydra.launcher.fuse``). ``container`` numbers the containers;
    ``est_container_seconds`` is the container's time (a group's: its longest member's
    estimate times ``group_time_factor``) and ``est_gpu_seconds`` this job's share of it
    (the container's time split evenly among its members), so the jobs' figures add up
    to what the containers are billed. ``est_cost_usd`` is that share's cost on the
    configured Modal container (None for launchers that do not bill through Modal);
    ``est_cost_cpu_usd`` the same on a CPU-only Modal container (``gpu: null``) of the
    same cores and memory, assuming the same wall time — for 20-node graphs and a few
    thousand parameters a GPU is mostly idle, so this column shows what dropping the
    GPU would save.
    """
    modal = is_modal_launcher(master_config)
    _, params = _launcher(master_config)
    gpu = normalize_gpu(params.get("gpu")) if modal else None
    cpu = float(params.get("cpu") or 2.0)
    memory_mb = float(params.get("memory_mb") or 4096)
    rate = container_usd_per_second(gpu, cpu, memory_mb)
    cpu_rate = container_usd_per_second(None, cpu, memory_mb)
    if groups is None:
        groups = launcher_groups(master_config, jobs)
    rows: list[dict[str, Any]] = [{}] * len(jobs)
    for container, group in enumerate(groups):
        tasks = [getattr(jobs[p], "task_config", None) or {} for p in group]
        if not all(tasks):  # not tmgg jobs (e.g. Hydra's test apps): nothing to estimate
            for position in group:
                rows[position] = {"gpu": gpu, "container": container, "group_size": len(group),
                                  "est_container_seconds": None, "est_gpu_seconds": None,
                                  "est_cost_usd": None, "est_cost_cpu_usd": None}
            continue
        container_seconds = max(job_seconds(t) for t in tasks) * group_time_factor(len(group))
        share = container_seconds / len(group)
        for position in group:
            rows[position] = {
                "gpu": gpu,
                "container": container,
                "group_size": len(group),
                "est_container_seconds": round(container_seconds, 1),
                "est_gpu_seconds": round(share, 1),
                "est_cost_usd": round(share * rate, 6) if modal else None,
                "est_cost_cpu_usd": round(share * cpu_rate, 6),
            }
    return rows


def launcher_groups(master_config: DictConfig, jobs: Sequence[Any]) -> list[list[int]]:
    """Positions of ``jobs`` per task (a Modal container, a SLURM array task, a local
    worker's task) as the configured launcher will dispatch them."""
    from tmgg.jobs.fusion import (
        balance_groups,
        bank_key,
        fusion_settings,
        group_jobs,
        local_workers,
    )

    mode, cap = fusion_settings(master_config)
    groups = group_jobs(jobs, mode, cap)
    launcher = OmegaConf.select(master_config, "hydra.launcher")
    if launcher is not None and str(launcher.get("_target_", "")).endswith(
            ".TmggLocalLauncher"):  # the local launcher splits groups to fill its workers
        groups = balance_groups(groups, local_workers(launcher, len(jobs)),
                                lambda position: bank_key(jobs[position]))
    return groups


def container_totals(estimates: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How many containers a sweep starts and their summed estimated seconds."""
    seconds: dict[int, float] = {}
    for row in estimates:
        if row.get("container") is not None:
            seconds[row["container"]] = float(row.get("est_container_seconds") or 0.0)
    return {"containers": len(seconds), "est_container_seconds": round(sum(seconds.values()), 1)}


def sweep_totals(estimates: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Summed seconds and costs of a sweep (missing figures count as 0)."""
    totals = {"est_gpu_seconds": 0.0, "est_cost_usd": 0.0, "est_cost_cpu_usd": 0.0}
    for row in estimates:
        for key in totals:
            totals[key] += float(row.get(key) or 0.0)
    return totals


def check_cost_limit(master_config: DictConfig, estimates: Sequence[dict[str, Any]]) -> None:
    """Refuse a Modal sweep whose estimated total exceeds ``hydra.launcher.max_cost_usd``."""
    if not is_modal_launcher(master_config):
        return
    _, params = _launcher(master_config)
    limit = params.get("max_cost_usd")
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(
            float(limit)) or float(limit) < 0:
        raise LauncherSettingError(COST_FIELD, f"expected a number >= 0 or null, got {limit!r}")
    totals = sweep_totals(estimates)
    if totals["est_cost_usd"] > float(limit):
        gpu = next((row.get("gpu") for row in estimates), None) or "CPU-only"
        containers = container_totals(estimates)["containers"]
        raise LauncherSettingError(
            COST_FIELD, f"the sweep's estimated cost ${totals['est_cost_usd']:.4f} "
            f"({len(estimates)} jobs in {containers} containers, "
            f"{totals['est_gpu_seconds']:.0f} accelerator-seconds on {gpu}) exceeds the "
            f"limit ${float(limit):.4f}; nothing was dispatched. The same "
            f"sweep on CPU-only containers (hydra.launcher.gpu=null) is estimated at "
            f"${totals['est_cost_cpu_usd']:.4f}. Raise the limit, shrink the sweep, or set "
            f"{COST_FIELD}=null to disable the check")
