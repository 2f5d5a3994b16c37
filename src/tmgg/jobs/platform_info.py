"""Where a job ran, in enough detail to explain why two runs of one config differ.

Floating-point results of the same code and seed differ between CPUs, BLAS/LAPACK
builds (``eigh`` above all) and thread counts. Every job record carries
``platform_info()`` so ``tmgg-sweep verify`` can say whether a re-run is on the same
platform as the record, and a reader can see which records came from another one.

The fixed part is collected once per process (cached): reading ``/proc/cpuinfo`` and
torch's build configuration costs milliseconds, but a fused group writes many
records; thread counts and determinism settings are read live. torch is
imported lazily, only where a record is written (a job's own process).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

# Environment variables that change how many threads BLAS, OpenMP or torch use.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "TORCH_NUM_THREADS")

# The parts of ``platform_info()`` that decide floating-point results; thread counts
# are included because reductions split over threads round differently.
FINGERPRINT_KEYS = ("cpu", "torch", "cuda")


def _cpuinfo() -> dict[str, Any]:
    """CPU model, flags and physical core count from /proc/cpuinfo (Linux), else what
    the ``platform`` module knows."""
    model: str | None = None
    flags: list[str] = []
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = sorted(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
            cores.add((physical_id, core_id))
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine(),
        "flags": flags,
        "physical_cores": len(cores) or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
    }


def _torch_threads_and_settings() -> dict[str, Any]:
    """What a job may change after start (threads, determinism): read at each call."""
    import torch

    cudnn = torch.backends.cudnn
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(cudnn.deterministic),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _cuda_info() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    cudnn = torch.backends.cudnn
    return {
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn.version() if cudnn.is_available() else None,
        "device_count": torch.cuda.device_count(),
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


@functools.lru_cache(maxsize=1)
def _fixed_platform() -> dict[str, Any]:
    """What cannot change while the process runs: collected once."""
    import torch

    return {
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpuinfo(),
        "torch": {"version": torch.__version__, "build_config": torch.__config__.show()},
        "cuda": _cuda_info(),
    }


def platform_info() -> dict[str, Any]:
    """This process's platform: CPU, cores, torch build, CUDA (cached), and torch's
    thread and determinism settings as they are now (a job sets its threads after
    its record is first written, so the final record reads them again)."""
    fixed = _fixed_platform()
    return {**fixed, "torch": {**fixed["torch"], **_torch_threads_and_settings()},
            "thread_env": {name: os.environ.get(name) for name in THREAD_ENV_VARS}}


def platform_fingerprint(info: dict[str, Any] | None) -> str | None:
    """A short hash of what decides floating-point results (CPU model and flags, core
    counts, torch version, build, threads and determinism settings, CUDA/GPU); equal
    fingerprints mean "same platform" for ``tmgg-sweep verify``. None without info."""
    if not info:
        return None
    decisive = {key: info.get(key) for key in FINGERPRINT_KEYS}
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def platform_summary(info: dict[str, Any] | None) -> str:
    """One line for people: CPU model, cores, torch version and threads, BLAS, GPU."""
    if not info:
        return "platform not recorded"
    cpu = info.get("cpu") or {}
    torch_info = info.get("torch") or {}
    build = str(torch_info.get("build_config") or "")
    blas = next((part.split("=", 1)[1] for part in build.replace(",", " ").split()
                 if part.startswith("BLAS_INFO=")), "?")
    cuda = info.get("cuda") or {}
    gpu = ", ".join(cuda.get("gpu_names") or []) or "no GPU"
    return (f"{cpu.get('model')} ({cpu.get('usable_cores')}/{cpu.get('logical_cores')} cores), "
            f"torch {torch_info.get('version')} {torch_info.get('num_threads')} threads, "
            f"BLAS {blas}, {gpu}")
