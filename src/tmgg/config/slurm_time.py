"""``tmgg.slurm_minutes``: a SLURM job's time limit from its step budget.

The launcher presets in ``conf/hydra/launcher/`` (``slurm``, ``submitit_local_tmgg``)
resolve ``timeout_min`` with it, wherever Hydra resolves the launcher's config, so
``import tmgg`` registers it. A config's own resolver, so it lives with the configs,
below every launcher; omegaconf only (Hydra's start-up path).
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import OmegaConf


def slurm_minutes(max_steps: Any, seconds_per_step: Any, margin: Any = 2,
                  startup_minutes: Any = 5) -> int:
    """Whole minutes for one job: steps x seconds a step x margin, plus start-up.

    Start-up covers imports, data set-up and the final test; the margin a slower node.
    A job that still runs out of time is requeued by submitit and resumes from its last
    checkpoint (``max_num_timeout``), so the limit needs not be generous.
    """
    steps = int(max_steps)
    per_step, factor, startup = float(seconds_per_step), float(margin), float(startup_minutes)
    if steps < 0 or per_step < 0 or factor < 1 or startup < 0:
        raise ValueError(
            "tmgg.slurm_minutes needs max_steps >= 0, seconds_per_step >= 0, margin >= 1 and "
            f"startup_minutes >= 0; got {max_steps}, {seconds_per_step}, {margin}, "
            f"{startup_minutes}"
        )
    return max(1, math.ceil(steps * per_step * factor / 60 + startup))


def register_slurm_resolver() -> None:
    """Register ``tmgg.slurm_minutes`` (idempotent)."""
    if not OmegaConf.has_resolver("tmgg.slurm_minutes"):
        OmegaConf.register_new_resolver("tmgg.slurm_minutes", slurm_minutes)
